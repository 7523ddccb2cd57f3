"""ldct_tf.dicom: HU must equal a direct pydicom computation; every unusable file gets a specific reason."""

from __future__ import annotations


import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage

from ldct_tf import dicom
from ldct_tf.dicom.slices import geometry
from ldct_tf.demo import sample_data
from tests.conftest import shared_data_dir


@pytest.fixture(scope="module")
def base_hu():
    return np.rint(sample_data.ct_small_hu())


@pytest.fixture
def identity():
    return sample_data.Identity("MRN1", "Doe^John")


def _write(tmp_path, hu, identity, name="a.dcm", **kwargs):
    return sample_data.write_ct_slice(tmp_path / name, hu, identity, series_uid="1.2.3.4", instance=7, z_mm=-12.5,
                                      **kwargs)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_reads_written_slice_exactly(tmp_path, base_hu, identity, signed, syntax):
    kwargs = {"transfer_syntax": syntax} if syntax else {}
    path = _write(tmp_path, base_hu, identity, signed=signed, **kwargs)
    hu, info = dicom.read_slice(path)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, base_hu)
    assert (info.instance, info.z_mm, info.rows, info.columns) == (7, -12.5, 128, 128)
    assert info.pixel_spacing_mm == (0.7, 0.7) and info.slice_thickness_mm == 3.0
    assert (info.kvp, info.exposure_mas, info.ctdivol, info.kernel) == (120.0, 200.0, 12.0, "B30f")
    assert info.patient_id == "MRN1" and info.series_uid == "1.2.3.4"
    assert "MRN1" not in repr(info) and "1.2.3.4" not in repr(info)  # identifiers stay out of logs


def test_reads_from_bytes_with_a_name(tmp_path, base_hu, identity):
    path = _write(tmp_path, base_hu, identity)
    hu, info = dicom.read_slice(path.read_bytes(), name="gs://bucket/a.dcm")
    assert info.source == "gs://bucket/a.dcm"
    np.testing.assert_array_equal(hu, base_hu)


def test_padding_value_maps_to_air(tmp_path, base_hu, identity):
    hu = base_hu.copy()
    hu[:4] = -3024  # outside the field of view, as some scanners store it
    path = _write(tmp_path, hu, identity, signed=True, padding_value=-3024)
    out, _ = dicom.read_slice(path)
    assert (out[:4] == -1024).all()
    np.testing.assert_array_equal(out[4:], base_hu[4:])


def _expect_reason(src, reason, match=None):
    with pytest.raises(dicom.NotUsableCT) as info:
        dicom.read_slices(src)
    assert info.value.reason == reason, info.value
    assert str(src) in str(info.value)  # the message names the file
    if match:
        assert match in info.value.detail


def test_rejects_non_dicom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not an image\n" * 20)
    _expect_reason(path, dicom.NOT_DICOM)


def test_rejects_truncated_file(tmp_path, base_hu, identity):
    data = _write(tmp_path, base_hu, identity).read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(dicom.NotUsableCT) as info:
        dicom.read_slices(path)
    assert info.value.reason in (dicom.UNDECODABLE, dicom.UNREADABLE)


def test_rejects_missing_file(tmp_path):
    _expect_reason(tmp_path / "nope.dcm", dicom.UNREADABLE, "not found")


def _modify(path, **changes):
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def test_rejects_secondary_capture(tmp_path, base_hu, identity):
    path = _modify(_write(tmp_path, base_hu, identity), SOPClassUID=SecondaryCaptureImageStorage)
    _expect_reason(path, dicom.NOT_CT_IMAGE, "Secondary Capture")


