"""Run by tests/train/test_mixed_precision.py in a fresh process (logical devices must be set before TF initialises).

    python tests/train/overflow_check.py REPLICAS OUT.npz

The smoke CycleGAN under ``mixed_float16`` with loss-scaled optimizers (as ``train.mixed_precision`` builds them) on
REPLICAS logical CPU devices: one step on a global batch of 4 whose last two samples (replica 1's half when REPLICAS
is 2) overflow float16, then one step on a clean batch.  Saves whether every weight stayed finite, how much the
weights moved at each step, and each optimizer's loss scale before and after.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ldct_tf.train import loop  # noqa: E402

replicas, out_path = int(sys.argv[1]), sys.argv[2]
strategy = loop.make_strategy(cpu_replicas=replicas)
assert strategy.num_replicas_in_sync == replicas, strategy.num_replicas_in_sync

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from ldct_tf import config, ct  # noqa: E402
from ldct_tf.models.factory import build_cyclegan, compile_cyclegan  # noqa: E402

keras.mixed_precision.set_global_policy("mixed_float16")  # on a CPU too: the test is about the decision, not speed
cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smoke.yaml"))
keras.utils.set_random_seed(0)
with strategy.scope():
    model = compile_cyclegan(build_cyclegan(cfg), cfg, loss_scaling=True)

rng = np.random.default_rng(0)
normal = ct.to_model(rng.uniform(-100, 100, (4, 32, 32, 1)).astype("float32"))
low = ct.to_model(rng.uniform(-100, 100, (4, 32, 32, 1)).astype("float32"))
bad_low = low.copy()
bad_low[2:] = 1e5  # beyond float16's 65504: Inf inside the networks, NaN/Inf gradients on that replica only

optimizers = [opt for opt, _ in model._optimizer_networks()]


def weights():
    """Every network weight and every optimizer slot (Adam's moments and iteration count)."""
    slots = [v for opt in optimizers for v in opt.inner_optimizer.variables]
    networks = [w for w in model.weights if w.path != model.train_steps.path]  # the step counter counts every step
    return [np.asarray(w) for w in networks + slots]


def scales():
    return np.array([float(opt.dynamic_scale.numpy()) for opt in optimizers])


train_step, _ = loop.make_step_functions(model, strategy)
record = {"scale_0": scales()}
w0 = weights()
for name, batch in (("overflow", (bad_low, normal)), ("clean", (low, normal))):
    train_step(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))))
    w1 = weights()
    record[f"{name}_finite"] = all(np.isfinite(w).all() for w in w1)
    record[f"{name}_change"] = max(float(np.abs(a.astype("float64") - b).max()) for a, b in zip(w0, w1)
                                   if a.dtype.kind in "fiu")
    record[f"{name}_scale"] = scales()
    w0 = w1
record["steps"] = model.steps_done()
np.savez(out_path, **record)
