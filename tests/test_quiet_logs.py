"""A CPU run prints no spurious cuInit error and no Beam apitools warning (ldct_tf/quiet_logs.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ldct_tf import quiet_logs
from tests.conftest import REPO

SCRIPT = """
import logging
import ldct_tf.pipeline.dicom_to_tfrecord  # imports Beam and ldct_tf
import tensorflow as tf
tf.constant(1.0) + 1.0  # initialises the devices (where cuInit is called)
assert not logging.getLogger().handlers, "the root logger was configured as a side effect"
print("ok")
"""


def test_cpu_run_has_no_cuinit_error_or_apitools_warning():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "apitools not found" not in done.stderr
    if not quiet_logs.nvidia_driver_present():
        assert "cuInit" not in done.stderr, done.stderr


def test_a_command_prints_no_tensorflow_start_up_line():
    """TF 2.21 logs oneDNN / cudart / absl notices twice while its libraries load, before any log level applies."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "ldct_tf.export", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--replace-default-model" in done.stdout
    for notice in ("absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers"):
        assert notice not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), done.stderr


def test_the_import_filter_keeps_every_other_line(capfd):
    """Only the known start-up notices are dropped: anything else native code writes to fd 2 comes back."""
    with quiet_logs.stderr_filtered():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1.5   29370 port.cc:153] oneDNN custom operations are on. You may see\n")
        os.write(2, b"E0000 00:00:1.6   29370 cuda_executor.cc:1] a real failure\n")
    err = capfd.readouterr().err
    assert err == "E0000 00:00:1.6   29370 cuda_executor.cc:1] a real failure\n"


def test_the_import_filter_writes_everything_back_on_an_error(capfd):
    with pytest.raises(ImportError):
        with quiet_logs.stderr_filtered():
            os.write(2, b"I0000 00:00:1.5   29370 port.cc:153] oneDNN custom operations are on.\n")
            raise ImportError("broken")
    assert "oneDNN custom operations" in capfd.readouterr().err
