"""ldct_tf.audit.dicom_object: the audit of a derived series as a Secondary Capture image in its study.

The object must be valid DICOM (dciodvfy), sit in the derived series' study with new UIDs, carry the AI marking,
reference the flagged slices, and carry no identifier the derived series does not (none under de-identification).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from scipy import ndimage

from ldct_tf import denoise
from ldct_tf.audit import dicom_object
from ldct_tf.dicom.ai_marking import RESEARCH_USE
from tests.conftest import missing

MODEL = denoise.ModelInfo("test_denoiser", "7", "a test function")
FAKE_NAME, FAKE_ID, FAKE_ACCESSION = "AUDIT^OBJECTPATIENT", "PID-AUDIT-4711", "ACC-AUDIT-0815"


def dciodvfy_errors(path: Path) -> set[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        missing("dciodvfy (Debian dicom3tools) not installed")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


def blur(hu: np.ndarray) -> np.ndarray:
    """Removes structure, not just noise: the audit flags it."""
    return ndimage.uniform_filter(hu, size=(1, 9, 9)).astype(np.float32)


@pytest.fixture()
def series(tmp_path) -> Path:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "input"
    folder.mkdir()
    study, series_uid = generate_uid(), generate_uid()
    for i in range(3):
        ds = source.copy()
        ds.PatientName, ds.PatientID, ds.AccessionNumber = FAKE_NAME, FAKE_ID, FAKE_ACCESSION
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 5.0 * i]
        ds.SliceLocation = -75.7 + 5.0 * i
        ds.PixelData = np.roll(source.pixel_array, 7 * i, axis=1).astype(source.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice{i}.dcm", enforce_file_format=True)
    return folder


def derive(series: Path, out: Path, deidentify: bool = False) -> Path:
    summary = denoise.denoise(series, out, blur, MODEL, progress=False, deidentify=deidentify,
                              pseudonym_salt="test-salt")
    [folder] = summary.folders
    return folder


@pytest.mark.parametrize("deidentify", [False, True])
def test_audit_object_is_valid_and_in_the_derived_study(series, tmp_path, deidentify):
    folder = derive(series, tmp_path / "out", deidentify)
    path = dicom_object.write_audit_object(folder)
    assert path == folder / "audit" / dicom_object.OBJECT_NAME
    assert dciodvfy_errors(path) == set()
    got = pydicom.dcmread(path)
    derived = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    report = json.loads((folder / "audit" / "audit.json").read_text())
    assert got.SOPClassUID == SecondaryCaptureImageStorage and got.Modality == "OT"
    assert got.StudyInstanceUID == derived[0].StudyInstanceUID
    assert got.SeriesInstanceUID != derived[0].SeriesInstanceUID and got.SeriesInstanceUID.is_valid
    assert got.SOPInstanceUID not in {d.SOPInstanceUID for d in derived} and got.SOPInstanceUID.is_valid
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):
        assert got.get(keyword) == derived[0].get(keyword), keyword
    assert got.Manufacturer == "ldct_tf" and got.ImageComments == RESEARCH_USE
    assert "test_denoiser" in got.DerivationDescription
    assert got.ContributingEquipmentSequence[0].ManufacturerModelName == "test_denoiser"
    flagged = {s["sop_instance_uid"] for s in report["per_slice"] if s["flagged"]}
    assert flagged, "the blurring denoiser should be flagged"
    assert {r.ReferencedSOPInstanceUID for r in got.ReferencedImageSequence} == flagged
    assert got.pixel_array.shape == (got.Rows, got.Columns, 3) and got.pixel_array.std() > 0
    text = str(got)  # every element, as text: no identifier the derived series does not carry
    if deidentify:
        assert got.PatientIdentityRemoved == "YES"
        for secret in (FAKE_NAME, FAKE_ID, FAKE_ACCESSION):
            assert secret not in text, secret
    for keyword in ("InstitutionName", "StationName", "DeviceSerialNumber", "OperatorsName"):
        assert keyword not in got, keyword


def test_flag_counts_and_summary_text():
    report = {"slices": 3, "flagged_patches": 4, "thresholds": {"frc_band_min": 0.5},
              "per_slice": [{"index": 0, "instance": 1, "flagged": False, "flagged_by": {"frc": 0}},
                            {"index": 1, "instance": 2, "flagged": True, "flagged_by": {"frc": 1, "blob": 2}},
                            {"index": 2, "instance": None, "flagged": True, "flagged_by": {"anatomy": 1}}]}
    counts = dicom_object.flag_counts(report)
    assert counts == {"slices": 3, "flagged_slices": 2, "flagged_patches": 4,
                      "by": {"frc": 1, "blob": 2, "anatomy": 1}, "instances": [2, "#2"]}
    lines = dicom_object.summary_lines(report, "Denoised by AI model m version 1")
    assert lines[0] == RESEARCH_USE and "Flagged slices (instance numbers): 2, #2" in lines


def test_missing_sidecar_is_one_clear_error(tmp_path):
    with pytest.raises(dicom_object.AuditObjectError, match="no audit sidecar"):
        dicom_object.write_audit_object(tmp_path)
