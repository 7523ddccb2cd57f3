"""Shared fixtures: sample DICOM written by the project, the shared real-CT folder, one pipeline run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ldct_tf.quiet_logs import quiet_tensorflow

quiet_tensorflow()  # as the tools do: no spurious cuInit error line on CPU machines

REPO = Path(__file__).resolve().parents[1]


#: In CI (``CI=true``, which ``.ci/run`` sets) a missing requirement of the real-data and validator tests fails them:
#: a CI run that skipped them would pass without having tested the real archive or the DICOM validity.
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(reason: str) -> None:
    """Skip the calling test, or fail it in CI, because ``reason`` (something it needs is not installed/present)."""
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it (see .ci/run)", pytrace=False)
    pytest.skip(reason)


def shared_data_dir() -> Path:
    """``$LDCT_DATA_DIR`` or ``../shared/data`` beside the project."""
    return Path(os.environ.get("LDCT_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not (root / "README.md").exists():
        missing(f"shared real-CT data not found at {root} (set LDCT_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """4 patients x (normal, low) x 3 slices of CT_small-based DICOM with fake identifiers."""
    from ldct_tf.demo import sample_data

    return sample_data.write_sample_dataset(tmp_path_factory.mktemp("sample"), n_patients=4, slices_per_series=3)


@pytest.fixture(scope="session")
def sample_run(sample, tmp_path_factory):
    """One pipeline run over the sample archive (plus a folder of bad files); returns (output, manifest)."""
    from ldct_tf.pipeline.__main__ import run

    bad = tmp_path_factory.mktemp("bad_inputs")
    (bad / "notes.txt").write_text("not a DICOM file\n")
    good = sample.files["normal"][0].read_bytes()
    (bad / "truncated.dcm").write_bytes(good[: len(good) // 2])
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = run(["--input", str(sample.root), "--input", str(bad), "--dose-manifest", str(sample.dose_manifest), "--output", str(out),
                    "--salt", "test-salt", "--splits", "train=0.5,val=0.25,test=0.25", "--num-shards", "2"])
    return out, manifest


def with_simulated_stream(source: Path, work: Path, realisations: int) -> tuple[Path, dict, Path]:
    """A copy of the pipeline output ``source`` under ``work/shards`` (never modify the shared one) with a simulated-pair
    stream from a fixed test calibration (one kernel, ramp filter, quarter dose); returns (shards, entry, calibration).
    """
    import shutil

    from ldct_tf.simulate import __main__ as simulate_cli
    from ldct_tf.simulate import calibration

    shards = Path(work) / "shards"
    shutil.copytree(source, shards)
    cal = calibration.save({"kernels": {"ANY": {"i0": 2e5, "i0_range": [1e5, 4e5], "filter_name": "ramp",
                                                "dose_fraction": 0.25, "electronic_noise": 10.0,
                                                "noise_model": "insert"}}, "default_kernel": "ANY"},
                           Path(work) / "calibration.json")
    entry = simulate_cli.pairs(["--data", str(shards), "--calibration", str(cal), "--realisations", str(realisations)])
    return shards, entry, cal
