"""The loop's execution settings: ``train.steps_per_execution`` (several steps per call) and ``train.jit_compile``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from ldct_tf import config, ct
from tests.conftest import REPO


def _smoke_model(initial: list = None):
    """The smoke CycleGAN with SGD (the step is proportional to the gradient), from ``initial`` weights if given,
    and one fixed batch."""
    from ldct_tf.models.factory import build_cyclegan

    cfg = config.load(REPO / "configs" / "smoke.yaml")
    keras.utils.set_random_seed(0)
    model = build_cyclegan(cfg)
    if initial is not None:
        model.set_weights(initial)
    model.compile(*[keras.optimizers.SGD(0.002) for _ in range(4)])
    model.build_optimizers()
    rng = np.random.default_rng(0)
    normal = ct.to_model(rng.uniform(-100, 100, (2, 32, 32, 1)).astype("float32"))
    low = ct.to_model(rng.uniform(-100, 100, (2, 32, 32, 1)).astype("float32"))
    return model, tf.data.Dataset.from_tensors((low, normal)).repeat(), low[:1]


def _checkpoint_steps(steps_per_execution: int, model_dir) -> list:
    """Five steps in epochs of four through ``run_loop``; the steps its checkpoints were written at."""
    from ldct_tf.train import loop

    model, dataset, sample = _smoke_model()
    saved = []
    original = loop.save_checkpoint
    try:
        loop.save_checkpoint = lambda m, folder: saved.append(m.steps_done()) or original(m, folder)
        loop.run_loop(model, tf.distribute.get_strategy(), dataset, None, total_steps=5, steps_per_epoch=4,
                      log_every=10, model_dir=str(model_dir), sample_low=sample, verbose=0,
                      steps_per_execution=steps_per_execution)
    finally:
        loop.save_checkpoint = original
    checkpoint = json.loads((model_dir / "checkpoints" / "checkpoint.json").read_text())
    assert checkpoint["step"] == model.steps_done() == 5
    return saved


@pytest.mark.slow
def test_steps_per_execution_keeps_the_epochs_and_checkpoints(tmp_path):
    """Three steps per call: calls of 3 and 1 steps in the first epoch (never past its end), 1 in the second;
    checkpoints at steps 4 and 5, as with one step per call."""
    assert _checkpoint_steps(1, tmp_path / "one") == _checkpoint_steps(3, tmp_path / "three") == [4, 5]


@pytest.mark.slow
def test_one_call_of_three_steps_equals_three_calls_of_one(tmp_path):
    """The same weights after 3 steps (float rounding only).  Compared after 3 steps, not more: on this synthetic,
    almost constant batch, instance norm amplifies rounding differences chaotically (measured: 1e-7 after 3 steps,
    6e-2 after 6, the same between two single-step call patterns)."""
    from ldct_tf.train import loop

    weights = {}
    start = None
    for n in (1, 3):
        model, dataset, _ = _smoke_model(start)
        start = start or model.get_weights()
        train_step, _ = loop.make_step_functions(model, tf.distribute.get_strategy(), n)
        iterator = iter(dataset)
        for _ in range(3 // n):
            train_step(iterator)
        assert model.steps_done() == 3
        weights[n] = model.get_weights()
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(start, weights[1]) if a.dtype.kind == "f")  # it trained
    for a, b in zip(weights[1], weights[3]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_steps_per_execution_must_be_positive():
    from ldct_tf.train import loop

    with pytest.raises(ValueError, match="steps_per_execution must be >= 1, got 0"):
        loop.make_step_functions(None, None, steps_per_execution=0)


@pytest.mark.parametrize("jit", [True, False])
def test_jit_compile_compiles_the_loops_step_with_xla(jit):
    """``train.jit_compile`` reaches the loop: XLA compiles a cluster exactly when it is on (its log line), with
    several steps per call too."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "0", "TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "jit_check.py"), "1" if jit else "0", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STEPS 4" in done.stdout
    assert ("Compiled cluster using XLA" in done.stderr) == jit
