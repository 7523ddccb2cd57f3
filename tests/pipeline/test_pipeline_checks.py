"""The pipeline's defences against inputs that used to pass silently: implausible rescale / HU / size, duplicate
slices, dose-manifest entries that match nothing, one placeholder PatientID for everybody, and file names (which may
hold identifiers) reaching the shareable output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ldct_tf import dicom
from ldct_tf.dicom import plausibility
from ldct_tf.demo import sample_data
from ldct_tf.pipeline import site_local
from ldct_tf.pipeline.__main__ import run


def _rewrite(path: Path, target: Path, **attributes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two 'Anonymous' studies, a bad-rescale/tiny folder whose file names hold a PatientID and an accession."""
    root = tmp_path_factory.mktemp("archive")
    hu = np.rint(sample_data.ct_small_hu())
    studies = []
    for i in range(2):
        ident = sample_data.Identity("Anonymous", "Anonymous", accession=f"ACC77{i}")
        studies.append(sample_data.write_series(root / "good" / f"study{i}", [hu, hu + 3], ident))
    source = studies[0][0]
    bad = root / "bad"
    _rewrite(source, bad / "MRN5550123_ACC9981234_slope0.dcm", RescaleSlope=0)
    _rewrite(source, bad / "MRN5550123_ACC9981234_slope1e6.dcm", RescaleSlope=1e6)
    tiny = pydicom.dcmread(source)
    tiny.Rows = tiny.Columns = 1
    tiny.PixelData = np.array([[1000]], np.uint16).tobytes()
    tiny.SOPInstanceUID = tiny.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    tiny.save_as(bad / "MRN5550123_ACC9981234_tiny.dcm", enforce_file_format=True)
    manifest = root / "doses.csv"
    manifest.write_text("path,dose\ngood,normal\nbad,normal\nelsewhere,low\n1.2.3.4.5.6,low\n")
    (root / "elsewhere").mkdir()
    return root, manifest


def test_implausible_slices_are_refused_by_the_shared_reader(archive):
    root, _ = archive
    reasons = {}
    for path in sorted((root / "bad").iterdir()):
        with pytest.raises(dicom.NotUsableCT) as caught:
            dicom.read_slices(path)
        reasons[path.name.rsplit("_", 1)[1]] = caught.value.reason
    assert reasons == {"slope0.dcm": plausibility.IMPLAUSIBLE_RESCALE, "slope1e6.dcm": plausibility.IMPLAUSIBLE_RESCALE,
                       "tiny.dcm": plausibility.TOO_SMALL}
    # The HU bounds alone catch a broken rescale too (e.g. when a frame's header is fine but its values are not).
    assert plausibility.problem(64, 64, 1.0, 0.0, np.full((64, 64), 1e6))[0] == plausibility.IMPLAUSIBLE_HU
    assert plausibility.problem(64, 64, 1.0, -1024.0, np.full((64, 64), -1024.0))[0] == plausibility.IMPLAUSIBLE_HU
    assert plausibility.problem(512, 512, 1.0, -1024.0, np.linspace(-1024, 3000, 512 * 512)) is None


@pytest.fixture(scope="module")
def checked_run(archive, tmp_path_factory):
    root, manifest = archive
    out = tmp_path_factory.mktemp("checked") / "out"
    good = str(root / "good")
    result = run(["--input", good, "--input", good, "--input", good, "--input", str(root / "bad"),
                  "--dose-manifest", str(manifest), "--output", str(out), "--salt", "s", "--num-shards", "1"])
    return out, result


def test_bad_values_rejected_duplicates_dropped_and_warnings(checked_run):
    out, manifest = checked_run
    # 4 good slices, given three times: written once each, the copies counted.
    assert manifest["slices"] == 4 and manifest["duplicates_dropped"] == 8
    assert manifest["rejected_by_reason"] == {plausibility.IMPLAUSIBLE_RESCALE: 2, plausibility.TOO_SMALL: 1}
    warnings = manifest["warnings"]
    assert any(w.startswith("dose manifest line 4:") and "matches no input file" in w for w in warnings)
    assert any(w.startswith("dose manifest line 5:") and "SeriesInstanceUID" in w for w in warnings)
    assert not any(w.startswith(("dose manifest line 2:", "dose manifest line 3:")) for w in warnings)
    # Both studies say PatientID "Anonymous": one loud warning pointing at the manifest's patient column.
    assert any("share ONE patient identifier" in w and "'patient' column" in w for w in warnings)
    assert any("placeholder PatientID" in w for w in warnings)


