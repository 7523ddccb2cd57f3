"""Run by tests/train/test_distributed.py in a fresh process (logical devices must be set before TF initialises).

    python tests/train/replica_check.py REPLICAS OPTIMIZER OUT.npz

Trains the smoke CycleGAN (with ldct_tf.train's loop) for two steps on one fixed global batch of 4 under MirroredStrategy over REPLICAS logical
CPU devices, and saves the losses of each step and the generator's output on a fixed input before and after.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ldct_tf.train import make_strategy  # noqa: E402

replicas, optimizer_name, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
strategy = make_strategy(cpu_replicas=replicas)
assert strategy.num_replicas_in_sync == replicas, strategy.num_replicas_in_sync

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from ldct_tf import config, ct  # noqa: E402
from ldct_tf.models.factory import build_cyclegan  # noqa: E402

cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smoke.yaml"))
keras.utils.set_random_seed(0)
with strategy.scope():
    model = build_cyclegan(cfg)
    make = (lambda: keras.optimizers.SGD(0.002)) if optimizer_name == "sgd" else (lambda: keras.optimizers.Adam(2e-4))
    model.compile(make(), make(), make(), make())
    model.build_optimizers()

rng = np.random.default_rng(0)
normal = rng.uniform(-100, 100, (4, 32, 32, 1)).astype("float32")
low = normal + rng.normal(0, 40, normal.shape).astype("float32")
low, normal = ct.to_model(low), ct.to_model(normal)
probe = low[:1]
before = np.asarray(model(probe))
# The training CLI's own loop, one step at a time, so each step's losses are recorded.
from ldct_tf.train import run_loop  # noqa: E402

dataset = tf.data.Dataset.from_tensors((low, normal)).repeat()
history: dict = {}
for total in (1, 2):
    metrics = run_loop(model, strategy, dataset, None, total_steps=total, steps_per_epoch=1, log_every=1,
                       model_dir=os.path.dirname(out_path), sample_low=probe, verbose=0)["train"]
    for name, value in metrics.items():
        history.setdefault(name, []).append(value)
after = np.asarray(model(probe))
np.savez(out_path, before=before, after=after, steps=model.steps_done(),
         **{k: np.asarray(v) for k, v in history.items()})
