"""``make demo`` (python -m ldct_tf.demo): packaged CT -> simulated quarter dose DICOM -> denoised DICOM -> scores."""

import csv

import numpy as np
import pydicom
import pytest

from ldct_tf import demo
from tests.conftest import REPO
from ldct_tf.testing.models import export_test_model


@pytest.fixture(scope="module")
def test_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _, version_dir = export_test_model(root)
    return version_dir.parent


def test_demo_on_packaged_ct(test_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LDCT_DATA_DIR", raising=False)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--model", str(test_model), "--max-slices", "1", "--baseline", "gaussian"]) == 0
    text = capsys.readouterr().out
    assert "PSNR abd dB" in text and "Research use only" in text
    low = sorted((out / "low_dose_dicom").rglob("*.dcm"))
    denoised = sorted((out / "denoised_dicom").rglob("*.dcm"))
    assert len(low) == 1 and len(denoised) == 1
    low_ds, out_ds = pydicom.dcmread(low[0]), pydicom.dcmread(denoised[0])
    assert out_ds.SeriesInstanceUID != low_ds.SeriesInstanceUID and "DERIVED" in out_ds.ImageType
    # The simulated quarter dose is noisier than the packaged original it came from.
    normal = pydicom.dcmread(sorted((out / "normal_dose_dicom").rglob("*.dcm"))[0])
    noise = low_ds.pixel_array.astype(float) * float(low_ds.RescaleSlope) - normal.pixel_array.astype(float)
    assert 5 < noise[40:90, 40:90].std() < 200
    with open(out / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["denoiser"] for r in rows} == {"ldct_tf", "gaussian", "none"}
    assert all(np.isfinite(float(r["psnr_abdomen"])) for r in rows)
    assert (out / "evaluation" / "report.md").exists()


def test_demo_without_a_model_says_how_to_get_one(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "d"), "--model", str(tmp_path / "nowhere")]) == 2
    assert "no exported model" in capsys.readouterr().err


def test_shipped_model_is_present():
    """The repository ships a trained default model (saved_models/ldct_denoiser, see its README)."""
    versions = [p for p in (REPO / "saved_models" / "ldct_denoiser").glob("*") if p.name.isdigit()]
    assert versions, "saved_models/ldct_denoiser has no version folder"
    assert (versions[0] / "saved_model.pb").exists() and (versions[0] / "metadata.json").exists()