def test_shareable_output_names_no_path_or_file(archive, checked_run):
    root, _ = archive
    out, _ = checked_run
    local = Path(site_local.folder_for(str(out)))
    forbidden = [b"MRN5550123", b"ACC9981234", str(root).encode(), b"ACC770", b"ACC771"]
    shared = [p for p in out.rglob("*") if p.is_file() and local not in p.parents]
    assert any(p.name == "manifest.json" for p in shared) and any(p.parent.name == "rejected" for p in shared)
    for path in shared:
        blob = path.read_bytes()
        blob = gzip.decompress(blob) if path.suffix == ".gz" else blob
        for value in forbidden:
            assert value not in blob, f"{value!r} in {path.relative_to(out)}"
    # The operator can still find every rejected file: rejected/ and the site-local list share the "input" key.
    rejected = [json.loads(l) for f in (out / "rejected").glob("*.jsonl") for l in f.read_text().splitlines()]
    paths = {json.loads(l)["input"]: json.loads(l)["path"]
             for f in local.glob("rejected_paths-*.jsonl") for l in f.read_text().splitlines()}
    assert sorted(Path(paths[r["input"]]).parent for r in rejected) == [root / "bad"] * 3
    assert json.loads((local / "run.json").read_text())["output"] == str(out)


# ------------------------------------------------------------------------------------------------- issue 27
def test_conflicting_duplicates_and_bad_rescale_are_rejected_and_the_output_is_shareable_whole(tmp_path):
    hu = np.rint(sample_data.ct_small_hu())
    ident = sample_data.Identity("MRN0000950", "Dup^Dora")
    normal = sample_data.write_series(tmp_path / "in" / "normal", [hu, hu + 1], ident)
    low = sample_data.write_series(tmp_path / "in" / "low", [hu + 50, hu + 51], ident)
    conflict = pydicom.dcmread(low[0])  # same SOP Instance UID as normal[0], other pixels
    conflict.SOPInstanceUID = conflict.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(normal[0]).SOPInstanceUID
    conflict.save_as(low[0], enforce_file_format=True)
    (tmp_path / "in" / "copy").mkdir()
    (tmp_path / "in" / "copy" / "same.dcm").write_bytes(normal[1].read_bytes())  # an identical duplicate
    text = _rewrite(normal[1], tmp_path / "in" / "text" / "x.dcm", RescaleIntercept="-1023.75")
    text.write_bytes(text.read_bytes().replace(b"-1023.75", b"unknown "))
    manifest = tmp_path / "doses.csv"
    manifest.write_text("path,dose\nin/normal,normal\nin/copy,normal\nin/text,normal\nin/low,low\n")
    out = tmp_path / "out"
    result = run(["--input", str(tmp_path / "in"), "--dose-manifest", str(manifest), "--output", str(out),
                  "--salt", "s", "--num-shards", "1"])
    assert result["duplicates_dropped"] == 1
    assert result["rejected_by_reason"] == {"conflicting_duplicate": 2, plausibility.IMPLAUSIBLE_RESCALE: 1}
    lines = [json.loads(l) for f in (out / "rejected").glob("*.jsonl") for l in f.read_text().splitlines()]
    conflicts = [l for l in lines if l["reason"] == "conflicting_duplicate"]
    hashes = [h.strip() for h in conflicts[0]["detail"].split("sha256 ")[1].split(")")[0].split(",")]
    assert len(set(hashes)) == 2 and all(len(h) == 16 for h in hashes) and conflicts[0]["detail"] == conflicts[1]["detail"]
    assert "RescaleIntercept is not a number" in [l for l in lines if l["reason"] != "conflicting_duplicate"][0]["detail"]
    assert result["slices"] == 2  # normal[1] (once) and low[1]; neither conflicting copy
    # The operator-only folder sits beside the output, never inside it: OUT can be shared whole.
    assert not any("DO_NOT_SHARE" in str(p) for p in out.rglob("*"))
    local = Path(site_local.folder_for(str(out)))
    assert local.parent == out.parent and (local / "run.json").exists()
    assert len([l for f in local.glob("rejected_paths-*.jsonl") for l in f.read_text().splitlines()]) == 3


