"""tf.distribute: MirroredStrategy over 2 logical CPU devices matches one device; two-process MultiWorker training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run_replicas(n: int, optimizer: str, tmp_path) -> dict:
    out = tmp_path / f"r{n}_{optimizer}.npz"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "replica_check.py"), str(n), optimizer, str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
def test_two_replicas_take_the_same_step_as_one(tmp_path):
    """SGD makes the step proportional to the gradient, so a loss not divided by the replica count would show up as
    a doubled update (Keras 3 optimizers sum gradients across replicas)."""
    one = _run_replicas(1, "sgd", tmp_path)
    two = _run_replicas(2, "sgd", tmp_path)
    np.testing.assert_allclose(two["before"], one["before"], atol=1e-6)  # same initial weights
    for name in ("generator_loss", "cycle_loss", "normal_critic_loss", "low_critic_loss"):
        np.testing.assert_allclose(two[name], one[name], rtol=2e-3, atol=1e-5, err_msg=name)
    change_one = one["after"] - one["before"]
    change_two = two["after"] - two["before"]
    assert np.abs(change_one).max() > 1e-5  # the step did something
    np.testing.assert_allclose(change_two, change_one, rtol=0.02, atol=2e-4 * np.abs(change_one).max())
    assert int(one["steps"]) == int(two["steps"]) == 2


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_worker_multiworker_training_completes(sample_run, tmp_path):
    shards, _ = sample_run
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, "-m", "ldct_tf.train", "--config", "configs/smoke.yaml", "--data", str(shards),
               "--model-dir", str(tmp_path / "run"), "--progress", "0", "train.steps=2", "train.steps_per_epoch=2",
               "train.batch_size=2"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    assert "MultiWorkerMirroredStrategy with 2 replica(s)" in outputs[0]
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["replicas"] == 2
    assert (tmp_path / "run" / "generator.keras").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest.weights.h5").exists()


def _two_workers(shards, model_dirs: list, steps: int) -> list[tuple[int, str]]:
    """Two MultiWorkerMirroredStrategy workers on 127.0.0.1, each with its own --model-dir; (exit code, output)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index, model_dir in enumerate(model_dirs):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, "-m", "ldct_tf.train", "--config", "configs/smoke.yaml", "--data", str(shards),
               "--model-dir", str(model_dir), "--progress", "0", f"train.steps={steps}", "train.steps_per_epoch=2",
               "train.batch_size=2", "data.val_max_slices=1"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for proc in procs:
        try:
            results.append((None, proc.communicate(timeout=900)[0]))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return [(proc.returncode, output) for proc, (_, output) in zip(procs, results)]


@pytest.mark.slow
def test_workers_with_separate_folders_refuse_to_resume_from_different_steps(sample_run, tmp_path):
    """Separate --model-dir folders: the first run trains (both start at 0); resuming, the chief's folder holds step
    2 and the other worker's none, so both refuse in one line instead of training with different weights."""
    shards, _ = sample_run
    dirs = [tmp_path / "chief", tmp_path / "worker"]
    for code, output in _two_workers(shards, dirs, steps=2):
        assert code == 0, output[-3000:]
    assert json.loads((dirs[0] / "checkpoints" / "checkpoint.json").read_text())["step"] == 2
    for code, output in _two_workers(shards, dirs, steps=4):
        assert code != 0
        errors = [line for line in output.splitlines() if line.startswith(("error:", "python -m ldct_tf.train: error:"))]
        assert len(errors) == 1 and "the workers' checkpoints disagree (steps [0, 2])" in errors[0], output[-3000:]
        assert "Traceback" not in output
    assert json.loads((dirs[0] / "checkpoints" / "checkpoint.json").read_text())["step"] == 2  # nothing trained
