"""The pipeline over every file of the shared real-CT folder: nothing crashes, every file is converted or rejected
with its reason, the good slices are all written with the HU pydicom gives, and no identifier reaches the output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ldct_tf import dicom
from ldct_tf.pipeline.__main__ import run
from tests.pipeline.test_pipeline import _all_records

IDENTIFYING = ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "InstitutionAddress", "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "StudyID")


@pytest.mark.slow
def test_whole_shared_folder(shared_data, tmp_path):
    # Expected outcome per file, from the reader alone.
    expected_slices, expected_rejects, identifiers, manufacturers = {}, {}, set(), set()
    seen_instances = set()  # copies of one SOP instance (693_UNCI / 693_J2KI, ...) are written once
    duplicates = 0
    for path in sorted(p for p in shared_data.rglob("*") if p.is_file()):
        try:
            read = dicom.read_slices(path)
        except dicom.NotUsableCT as exc:
            expected_rejects[str(path)] = exc.reason
            continue
        keep = []
        for hu, info in read:
            key = (info.sop_uid, info.frame) if info.sop_uid else (str(path), info.frame)
            duplicates += key in seen_instances
            if key not in seen_instances:
                keep.append(hu)
            seen_instances.add(key)
        expected_slices[str(path)] = keep
    for path in sorted(p for p in shared_data.rglob("*") if p.is_file()):
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
    assert manifest["slices"] == n_expected and manifest["duplicates_dropped"] == duplicates > 0
    assert manifest["rejected"] == len(expected_rejects)
    lines = [json.loads(l) for f in (out / "rejected").glob("*.jsonl") for l in f.read_text().splitlines()]
    local = {json.loads(l)["input"]: json.loads(l)["path"]
             for f in Path(f"{out}-site_local_DO_NOT_SHARE").glob("*.jsonl") for l in f.read_text().splitlines()}
    assert {local[l["input"]]: l["reason"] for l in lines} == expected_rejects

    # HU exactly as read (rounded to int16, which is exact for these integer-HU files).
    written = sorted(r["image"].tobytes() for r in _all_records(out))
    wanted = sorted(np.rint(hu).astype(np.int16).tobytes() for v in expected_slices.values() for hu in v)
    assert written == wanted

    # Neither identifiers nor input paths or file names (which may hold identifiers) in the shareable output; the
    # paths are only in the site-local folder.
    names = {str(shared_data)} | {Path(p).name for p in list(expected_slices) + list(expected_rejects)}
    for path in out.rglob("*"):
        if path.is_file() and "site_local_DO_NOT_SHARE" not in path.parts:
            blob = path.read_bytes()
            blob = gzip.decompress(blob) if path.suffix == ".gz" else blob
            for value in identifiers:
                assert value.encode() not in blob, f"an identifier ({len(value)} chars) leaked into {path.name}"
            for name in names:
                if len(name) > 6:  # short names ("1.dcm") could match pixel bytes by chance
                    assert name.encode() not in blob, f"an input file name leaked into {path.name}"