def test_rejects_localizer(tmp_path, base_hu, identity):
    path = _modify(_write(tmp_path, base_hu, identity), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _expect_reason(path, dicom.LOCALIZER)


def test_rejects_missing_pixel_data(tmp_path, base_hu, identity):
    _expect_reason(_modify(_write(tmp_path, base_hu, identity), PixelData=None), dicom.NO_PIXEL_DATA)


def test_rejects_sagittal_reformat(tmp_path, base_hu, identity):
    path = _modify(_write(tmp_path, base_hu, identity), ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _expect_reason(path, dicom.NOT_AXIAL)


def test_accepts_gantry_tilt(tmp_path, base_hu, identity):
    path = _modify(_write(tmp_path, base_hu, identity),
                   ImageOrientationPatient=[1, 0, 0, 0, 0.9483237, -0.3173047])  # 18.5 degrees
    hu, info = dicom.read_slice(path)
    np.testing.assert_array_equal(hu, base_hu)


def test_rejects_legacy_multiframe(tmp_path, base_hu, identity):
    path = _write(tmp_path, base_hu, identity)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path)
    _expect_reason(path, dicom.MULTI_FRAME)


def test_rejects_undecodable_pixel_data(tmp_path, base_hu, identity):
    path = _write(tmp_path, base_hu, identity, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(path)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00garbage" * 10])
    ds.save_as(path)
    _expect_reason(path, dicom.UNDECODABLE, "RLE Lossless")


def test_group_series_sorts_by_position(tmp_path, base_hu, identity):
    files = sample_data.write_series(tmp_path / "s1", [base_hu] * 3, identity, z_start_mm=10, spacing_mm=-2.5)
    files += sample_data.write_series(tmp_path / "s2", [base_hu] * 2, identity)
    infos = [dicom.read_slice(f)[1] for f in reversed(files)]
    series = dicom.group_series(infos)
    assert sorted(len(v) for v in series.values()) == [2, 3]
    for items in series.values():
        z = [s.z_mm for s in items]
        assert z == sorted(z)


# --- every file of the shared real-CT folder: converted with correct HU, or rejected with its reason -------------

EXPECTED_REJECTIONS = {
    "edge_cases/liver.dcm": dicom.NOT_CT_IMAGE,  # DICOM SEG
    "edge_cases/CT-MONO2-16-ankle.dcm": dicom.NOT_CT_IMAGE,  # Secondary Capture
    "edge_cases/orthanc/2020-08-12-Christopher.dcm": dicom.LOCALIZER,
    "edge_cases/orthanc/Phenix/IM-0001-0001.dcm": dicom.LOCALIZER,
    "edge_cases/orthanc/TransferSyntaxes/1.2.840.10008.1.2.4.70.dcm": dicom.LOCALIZER,
    "edge_cases/orthanc/PatientWith2studies/TEST_1_study_1234.dcm": dicom.NOT_AXIAL,  # sagittal MPR
    "edge_cases/orthanc/PatientWith2studies/TEST_1_study_2345.dcm": dicom.NOT_AXIAL,
}
NON_DICOM_SUFFIXES = (".md", ".csv", ".nii.gz", "LICENSE")


def _shared_files():
    root = shared_data_dir()
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _direct_hu(ds) -> list[np.ndarray]:
    """HU straight from pydicom: pixel_array x slope + intercept (per frame for Enhanced CT)."""
    arr = ds.pixel_array.astype(np.float64)
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        return [arr * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))]
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        group = frame if "PixelValueTransformationSequence" in frame else shared
        item = group.PixelValueTransformationSequence[0]
        out.append(arr[i] * float(item.RescaleSlope) + float(item.RescaleIntercept))
    return out


@pytest.mark.parametrize("relative", _shared_files() or ["<no shared data>"])
def test_shared_file_converted_correctly_or_rejected(shared_data, relative):
    path = shared_data / relative
    if relative in EXPECTED_REJECTIONS or relative.endswith(NON_DICOM_SUFFIXES):
        expected = EXPECTED_REJECTIONS.get(relative, dicom.NOT_DICOM)
        with pytest.raises(dicom.NotUsableCT) as info:
            dicom.read_slices(path)
        assert info.value.reason == expected, info.value
        return
    slices = dicom.read_slices(path)
    ds = pydicom.dcmread(path)
    expected = _direct_hu(ds)
    assert len(slices) == len(expected)
    padding = ds.get("PixelPaddingValue")
    raw = ds.pixel_array
    for index, ((hu, info), want) in enumerate(zip(slices, expected)):
        assert hu.shape == want.shape == (info.rows, info.columns)
        mask = np.ones(hu.shape, bool)
        if padding is not None:
            frame_raw = raw if raw.ndim == 2 else raw[index]
            mask = frame_raw != padding
            assert (hu[~mask] == -1024).all()
        np.testing.assert_allclose(hu[mask], want[mask], atol=1e-3)
        assert info.pixel_spacing_mm[0] > 0 and np.isfinite(info.z_mm)


def test_all_zero_orientation_is_bad_geometry_not_axial():
    """Issue 27: a zero normal used to fall back to +z and pass as an axial slice."""
    for orientation in ([0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]):
        with pytest.raises(dicom.NotUsableCT, match="bad_geometry: ImageOrientationPatient does not define a plane"):
            geometry("f.dcm", [0, 0, 0], orientation, [0.7, 0.7])
