"""Derived series that say what they are (ldct_tf.dicom.ai_marking) and the PS3.15 basic profile (ldct_tf.dicom.deidentify)."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ldct_tf import denoise, dicom
from ldct_tf.dicom import ai_marking
from ldct_tf.dicom.deidentify import PROFILE, Deidentifier, code_item, RefusedForDeidentification, resolve_action

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) not installed")
MODEL = denoise.ModelInfo("test_denoiser", "7", "a test function")
SECRET_DATE, SECRET_TIME = "19710203", "235917"


def _value(vr: str, n: int):
    """A distinctive identifying value of ``vr`` for attribute number ``n``."""
    vr = vr.split(" or ")[0]
    return {
        "PN": f"Secretname{n}^Jane", "DA": SECRET_DATE, "TM": SECRET_TIME, "DT": SECRET_DATE + SECRET_TIME,
        "UI": f"1.2.826.0.1.3680043.9.7777.{n}", "AS": "042Y", "DS": "71.5", "IS": str(900000 + n),
        "US": 7, "SS": 7, "UL": 7, "SL": 7, "FL": 1.5, "FD": 1.5, "AT": 0x00100010, "UV": 7, "SV": 7,
        "OB": b"SECRET%04d" % n, "OW": b"SECRET%04d" % n, "OD": b"SECRET%04d" % n, "OF": b"SECRET%04d" % n,
        "OL": b"SECRET%04d" % n, "OV": b"SECRET%04d" % n, "UN": b"SECRET%04d" % n, "UR": f"http://secret{n}.example",
    }.get(vr, f"SECRET{n:04d}")


def identified_dataset() -> tuple[Dataset, list[str]]:
    """CT_small with EVERY attribute of the profile's table set to an identifying value (sequences hold an item
    with a name, an ID and a UID), plus private attributes, an overlay and a curve; returns it and the secrets."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    secrets = []
    for n, tag in enumerate(sorted(PROFILE)):
        if tag >> 16 == 0:  # command-group attributes (Affected SOP Instance UID) never occur in a file
            continue
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr == "SQ":
            item = Dataset()
            item.PatientName = f"Seqname{n}^John"
            item.PatientID = f"SEQID{n:04d}"
            item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.9.8888.{n}"
            ds.add_new(tag, "SQ", [item])
            secrets += [f"Seqname{n}", f"SEQID{n:04d}", f"1.2.826.0.1.3680043.9.8888.{n}"]
        else:
            value = _value(vr, n)
            (ds.file_meta if tag >> 16 == 2 else ds).add_new(tag, vr, value)
            if isinstance(value, (str, bytes)) and vr not in ("AS", "DS", "CS") and not str(value).isdigit():
                secrets.append(value.decode() if isinstance(value, bytes) else value)
    block = ds.private_block(0x0029, "SECRET VENDOR", create=True)
    block.add_new(0x10, "LO", "SECRETPRIVATE")
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 8)  # overlay data
    ds.add_new(0x60004000, "LT", "SECRETOVERLAY")
    ds.add_new(0x50000010, "US", 3)  # curve group
    secrets += ["SECRETPRIVATE", "SECRETOVERLAY", SECRET_DATE, SECRET_TIME]
    return ds, secrets


def test_every_identifying_attribute_of_the_profile_is_gone():
    ds, secrets = identified_dataset()
    meta = {tag: ds.file_meta[tag].value for tag in PROFILE if tag in ds.file_meta}
    original = {tag: ds[tag].value for tag in PROFILE if tag in ds}
    out = Deidentifier("test-salt").apply(ds)
    for tag, action in PROFILE.items():
        action = resolve_action(tag, action)
        if tag not in original:
            continue
        if action == "X":
            assert tag not in out, f"{pydicom.datadict.keyword_for_tag(tag)} should be removed"
        elif tag in out:
            value = out[tag].value
            if out[tag].VR == "SQ":
                continue  # items checked through the byte search below
            assert value in (None, "", b"", []) or value != original[tag], pydicom.datadict.keyword_for_tag(tag)
    for tag, value in meta.items():
        assert out.file_meta[tag].value != value
    buffer = io.BytesIO()
    out.save_as(buffer)
    raw = buffer.getvalue()
    leaked = [s for s in secrets if s.encode() in raw]
    assert leaked == []
    assert not any(e.tag.is_private for e in out)
    assert 0x60003000 not in out and 0x60004000 not in out and 0x50000010 not in out
    assert out.PatientIdentityRemoved == "YES"
    assert "PS3.15" in out.DeidentificationMethod
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.ContributingEquipmentSequence[-1].PurposeOfReferenceCodeSequence[0].CodeValue == "109104"
    assert out.PatientID.startswith("PSEUDO-") and out.PatientName == out.PatientID