def test_output_through_a_symlink_into_the_input_or_a_site_local_folder_inside_the_output_is_refused(tmp_path):
    from ldct_tf.pipeline.dicom_to_tfrecord import UsageError

    hu = np.rint(sample_data.ct_small_hu())
    sample_data.write_series(tmp_path / "in", [hu], sample_data.Identity("MRN0000951", "Lin^Lee"))
    (tmp_path / "link").symlink_to(tmp_path / "in")
    base = ["--input", str(tmp_path / "in"), "--normal-dose-description", ".*", "--salt", "s"]
    with pytest.raises(UsageError, match="inside the input"):
        run([*base, "--output", str(tmp_path / "link" / "out")])
    assert not (tmp_path / "in" / "out").exists()
    with pytest.raises(UsageError, match="inside --output"):
        run([*base, "--output", str(tmp_path / "out"), "--site-local", str(tmp_path / "out" / "local")])


def test_num_shards_is_capped(tmp_path):
    from ldct_tf.pipeline.dicom_to_tfrecord import UsageError

    with pytest.raises(UsageError, match="--num-shards must be between 1 and 1024, got 100000"):
        run(["--input", str(tmp_path), "--normal-dose-description", ".*", "--output", str(tmp_path / "o"),
             "--num-shards", "100000"])


def test_fifo_burned_in_oversized_instance_and_malformed_values_are_rejected_with_reasons(tmp_path):
    """Issue 27 (Low): a FIFO hung the run, burned-in-annotation slices went into shards, an InstanceNumber beyond
    int64 wrapped, and a malformed tag value (which may be a name) was echoed into the shareable ``rejected/``."""
    import os

    from ldct_tf import records

    hu = np.rint(sample_data.ct_small_hu())
    ident = sample_data.Identity("MRN0000952", "Ode^Ann")
    good = sample_data.write_series(tmp_path / "in" / "good", [hu, hu + 3], ident)
    odd = tmp_path / "in" / "odd"
    _rewrite(good[0], odd / "burned.dcm", BurnedInAnnotation="YES")
    _rewrite(good[0], odd / "instance.dcm", InstanceNumber=2**31 + 5)
    malformed = pydicom.dcmread(good[0])
    malformed["ImagePositionPatient"] = pydicom.DataElement(0x00200032, "LO", "SMITH^JANE\x07")
    malformed.SOPInstanceUID = malformed.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    malformed.save_as(odd / "malformed.dcm", enforce_file_format=True)
    os.mkfifo(odd / "pipe.dcm")
    out = tmp_path / "out"
    manifest = run(["--input", str(tmp_path / "in"), "--normal-dose-description", ".*", "--output", str(out),
                    "--salt", "s", "--num-shards", "1"])
    assert manifest["slices"] == 2
    assert manifest["rejected_by_reason"] == {"bad_geometry": 1, "burned_in_annotation": 1,
                                              "instance_number_out_of_range": 1, "not_a_regular_file": 1}
    shared = (out / "rejected" / "rejected-00000-of-00001.jsonl").read_text()
    assert "SMITH" not in shared and "'S'" not in shared and "to float: <value>" in shared and shared.isascii()
    assert all(len(json.loads(line)["detail"]) <= site_local.MAX_DETAIL for line in shared.splitlines())
    local = Path(site_local.folder_for(str(out)))
    kept = "".join(f.read_text() for f in local.glob("rejected_paths-*.jsonl"))
    assert "to float: 'S'" in kept and "pipe.dcm" in kept  # nothing lost: the full detail stays at the site
    with pytest.raises(ValueError, match="does not fit a TFRecord int64"):
        records._int64_feature(2**63 + 5)
