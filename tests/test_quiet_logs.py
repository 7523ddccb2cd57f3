"""A CPU run prints no spurious cuInit error and no Beam apitools warning (ldct_tf/quiet_logs.py)."""

from __future__ import annotations

import os
import subprocess
import sys

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
