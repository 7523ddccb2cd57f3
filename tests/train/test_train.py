"""``python -m ldct_tf.train`` end to end on shards written by the pipeline; kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest

from ldct_tf import config
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_cli_trains_checkpoints_logs_and_saves(sample_run, tmp_path):
    from ldct_tf.train.__main__ import train

    shards, _ = sample_run
    run = tmp_path / "run"
    summary = train(["--config", str(REPO / "configs" / "smoke.yaml"), "--data", str(shards), "--model-dir", str(run),
                     "--progress", "0", "train.steps=3", "train.steps_per_epoch=2", "train.log_every=1"])
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 0
    for name in ("generator_loss", "cycle_loss", "identity_loss", "perceptual_loss", "normal_critic_loss"):
        assert np.isfinite(summary["final_metrics"]["train"][name])
    assert json.loads((run / "checkpoints" / "checkpoint.json").read_text())["step"] == 3
    assert config.load(run / "config.yaml").train.steps == 3
    for sub in ("train", "images"):
        assert any((run / "logs" / sub).iterdir()), sub
    generator = keras.saving.load_model(run / "generator.keras")
    x = np.full((1, 64, 64, 1), -0.5, "float32")
    assert generator(x).shape == (1, 64, 64, 1)
    # Started again with more steps, it resumes where it stopped.
    more = train(["--config", str(REPO / "configs" / "smoke.yaml"), "--data", str(shards), "--model-dir", str(run),
                  "--progress", "0", "train.steps=4", "train.steps_per_epoch=2"])
    assert more["resumed_from_step"] == 3 and more["steps"] == 4


def test_time_limit_stops_early_and_still_saves(sample_run, tmp_path):
    from ldct_tf.train.__main__ import train

    shards, _ = sample_run
    run = tmp_path / "run"
    # A budget of 6 ms: the first step already exceeds it, so training stops after one step of 100.
    summary = train(["--config", str(REPO / "configs" / "smoke.yaml"), "--data", str(shards), "--model-dir", str(run),
                     "--progress", "0", "train.steps=100", "train.steps_per_epoch=50", "train.time_limit_minutes=0.0001"])
    assert summary["steps"] == 1 and summary["stopped_by_time_limit"]
    assert json.loads((run / "checkpoints" / "checkpoint.json").read_text())["step"] == 1
    assert (run / "generator.keras").exists() and (run / "training_summary.json").exists()


def _checkpoint_step(path) -> int:
    """The step stored in a checkpoint file itself: the CycleGAN's own step counter (its only variable)."""
    with h5py.File(path, "r") as handle:
        return int(np.asarray(handle["vars/0"]))


@pytest.mark.slow
def test_killed_run_resumes_at_its_last_checkpoint(sample_run, tmp_path):
    shards, _ = sample_run
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldct_tf.train", "--config", "configs/smoke.yaml", "--data", str(shards),
           "--model-dir", str(run), "--progress", "0", "train.steps_per_epoch=1", "data.val_max_slices=1"]
    proc = subprocess.Popen(cmd + ["train.steps=1000"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        if marker.exists() and json.loads(marker.read_text() or "{}").get("step", 0) >= 3:
            break
        assert proc.poll() is None, "training exited early"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_step(run / "checkpoints" / "latest.weights.h5")
    assert killed_at >= 3
    done = subprocess.run(cmd + [f"train.steps={killed_at + 2}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"Resuming from the checkpoint at step {killed_at}" in done.stdout
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == killed_at + 2
    assert _checkpoint_step(run / "checkpoints" / "latest.weights.h5") == killed_at + 2
