"""``python -m ldct_tf.train`` refuses bad configs and unusable folders with one line, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ldct_tf import config
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.mark.parametrize("override, match", [
    ("train.generator_lr=-1e-4", "generator_lr must be > 0"),
    ("train.steps=-5", "train.steps must be >= 1"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("loss.cycle=-1", "loss.cycle must be >= 0"),
    ("loss.gradient_weight=-2", "loss.gradient_weight must be >= 0"),
    ("loss.noisier2noise_i0=-1", "loss.noisier2noise_i0 must be >= 0"),
    ("data.patch_size=30", "multiple of 2\\*\\*model.depth"),
    ("model.disc_norm=layer", "disc_norm must be one of"),
    ("loss.simulated_loss=huber", "simulated_loss must be mse, l1 or mse_gradient"),
])
def test_config_ranges_are_checked_at_load(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load(SMOKE, [override])


def _train(args, capsys):
    from ldct_tf.train.__main__ import main

    capsys.readouterr()
    assert main(["--config", SMOKE, "--progress", "0", *args]) == 1
    message = capsys.readouterr().err
    assert message.startswith("python -m ldct_tf.train: error: ") and message.count("\n") == 1
    return message


def test_a_folder_without_a_manifest_is_one_line(tmp_path, capsys):
    message = _train(["--data", str(tmp_path), "--model-dir", str(tmp_path / "run")], capsys)
    assert "manifest.json" in message and str(tmp_path) in message


def test_a_manifest_without_shards_says_the_shards_are_missing(sample_run, tmp_path, capsys):
    shards, _ = sample_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((shards / "manifest.json").read_text())
    message = _train(["--data", str(empty), "--model-dir", str(tmp_path / "run")], capsys)
    assert "no shard files" in message


def test_an_unwritable_model_dir_fails_before_training(sample_run, tmp_path, capsys):
    shards, _ = sample_run
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    message = _train(["--data", str(shards), "--model-dir", str(blocker / "run")], capsys)
    assert "cannot write the model folder" in message


def test_resuming_with_another_architecture_is_refused(sample_run, tmp_path, capsys):
    from ldct_tf.train.__main__ import train

    shards, _ = sample_run
    run = tmp_path / "run"
    train(["--config", SMOKE, "--data", str(shards), "--model-dir", str(run), "--progress", "0", "train.steps=1"])
    message = _train(["--data", str(shards), "--model-dir", str(run), "train.steps=2", "model.base_filters=4"],
                     capsys)
    assert "another architecture" in message and "model.base_filters: 8 -> 4" in message and "--no-resume" in message


def test_cli_bad_value_exits_non_zero_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ldct_tf.train", "--config", SMOKE, "--data", str(tmp_path),
                           "--model-dir", str(tmp_path / "run"), "train.generator_lr=-1"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "generator_lr must be > 0" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m ldct_tf.train: error: ")


def test_a_tf_config_that_is_not_json_is_a_config_error(monkeypatch):
    from ldct_tf.train import loop

    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(config.ConfigError, match="TF_CONFIG is not valid JSON"):
        loop.tf_config()


@pytest.mark.slow
def test_sigint_stops_cleanly_keeps_the_checkpoint_and_says_how_to_resume(sample_run, tmp_path):
    shards, _ = sample_run
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldct_tf.train", "--config", SMOKE, "--data", str(shards), "--model-dir", str(run),
           "--progress", "0", "train.steps=100000", "train.steps_per_epoch=1", "data.val_max_slices=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = run / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (marker.exists() and marker.read_text()):
        assert proc.poll() is None, "training exited early"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    step = json.loads(marker.read_text())["step"]
    assert f"checkpoint at step {step} is kept" in out and "run the same command again to resume" in out
    assert json.loads((run / "training_summary.json").read_text())["stopped_by"] == "interrupted (SIGINT)"
    assert (run / "generator.keras").exists()


def test_offline_imagenet_vgg19_is_one_line_naming_the_fix_and_leaves_no_folder(sample_run, tmp_path, capsys,
                                                                                 monkeypatch):
    """No cached weights and a download that fails (as offline): one line with the three ways out, and the model
    folder (and the parent) this start made are gone."""
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] "
                        "Temporary failure in name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(keras.applications, "VGG19", offline)
    shards, _ = sample_run
    run = tmp_path / "runs" / "offline"
    message = _train(["--data", str(shards), "--model-dir", str(run), "loss.perceptual=0.1",
                      "loss.vgg_weights=imagenet"], capsys)
    assert "loss.perceptual=0" in message and "loss.vgg_weights_path=FILE" in message
    assert str(tmp_path / "keras_home" / "models") in message and "URL fetch" not in message
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_keeps_a_folder_it_did_not_make(sample_run, tmp_path, capsys, monkeypatch):
    import keras

    monkeypatch.setattr(keras.applications, "VGG19", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    shards, _ = sample_run
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("the user's\n")
    _train(["--data", str(shards), "--model-dir", str(run), "loss.perceptual=0.1", "loss.vgg_weights=imagenet"],
           capsys)
    assert (run / "notes.txt").exists()


def test_a_log_file_gets_plain_progress_and_no_config_dump(sample_run, tmp_path):
    """stdout to a file (not a terminal): no Keras bar codes (``\\x1b[``, ``\\r``, ``\\b``), no config unless
    --verbose."""
    import contextlib

    from ldct_tf.train.__main__ import main

    shards, _ = sample_run
    log = tmp_path / "train.log"
    with open(log, "w") as handle, contextlib.redirect_stdout(handle):
        code = main(["--config", SMOKE, "--data", str(shards), "--model-dir", str(tmp_path / "run"), "--progress", "1",
                     "train.steps=2", "train.steps_per_epoch=2"])
    text = log.read_text()
    assert code == 0 and "2/2 - " in text and "Trained to step 2" in text
    assert "\x1b[" not in text and "\r" not in text and "\b" not in text
    assert "Resolved config" not in text