def test_uids_and_pseudonyms_are_consistent_within_a_run_and_keyed_by_the_salt():
    a, b = pydicom.dcmread(get_testdata_file("CT_small.dcm")), pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    b.SOPInstanceUID = generate_uid()
    study, sop_a, sop_b, patient = a.StudyInstanceUID, a.SOPInstanceUID, b.SOPInstanceUID, a.PatientID
    run = Deidentifier("salt-1")
    out_a, out_b = run.apply(a), run.apply(b)
    assert out_a.StudyInstanceUID == out_b.StudyInstanceUID != study
    assert out_a.SOPInstanceUID != out_b.SOPInstanceUID
    assert sop_a not in (out_a.SOPInstanceUID, out_b.SOPInstanceUID) and sop_b != out_b.SOPInstanceUID
    assert pydicom.uid.UID(out_a.StudyInstanceUID).is_valid
    assert out_a.SOPClassUID == pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.2")  # well-known UIDs are never mapped
    assert out_a.PatientID == out_b.PatientID
    other = Deidentifier("salt-2").apply(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    assert other.PatientID != out_a.PatientID and other.StudyInstanceUID != out_a.StudyInstanceUID
    assert patient not in (out_a.PatientID, other.PatientID)


def test_burned_in_annotation_is_refused():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(RefusedForDeidentification, match="BurnedInAnnotation"):
        Deidentifier().apply(ds)


# ------------------------------------------------------------------------------------------------- AI marking
def _derived(source: Dataset, **series_kwargs) -> Dataset:
    hu = dicom.read_ct_dataset(_as_bytes(source))[1]
    series = dicom.DerivedSeries.new(MODEL.derivation_description(), MODEL.series_suffix(), **series_kwargs)
    return dicom.derived_dataset(source, hu + 1.0, series)


def _as_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_derivation_description_is_appended_not_overwritten():
    """Issue 15: the source's own derivation history (here: lossy compression) must survive."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.DerivationDescription = "Lossy compressed 10:1 by the archive"
    out = _derived(source)
    assert out.DerivationDescription.startswith("Lossy compressed 10:1 by the archive")
    assert "test_denoiser" in out.DerivationDescription and "version 7" in out.DerivationDescription
    assert len(out.DerivationDescription) <= 1024
    assert source.DerivationDescription == "Lossy compressed 10:1 by the archive"  # the source is not mutated


def test_append_keeps_the_new_text_whole_when_the_old_one_is_long():
    text = ai_marking.append_text("x" * 2000, "denoised by model m", 1024)
    assert len(text) <= 1024 and text.endswith("denoised by model m") and "..." in text


def test_derived_image_names_the_ai_model_and_research_use():
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.ImageComments = "contrast phase: portal venous"
    out = _derived(source, model=MODEL.ai_model())
    item = out.ContributingEquipmentSequence[-1]
    assert item.ManufacturerModelName == "test_denoiser"
    assert "model test_denoiser v7" in list(item.SoftwareVersions)
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert "AI model test_denoiser version 7" in item.ContributionDescription
    assert out.ImageComments.startswith("contrast phase: portal venous")
    assert ai_marking.RESEARCH_USE in out.ImageComments and "NOT FOR DIAGNOSIS" in out.DerivationDescription


def test_deidentified_derived_image_keeps_the_marking_and_its_source_link():
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    run = Deidentifier("s")
    out = _derived(source, model=MODEL.ai_model(), deidentifier=run)
    assert out.PatientIdentityRemoved == "YES" and out.PatientID.startswith("PSEUDO-")
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == run.new_uid(source.SOPInstanceUID)
    assert out.StudyInstanceUID == run.new_uid(source.StudyInstanceUID)
    purposes = [i.PurposeOfReferenceCodeSequence[0].CodeValue for i in out.ContributingEquipmentSequence]
    assert purposes[-2:] == ["109104", "109102"]
    assert "test_denoiser" in out.DerivationDescription and "test_denoiser" in out.SeriesDescription
    assert str(source.PatientName) not in str(out.PatientName)


# ------------------------------------------------------------------------------------------------- whole CLI path
@pytest.fixture()
def series(tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "in" / "Doe_Jane_12345"  # a folder name that identifies the patient
    folder.mkdir(parents=True)
    uid = generate_uid()
    for i in range(2):
        ds = source.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 5.0 * i]
        ds.save_as(folder / f"Doe_Jane_{i}.dcm", enforce_file_format=True)
    return tmp_path / "in"


def _errors(path) -> set[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


@needs_dciodvfy
@pytest.mark.parametrize("deidentify", [False, True])
def test_both_modes_pass_dciodvfy(series, tmp_path, deidentify):
    out = tmp_path / "out"
    summary = denoise.denoise(series, out, lambda hu: hu + 2.0, MODEL, progress=False, deidentify=deidentify,
                              audit_series=False)
    files = sorted(out.rglob("*.dcm"))
    assert summary.slices == 2 and len(files) == 2
    for path in files:
        assert _errors(path) == set(), path
        ds = pydicom.dcmread(path)
        assert ds.ContributingEquipmentSequence[-1].ManufacturerModelName == "test_denoiser"
        if deidentify:
            assert "Doe" not in str(path.relative_to(out)) and ds.PatientIdentityRemoved == "YES"
            assert "Doe" not in str(ds.PatientName)
    if deidentify:
        uids = {pydicom.dcmread(p).SeriesInstanceUID for p in files}
        assert len(uids) == 1


# ------------------------------------------------------------------------------------------------- issue 27, item 1
SWEEP_NAME, SWEEP_ID, SWEEP_BIRTH = "Sweepname^Maria", "SWEEPID4321", "19550607"


def leaky_source() -> Dataset:
    """CT_small carrying every leak issue 27's sweep found in a ``--deidentify`` output, plus a whole overlay plane."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SWEEP_NAME, SWEEP_ID, SWEEP_BIRTH
    ds.add_new(0x00104321, "LO", SWEEP_ID)  # a public patient-group tag pydicom does not know
    ds.add_new(0x00100033, "LO", SWEEP_BIRTH + "A")  # birth date in an alternative calendar
    ds.add_new(0x00100034, "LO", SWEEP_BIRTH + "B")
    ds.add_new(0x00100035, "CS", "SWEEPCAL")
    for element, vr, value in ((0x0010, "US", 512), (0x0011, "US", 512), (0x0040, "CS", "G"), (0x0050, "SS", [1, 1]),
                               (0x0100, "US", 1), (0x0102, "US", 0), (0x0022, "LO", "overlay of " + SWEEP_NAME),
                               (0x1500, "LO", SWEEP_NAME), (0x3000, "OW", b"\x00" * 64)):
        ds.add_new(0x60000000 | element, vr, value)
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator, procedure.CodeMeaning = "P1", "99LOCAL", SWEEP_NAME
    ds.ProcedureCodeSequence = [procedure]
    ds.CreatorVersionUID = "1.2.826.0.1.3680043.9.7777.4321"
    ds.DateOfLastCalibration, ds.DateOfSecondaryCapture = "19990909", "19880808"
    equipment = Dataset()
    equipment.Manufacturer, equipment.ContributionDateTime = "SweepCorp", "19770707121212"
    equipment.InstitutionName = "Sweep Hospital"
    equipment.PurposeOfReferenceCodeSequence = [code_item(("109101", "DCM", "Acquisition Equipment"))]
    ds.ContributingEquipmentSequence = [equipment]
    return ds


SWEEP_SECRETS = (SWEEP_ID, "Sweepname", SWEEP_BIRTH, "SWEEPCAL", "1.2.826.0.1.3680043.9.7777.4321", "19990909",
                 "19880808", "19770707", "Sweep Hospital")


@pytest.fixture()
def leaky_series(tmp_path):
    source = leaky_source()
    folder = tmp_path / "in"
    folder.mkdir()
    uid = generate_uid()
    for i in range(2):
        ds = source.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 5.0 * i]
        ds.save_as(folder / f"s{i}.dcm", enforce_file_format=True)
    return folder


