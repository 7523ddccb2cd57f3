"""Mixed precision across replicas: an overflow on any replica skips every optimizer and halves every loss scale.

Keras 3.15's LossScaleOptimizer decides from replica 0's gradients only (keras_compat.WORKAROUNDS
["loss_scale_all_replicas"]); before the workaround, the 2-replica case below applied the overflowing step and left
non-finite weights.  Each case runs in a fresh process (logical CPU devices must be set before TF initialises).
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _overflow_check(replicas: int, tmp_path) -> dict:
    out = tmp_path / f"overflow_{replicas}.npz"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "overflow_check.py"), str(replicas),
                           str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_overflow_on_one_replica_skips_every_optimizer_and_halves_the_scale(replicas, tmp_path):
    r = _overflow_check(replicas, tmp_path)
    assert bool(r["overflow_finite"]), "an overflowing step reached the weights"
    assert float(r["overflow_change"]) == 0.0  # every network, every optimizer slot: untouched
    np.testing.assert_array_equal(r["overflow_scale"], r["scale_0"] / 2)  # all four scales halved
    # The next, clean step is applied (the skip is not a stuck state) and keeps the halved scale.
    assert bool(r["clean_finite"]) and float(r["clean_change"]) > 0
    np.testing.assert_array_equal(r["clean_scale"], r["scale_0"] / 2)
    assert int(r["steps"]) == 2


def test_critic_scores_are_float32_under_mixed_precision_with_spectral_norm():
    from ldct_tf.models.discriminator import build_discriminator

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        critic = build_discriminator(8, 2, "none", spectral_norm=True)
        scores = critic(np.full((1, 32, 32, 1), -0.5, "float32"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert scores.dtype == "float32"
