"""In CI (CI=true) a test whose validator or shared data is missing fails; elsewhere it skips (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _pytest(test: str, tmp_path, ci: bool, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CI"}
    environment.update(PYTHONPATH=str(REPO), **env)
    if ci:
        environment["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("test, env, reason", [
    ("tests/denoise/test_denoise.py::test_abdomen_series_without_uids", {"LDCT_DATA_DIR": "/nonexistent/shared/data"},
     "shared real-CT data not found"),
    ("tests/denoise/test_denoise.py::test_derived_files_pass_dciodvfy", {"PATH": "/nonexistent-bin"},
     "dciodvfy (Debian dicom3tools) not installed"),
])
def test_missing_requirement_skips_locally_and_fails_in_ci(test, env, reason, tmp_path):
    local = _pytest(test, tmp_path, ci=False, **env)
    assert local.returncode == 0 and "1 skipped" in local.stdout and reason in local.stdout, local.stdout[-2000:]
    ci = _pytest(test, tmp_path, ci=True, **env)
    assert ci.returncode == 1 and ("1 failed" in ci.stdout or "1 error" in ci.stdout), ci.stdout[-2000:]
    assert reason in ci.stdout and "CI=true requires it" in ci.stdout