def test_deidentified_output_holds_none_of_the_sweeps_leaks(leaky_series, tmp_path):
    out = tmp_path / "out"
    denoise.denoise(leaky_series, out, lambda hu: hu + 2.0, MODEL, progress=False, deidentify=True,
                    audit_series=False)
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 2
    for path in files:
        raw = path.read_bytes()
        assert [s for s in SWEEP_SECRETS if s.encode() in raw] == []
        ds = pydicom.dcmread(path)
        assert not any(e.tag.group & 0xFF00 in (0x5000, 0x6000) for e in ds)
        assert not any(e.tag.is_private or not e.keyword for e in ds)
        assert "ProcedureCodeSequence" not in ds and "CreatorVersionUID" not in ds
        assert ds.ContributingEquipmentSequence[0].Manufacturer == "SweepCorp"  # the device's history survives
        assert all("ContributionDateTime" not in item for item in ds.ContributingEquipmentSequence[:-1])
        if DCIODVFY is not None:
            assert _errors(path) == set(), path


def test_plain_derived_image_copies_only_the_whitelist():
    """Without --deidentify the derived CT keeps patient and study, but no private, unknown or overlay attribute."""
    out = _derived(leaky_source())
    assert out.PatientID == SWEEP_ID and out.PatientName == SWEEP_NAME
    assert 0x00104321 not in out and 0x60000022 not in out and 0x60003000 not in out
    assert not any(e.tag.is_private for e in out)
    assert "ProcedureCodeSequence" not in out and "DateOfLastCalibration" not in out


def test_deidentifier_alone_drops_unknown_tags_and_whole_overlay_groups():
    out = Deidentifier("s").apply(leaky_source())
    assert 0x00104321 not in out and 0x00100033 not in out and 0x00100035 not in out
    assert not any(e.tag.group == 0x6000 for e in out)
    assert "ContributionDateTime" not in out.ContributingEquipmentSequence[0]
