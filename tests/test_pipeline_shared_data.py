"""The pipeline over every file of the shared real-CT folder: nothing crashes, every file is converted or rejected
with its reason, the good slices are all written with the HU pydicom gives, and no identifier reaches the output."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pydicom
import pytest

from ldct_tf import dicom
from pipelines.dicom_to_tfrecord import run
from tests.test_pipeline import _all_records

IDENTIFYING = ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "InstitutionAddress", "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "StudyID")


@pytest.mark.slow
def test_whole_shared_folder(shared_data, tmp_path):
    # Expected outcome per file, from the reader alone.
    expected_slices, expected_rejects, identifiers, manufacturers = {}, {}, set(), set()
    for path in sorted(p for p in shared_data.rglob("*") if p.is_file()):
        try:
            expected_slices[str(path)] = [hu for hu, _ in dicom.read_slices(path)]
        except dicom.NotUsableCT as exc:
            expected_rejects[str(path)] = exc.reason
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            manufacturers.add(str(ds.get("Manufacturer", "")))
            for keyword in IDENTIFYING:
                value = str(ds.get(keyword, "") or "")
                if len(value) >= 4 and value.lower() not in ("anonymous", "none"):
                    identifiers.add(value)
        except Exception:
            pass
    identifiers -= manufacturers  # one anonymiser wrote the vendor name into InstitutionName; Manufacturer is kept
    assert len(identifiers) > 20

    out = tmp_path / "out"
    # Catch-all description rule: every usable slice gets a dose, so only unusable files are rejected.
    manifest = run(["--input", str(shared_data), "--output", str(out), "--salt", "s",
                    "--normal-dose-description", ".*", "--num-shards", "2", "--splits", "train=0.6,val=0.2,test=0.2"])
    n_expected = sum(len(v) for v in expected_slices.values())
    assert manifest["slices"] == n_expected
    assert manifest["rejected"] == len(expected_rejects)
    lines = [json.loads(l) for f in (out / "rejected").glob("*.jsonl") for l in f.read_text().splitlines()]
    assert {l["path"]: l["reason"] for l in lines} == expected_rejects

    # HU exactly as read (rounded to int16, which is exact for these integer-HU files).
    written = sorted(r["image"].tobytes() for r in _all_records(out))
    wanted = sorted(np.rint(hu).astype(np.int16).tobytes() for v in expected_slices.values() for hu in v)
    assert written == wanted

    # Input paths are the user's own names and are meant to be in rejected/ and the manifest: blank them first.
    input_paths = sorted(list(expected_slices) + list(expected_rejects) + [str(shared_data)], key=len, reverse=True)
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            blob = gzip.decompress(blob) if path.suffix == ".gz" else blob
            for name in input_paths:
                blob = blob.replace(name.encode(), b"")
            for value in identifiers:
                assert value.encode() not in blob, f"an identifier ({len(value)} chars) leaked into {path.name}"
