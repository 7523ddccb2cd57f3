"""Run by tests/train/test_loop_execution.py in a fresh process, with TensorFlow's INFO log on.

    python tests/train/jit_check.py JIT(0|1) STEPS_PER_EXECUTION

Two calls of the training loop's step function (``loop.make_step_functions``) on a one-layer model with a
``train_step`` (XLA compiles it in seconds; the CycleGAN takes minutes on this CPU).  With JIT=1 TensorFlow logs
"Compiled cluster using XLA!" once; without, never.
"""

import sys

import numpy as np

from ldct_tf.train import loop

jit, steps_per_execution = sys.argv[1] == "1", int(sys.argv[2])
strategy = loop.make_strategy()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


class Tiny(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(1, 3, padding="same")
        self.steps = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False,
                                     aggregation="only_first_replica")

    def call(self, x):
        return self.conv(x)

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(data[0]) - data[1]))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.steps.assign_add(1)


with strategy.scope():
    model = Tiny()
    model(np.zeros((1, 8, 8, 1), "float32"))  # creates the kernel now, not inside the traced step
    model.compile(keras.optimizers.SGD(0.1))
    model.optimizer.build(model.trainable_variables)
train_step, _ = loop.make_step_functions(model, strategy, steps_per_execution, jit_compile=jit)
x = np.ones((2, 8, 8, 1), "float32")
iterator = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((x, x)).repeat()))
train_step(iterator)
train_step(iterator)
print(f"STEPS {int(model.steps.numpy())}", flush=True)
