"""ldct_tf.denoise and the derived-series writer in ldct_tf.dicom: DICOM in, denoised DICOM out.

The output must hold exactly what the model returned (within the 1 HU that integer storage allows), be valid DICOM
(dciodvfy, where installed), keep every geometry / patient / study tag, carry new valid UIDs, and never touch the
input.  Most tests use a plain numpy denoiser (the core takes any callable); the SavedModel tests export a tiny
smoke-config generator once per module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, UID, generate_uid
from scipy import ndimage

from ldct_tf import denoise, dicom
from ldct_tf.denoise import __main__ as denoise_cli
from ldct_tf.demo import sample_data
from tests.conftest import IN_CI, missing

MODEL = denoise.ModelInfo("test_denoiser", "7", "a test function")
GEOMETRY_AND_IDENTITY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                         "SliceLocation", "Rows", "Columns", "FrameOfReferenceUID", "StudyInstanceUID", "PatientID",
                         "PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber", "InstanceNumber",
                         "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope",
                         "RescaleIntercept", "KVP", "ConvolutionKernel")
DCIODVFY = shutil.which("dciodvfy")
# Outside CI a missing validator skips these tests; in CI (CI=true) they run and fail (tests/conftest.py: missing).
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None and not IN_CI,
                                    reason="dciodvfy (Debian dicom3tools) not installed")


def smooth_and_shift(hu: np.ndarray) -> np.ndarray:
    """A deterministic 'denoiser' that visibly changes every slice (so copying the input back would fail)."""
    assert hu.ndim == 3 and hu.dtype == np.float32
    return ndimage.uniform_filter(hu, size=(1, 5, 5)) + 3.3


def digest(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def dciodvfy_errors(path: Path) -> set[str]:
    if DCIODVFY is None:
        missing("dciodvfy (Debian dicom3tools) not installed")
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")}


def source_of(derived: Path, out: Path, inp: Path) -> Path:
    """The input file a derived file was made from (output files are named by the instance number, not after their
    inputs): the file in the same folder (relative to the roots) whose SOP Instance UID the derived file's Source
    Image Sequence references."""
    wanted = pydicom.dcmread(derived, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID

    def uid(path: Path):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
        except Exception:  # noqa: BLE001 - a file that is not DICOM is no source
            return None

    folder = inp / derived.parent.relative_to(out) if inp.is_dir() else inp.parent
    matches = [p for p in folder.iterdir() if p.is_file() and uid(p) == wanted]
    assert len(matches) == 1, (derived, matches)
    return matches[0]


def expected_hu(source: Path, denoised: np.ndarray) -> np.ndarray:
    """What the file should hold: the model output stored in the source's integer type and rescale, read back as HU."""
    ds, _, _ = dicom.read_ct_dataset(source)
    stored = dicom.hu_to_stored(denoised, ds)
    return stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture()
def ct_small_series(tmp_path) -> Path:
    """A 3-slice series of pydicom's bundled CT_small.dcm (a valid CT Image Storage file), rolled per slice, plus a
    text file and a truncated DICOM that must be skipped."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "input" / "study1" / "series1"
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for i in range(3):
        ds = source.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 5.0 * i]
        ds.SliceLocation = -75.7 + 5.0 * i
        ds.PixelData = np.roll(source.pixel_array, 7 * i, axis=1).astype(source.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice{3 - i}.dcm", enforce_file_format=True)  # file names in reverse slice order
    (folder / "notes.txt").write_text("not a DICOM file\n")
    other = source.copy()  # a broken file of ANOTHER series: skipped alone (one of this series would refuse it)
    other.SeriesInstanceUID = other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.save_as(folder / "broken.dcm", enforce_file_format=True)
    good = (folder / "broken.dcm").read_bytes()
    (folder / "broken.dcm").write_bytes(good[: len(good) // 3])
    return tmp_path / "input"


# ------------------------------------------------------------------------------------------- core, any denoiser

def test_derived_series_holds_model_output_and_keeps_tags(ct_small_series, tmp_path, caplog):
    before = digest(ct_small_series)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ldct_tf.denoise"):
        summary = denoise.denoise(ct_small_series, out, smooth_and_shift, MODEL, batch_size=2, progress=False)

    assert digest(ct_small_series) == before, "the input folder was modified"
    assert (summary.series, summary.slices) == (1, 3)
    assert sorted(Path(s.path).name for s in summary.skipped) == ["broken.dcm", "notes.txt"]
    for name in ("broken.dcm", "notes.txt"):
        assert any(name in record.getMessage() for record in caplog.records), f"no warning names {name}"

    inputs = sorted((ct_small_series / "study1" / "series1").glob("slice*.dcm"), reverse=True)  # slice3: instance 1
    outputs = sorted((out / "study1" / "series1").glob("*.dcm"))
    # named by the instance number, never by the input's file name (issue 26: it can embed the source's UID)
    assert [p.name for p in outputs] == ["IM_00001.dcm", "IM_00002.dcm", "IM_00003.dcm"]
    series_uids, sop_uids = set(), set()
    for src_path, out_path in zip(inputs, outputs):
        src, hu_in, _ = dicom.read_ct_dataset(src_path)
        got, hu_out, _ = dicom.read_ct_dataset(out_path)
        model_out = smooth_and_shift(hu_in[np.newaxis])[0]
        assert np.abs(hu_out - model_out).max() <= 1.0  # integer storage: within 1 HU of the model output
        assert np.abs(hu_out - hu_in).mean() > 2.0  # and really the model's output, not the input copied back
        for keyword in GEOMETRY_AND_IDENTITY:
            assert got.get(keyword) == src.get(keyword), keyword
        assert got.pixel_array.dtype == src.pixel_array.dtype
        assert list(got.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert got.SeriesDescription == (src.get("SeriesDescription", "") + " denoised test_denoiser v7").strip()
        assert "test_denoiser" in got.DerivationDescription and "version 7" in got.DerivationDescription
        assert got.SeriesNumber == src.SeriesNumber + 1000
        assert got.SOPInstanceUID != src.SOPInstanceUID and got.SeriesInstanceUID != src.SeriesInstanceUID
        assert got.file_meta.MediaStorageSOPInstanceUID == got.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        for uid in (got.SOPInstanceUID, got.SeriesInstanceUID):
            assert UID(uid).is_valid and len(uid) <= 64
        series_uids.add(got.SeriesInstanceUID)
        sop_uids.add(got.SOPInstanceUID)
    assert len(series_uids) == 1 and len(sop_uids) == 3


@needs_dciodvfy
def test_derived_files_pass_dciodvfy(ct_small_series, tmp_path):
    out = tmp_path / "out"
    denoise.denoise(ct_small_series, out, smooth_and_shift, MODEL, progress=False)
    inp = next((ct_small_series / "study1" / "series1").glob("slice*.dcm"))
    assert dciodvfy_errors(inp) == set(), "the test input itself should be valid"
    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == 3
    for path in outputs:
        assert dciodvfy_errors(path) == set(), path


def test_values_beyond_the_stored_range_are_clipped(ct_small_series, tmp_path):
    out = tmp_path / "out"
    denoise.denoise(ct_small_series, out, lambda hu: np.where(hu > 0, 40000.0, -40000.0).astype(np.float32), MODEL,
                    progress=False)
    got = pydicom.dcmread(next(out.rglob("IM_00003.dcm")))  # slice1.dcm holds instance 3
    stored = got.pixel_array
    assert stored.dtype == np.int16 and int(got.BitsStored) == 16
    assert set(np.unique(stored)) <= {-32768, 32767}  # saturated, never wrapped around
    assert (stored == 32767).any() and (stored == -32768).any()


def test_stored_range_follows_bits_stored():
    ds = pydicom.Dataset()
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    assert dicom.stored_value_range(ds) == (0, 4095)
    stored = dicom.hu_to_stored(np.array([-2000.0, -1024.0, 0.4, 3071.0, 5000.0]), ds)
    assert stored.dtype == np.uint16 and stored.tolist() == [0, 0, 1024, 4095, 4095]
    ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 1, 0.5, 0
    assert dicom.stored_value_range(ds) == (-2048, 2047)
    assert dicom.hu_to_stored(np.array([-10.0, 10.2, 5000.0]), ds).tolist() == [-20, 20, 2047]


def test_padding_is_kept_and_never_produced(tmp_path):
    hu = sample_data.ct_small_hu()
    hu[:, :10] = -3024  # outside the field of view
    path = sample_data.write_ct_slice(tmp_path / "in" / "a.dcm", hu, sample_data.Identity("ID1", "Doe^J"),
                                      series_uid=generate_uid(), instance=1, z_mm=0.0, signed=True,
                                      padding_value=-3024)
    source, hu_in, _ = dicom.read_ct_dataset(path)
    denoised = np.full(hu_in.shape, -3024.0, np.float32)  # a model output that would collide with the padding value
    ds = dicom.derived_dataset(source, denoised, dicom.DerivedSeries.new("test"))
    stored = ds.pixel_array
    assert (stored[:, :10] == -3024).all()  # padding kept
    assert (stored[:, 10:] != -3024).all()  # denoised pixels moved off the padding value, by one
    assert np.abs(stored[:, 10:].astype(int) + 3024).max() == 1


def test_compressed_input_is_written_uncompressed(tmp_path):
    base = sample_data.ct_small_hu()
    identity = sample_data.Identity("ID2", "Roe^R")
    folder = tmp_path / "in"
    sample_data.write_series(folder / "rle", [base, np.roll(base, 3, 0)], identity, transfer_syntax=RLELossless)
    sample_data.write_series(folder / "j2k", [base], identity, transfer_syntax=JPEG2000Lossless, signed=True)
    out = tmp_path / "out"
    summary = denoise.denoise(folder, out, smooth_and_shift, MODEL, progress=False)
    assert (summary.series, summary.slices) == (2, 3)
    for path in sorted(out.rglob("*.dcm")):
        source = source_of(path, out, folder)
        got = pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.pixel_array.dtype == pydicom.dcmread(source).pixel_array.dtype
        hu_out, _ = dicom.read_slice(path)
        hu_in, _ = dicom.read_slice(source)
        assert np.abs(hu_out - expected_hu(source, smooth_and_shift(hu_in[None])[0])).max() == 0


def test_folder_of_studies_keeps_series_apart(sample, tmp_path):
    out = tmp_path / "out"
    summary = denoise.denoise(sample.root, out, smooth_and_shift, MODEL, batch_size=2, progress=False)
    n_series = len(sample.identities) * 2
    assert (summary.series, summary.slices) == (n_series, 3 * n_series)
    assert [s.path for s in summary.skipped] == [str(sample.dose_manifest)]  # doses.csv is not DICOM
    series = {}
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source = pydicom.dcmread(source_of(path, out, sample.root), stop_before_pixels=True)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        series.setdefault(ds.SeriesInstanceUID, set()).add((path.parent, source.SeriesInstanceUID))
    assert len(series) == n_series
    assert all(len(members) == 1 for members in series.values())  # one folder and one source series per output


def test_refuses_output_inside_input(ct_small_series):
    before = digest(ct_small_series)
    for output in (ct_small_series, ct_small_series / "denoised", ct_small_series / "study1" / "x"):
        with pytest.raises(denoise.DenoiseError, match="inside the input"):
            denoise.denoise(ct_small_series, output, smooth_and_shift, MODEL, progress=False)
    assert digest(ct_small_series) == before
    assert not (ct_small_series / "denoised").exists()


def test_single_file_never_overwrites_itself_or_earlier_output(ct_small_series, tmp_path):
    one = ct_small_series / "study1" / "series1" / "slice2.dcm"
    before = one.read_bytes()
    with pytest.raises(denoise.DenoiseError, match="the input file's folder"):
        denoise.denoise(one, one.parent, smooth_and_shift, MODEL, progress=False, overwrite=True)
    assert one.read_bytes() == before
    out = tmp_path / "out"
    assert denoise.denoise(one, out, smooth_and_shift, MODEL, progress=False).slices == 1
    # + the change audit (issue 16), the run's summary (issue 26) and the record of what was written (for
    # --overwrite, issue 27)
    assert sorted(p.name for p in out.iterdir()) == [".ldct_tf_denoise_outputs.json", "IM_00002.dcm", "audit",
                                                     "summary.md"]
    with pytest.raises(denoise.DenoiseError, match="already exists"):
        denoise.denoise(one, out, smooth_and_shift, MODEL, progress=False)
    assert denoise.denoise(one, out, smooth_and_shift, MODEL, progress=False, overwrite=True).slices == 1


def test_model_returning_a_wrong_shape_is_an_error(ct_small_series, tmp_path):
    with pytest.raises(denoise.DenoiseError, match="returned shape"):
        denoise.denoise(ct_small_series, tmp_path / "out", lambda hu: hu[:, :-1], MODEL, progress=False)


def test_cli_without_a_model_says_how_to_get_one(ct_small_series, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(denoise, "DEFAULT_MODEL", tmp_path / "saved_models" / "ldct_denoiser")
    assert denoise_cli.main([str(ct_small_series), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no exported model" in err and "python -m ldct_tf.export" in err
    assert not (tmp_path / "out").exists()


def test_cli_with_nothing_to_denoise_fails(tmp_path, capsys, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    monkeypatch.setattr(denoise, "load_saved_model", lambda path, batch_size, strength=None: (smooth_and_shift, MODEL))
    assert denoise_cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "no usable CT slices" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- a real SavedModel

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """The smoke config's generator, exported once.  Its output head is set so that it really changes the image (an
    untrained generator starts as the identity, and a test that passes on the identity would prove nothing)."""
    import keras

    from ldct_tf import config as config_lib
    from ldct_tf.export import export_generator
    from ldct_tf.models.generator import build_generator

    repo = Path(__file__).resolve().parents[2]
    m = config_lib.load(repo / "configs" / "smoke.yaml").model
    keras.utils.set_random_seed(3)
    generator = build_generator(m.depth, m.base_filters, m.residual_blocks, m.attention, m.norm,
                                name="low_to_normal")
    head = generator.get_layer("noise")
    kernel, bias = head.get_weights()
    head.set_weights([np.random.default_rng(0).normal(0, 0.02, kernel.shape).astype(np.float32),
                      np.full(bias.shape, 0.01, np.float32)])
    folder = tmp_path_factory.mktemp("saved_models") / "ldct_denoiser"
    export_generator(generator, folder, warmup_size=0, serving_base=None)
    return folder


@pytest.fixture(scope="module")
def model_denoiser(saved_model):
    from ldct_tf.export import SavedModelDenoiser

    return SavedModelDenoiser(saved_model)


@pytest.mark.slow
@needs_dciodvfy
def test_cli_with_saved_model(ct_small_series, saved_model, model_denoiser, tmp_path, capsys):
    out = tmp_path / "out"
    assert denoise_cli.main([str(ct_small_series), str(out), "--model", str(saved_model), "--batch-size", "2",
                             "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "denoised 1 series, 3 slices" in printed.out and "slices/s" in printed.out
    assert "broken.dcm" in printed.err and "notes.txt" in printed.err
    for path in sorted(out.rglob("*.dcm")):
        source = source_of(path, out, ct_small_series)
        hu_in, _ = dicom.read_slice(source)
        hu_out, _ = dicom.read_slice(path)
        model_out = model_denoiser(hu_in)
        assert np.abs(model_out - hu_in).mean() > 5.0  # the model changes the image
        assert np.abs(hu_out - expected_hu(source, model_out)).max() <= 1.0
        ds = pydicom.dcmread(path)
        assert "ldct_denoiser" in ds.DerivationDescription and "version 1" in ds.DerivationDescription
        assert ds.SeriesDescription.endswith("denoised ldct_denoiser v1")
        assert dciodvfy_errors(path) == set(), path


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_cli_with_tf_serving(ct_small_series, saved_model, model_denoiser, tmp_path, capsys, protocol):
    """--server: the same files as with the local model, through TF Serving's REST and gRPC APIs (served on loopback
    by the test fixture, which runs the real PredictionService)."""
    from ldct_tf.testing.model_server import serve

    with serve(saved_model.parent, saved_model.name) as (rest_url, grpc_target):
        url = rest_url if protocol == "rest" else f"grpc://{grpc_target}"
        out = tmp_path / "out"
        assert denoise_cli.main([str(ct_small_series), str(out), "--server", url, "--no-progress"]) == 0
        assert denoise_cli.main([str(ct_small_series), str(tmp_path / "x"), "--server", url, "--server-model", "nope",
                                 "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "denoised 1 series, 3 slices" in printed.out
    assert "model 'nope'" in printed.err and not (tmp_path / "x").exists()
    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == 3
    for path in outputs:
        source = source_of(path, out, ct_small_series)
        hu_in, _ = dicom.read_slice(source)
        hu_out, _ = dicom.read_slice(path)
        assert np.abs(hu_out - expected_hu(source, model_denoiser(hu_in))).max() <= 1.0
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "version 1 via TF Serving" in ds.DerivationDescription


@pytest.mark.slow
@needs_dciodvfy
def test_cli_strength_mixes_and_is_recorded_in_the_derived_files(ct_small_series, saved_model, model_denoiser,
                                                                  tmp_path, capsys):
    """--strength S: the files hold input + S * (network output - input), 0 the input's own stored values, and each
    derived file says which model and which strength made it, in valid DICOM."""
    for strength in ("0.5", "0"):
        out = tmp_path / f"out{strength}"
        assert denoise_cli.main([str(ct_small_series), str(out), "--model", str(saved_model), "--strength", strength,
                             "--no-progress", "--no-audit"]) == 0
        assert f"strength {float(strength):g} (0 = input unchanged" in capsys.readouterr().out
        outputs = sorted(out.rglob("*.dcm"))
        assert len(outputs) == 3
        for path in outputs:
            source = source_of(path, out, ct_small_series)
            hu_in, _ = dicom.read_slice(source)
            hu_out, _ = dicom.read_slice(path)
            network = model_denoiser(hu_in, strength=1.0)
            if strength == "0":
                assert np.array_equal(pydicom.dcmread(path).pixel_array, pydicom.dcmread(source).pixel_array)
            else:
                assert np.abs(hu_out - expected_hu(source, (hu_in + network) / 2)).max() <= 1.0
                assert np.abs(hu_out - expected_hu(source, network)).max() > 5.0
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            recorded = f"version 1 via SavedModel, strength {float(strength):g} (0 = input unchanged"
            assert recorded in ds.DerivationDescription
            contribution = ds.ContributingEquipmentSequence[-1].ContributionDescription
            assert "ldct_denoiser version 1" in contribution and recorded.split(", ")[1] in contribution
            assert dciodvfy_errors(path) == set(), path
    # Without --strength: the model's default, named in the files too.
    default = tmp_path / "default"
    assert denoise_cli.main([str(ct_small_series), str(default), "--model", str(saved_model), "--no-progress",
                         "--no-audit"]) == 0
    first = pydicom.dcmread(sorted(default.rglob("*.dcm"))[0], stop_before_pixels=True)
    assert "strength 1 (0 = input unchanged" in first.DerivationDescription


@pytest.mark.parametrize("strength", ["1.5", "-0.1", "nan", "inf"])
def test_cli_strength_outside_0_1_is_one_line_and_writes_nothing(ct_small_series, tmp_path, capsys, strength):
    out = tmp_path / "out"
    assert denoise_cli.main([str(ct_small_series), str(out), "--model", str(tmp_path / "no_model"), "--strength",
                         strength, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"python -m ldct_tf.denoise: error: strength must be a finite number in [0, 1], got {float(strength)!r}"
    assert not out.exists()
    with pytest.raises(denoise.DenoiseError, match="strength must be a finite number"):
        denoise.connect_server("http://127.0.0.1:9", strength=float(strength))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_strength_through_tf_serving(ct_small_series, saved_model, model_denoiser, tmp_path, capsys, protocol):
    """--server --strength: sent in the strength signatures, the same files as the local model at that strength; a
    model exported before the control (the shipped version 2) is refused in one line."""
    from ldct_tf.testing.model_server import serve

    with serve(saved_model.parent, saved_model.name) as (rest_url, grpc_target):
        url = rest_url if protocol == "rest" else f"grpc://{grpc_target}"
        out = tmp_path / "out"
        assert denoise_cli.main([str(ct_small_series), str(out), "--server", url, "--strength", "0.25",
                             "--no-progress", "--no-audit"]) == 0
    for path in sorted(out.rglob("*.dcm")):
        source = source_of(path, out, ct_small_series)
        hu_in, _ = dicom.read_slice(source)
        hu_out, _ = dicom.read_slice(path)
        assert np.abs(hu_out - expected_hu(source, model_denoiser(hu_in, strength=0.25))).max() <= 1.0
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "version 1 via TF Serving, strength 0.25 (0 = input unchanged" in ds.DerivationDescription
    shipped = Path(__file__).resolve().parents[2] / "saved_models"
    if not (shipped / "ldct_denoiser" / "2" / "saved_model.pb").exists():
        pytest.skip("shipped version 2 not in this checkout")
    old_root = tmp_path / "served_v2"  # version 2 alone: the stand-in serves the newest version only
    shutil.copytree(shipped / "ldct_denoiser" / "2", old_root / "ldct_denoiser" / "2")
    with serve(old_root, "ldct_denoiser") as (rest_url, grpc_target):
        url = rest_url if protocol == "rest" else f"grpc://{grpc_target}"
        assert denoise_cli.main([str(ct_small_series), str(tmp_path / "old"), "--server", url, "--strength", "0.5",
                             "--no-progress", "--no-audit"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("model 'ldct_denoiser' has no strength input (exported before the strength control); "
                            "leave the strength at the model's default")
    assert not (tmp_path / "old").exists() or not list((tmp_path / "old").rglob("*.dcm"))


@pytest.mark.slow
def test_358x512_slice(tmp_path, model_denoiser):
    """A height that is not a multiple of the network's 2**depth: padded and cropped back inside the SavedModel."""
    base = sample_data.ct_small_hu()
    hu = np.tile(base, (3, 4))[:358, :512]
    path = sample_data.write_ct_slice(tmp_path / "in" / "wide.dcm", hu, sample_data.Identity("ID3", "Poe^P"),
                                      series_uid=generate_uid(), instance=1, z_mm=0.0)
    out = tmp_path / "out"
    summary = denoise.denoise(path, out, model_denoiser, MODEL, progress=False)
    assert summary.slices == 1
    hu_in, _ = dicom.read_slice(path)
    hu_out, info = dicom.read_slice(next(out.glob("*.dcm")))
    assert hu_out.shape == (358, 512) == (info.rows, info.columns)
    assert np.abs(hu_out - expected_hu(path, model_denoiser(hu_in))).max() <= 1.0


# ------------------------------------------------------------------------------------------- real CT (shared data)

def test_abdomen_series_without_uids(shared_data, tmp_path):
    """20 JPEG 2000 slices whose SOP Class, Study, Series and SOP Instance UIDs are blank: one derived series with
    one generated study UID, the frame of reference kept, written uncompressed."""
    folder = shared_data / "abdomen_series" / "dicom"
    out = tmp_path / "out"
    summary = denoise.denoise(folder, out, smooth_and_shift, MODEL, batch_size=8, progress=False)
    inputs = sorted(p for p in folder.iterdir() if p.is_file())
    assert (summary.series, summary.slices, summary.skipped) == (1, len(inputs), [])
    studies, series, sops = set(), set(), set()
    derived = {source_of(path, out, folder): path for path in out.glob("*.dcm")}
    for source in inputs:
        got = pydicom.dcmread(derived[source])
        src = pydicom.dcmread(source)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.SOPClassUID == src.file_meta.MediaStorageSOPClassUID
        assert got.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert got.ImagePositionPatient == src.ImagePositionPatient and got.PixelSpacing == src.PixelSpacing
        assert "PatientID" in got and got.PatientID == ""  # blank stays blank: nothing is invented for the patient
        assert got.SourceImageSequence[0].ReferencedSOPInstanceUID == src.file_meta.MediaStorageSOPInstanceUID
        studies.add(got.StudyInstanceUID)
        series.add(got.SeriesInstanceUID)
        sops.add(got.SOPInstanceUID)
    assert len(studies) == 1 and len(series) == 1 and len(sops) == len(inputs)
    assert all(UID(u).is_valid for u in studies | series | sops)
    source = inputs[0]
    hu_in, _ = dicom.read_slice(source)
    hu_out, _ = dicom.read_slice(derived[source])
    assert np.abs(hu_out - expected_hu(source, smooth_and_shift(hu_in[None])[0])).max() == 0
    if DCIODVFY or IN_CI:
        # the input as the validator would see it with its SOP class and instance filled in from the file meta
        patched = pydicom.dcmread(source)
        patched.SOPClassUID = patched.file_meta.MediaStorageSOPClassUID
        patched.SOPInstanceUID = patched.file_meta.MediaStorageSOPInstanceUID
        patched.save_as(tmp_path / "patched.dcm", enforce_file_format=True)
        baseline = {e for e in dciodvfy_errors(tmp_path / "patched.dcm") if "UID" not in e}
        assert dciodvfy_errors(out / source.name) <= baseline


@pytest.mark.parametrize("relative", ["mayo_pairs/quarter_dose/L096_D45f_00.IMA", "edge_cases/orthanc/SignedCT.dcm",
                                      "edge_cases/693_J2KI.dcm", "edge_cases/bad_sequence.dcm",
                                      "edge_cases/orthanc/Comunix/Ct/IM-0001-0001.dcm"])
def test_real_file_round_trip(shared_data, tmp_path, relative):
    """Real vendors' files: model output written back exactly (after storage rounding and clipping); the validator
    finds no error that the input does not already have (the Mayo file: none at all)."""
    source = shared_data / relative
    out = tmp_path / "out"
    assert denoise.denoise(source, out, smooth_and_shift, MODEL, progress=False).slices == 1
    hu_in, _ = dicom.read_slice(source)
    derived = next(out.glob("*.dcm"))
    assert source.stem not in derived.name  # named by the instance number, never after the input
    hu_out, _ = dicom.read_slice(derived)
    src_ds, _, _ = dicom.read_ct_dataset(source)
    keep = np.ones(hu_in.shape, bool)
    if "PixelPaddingValue" in src_ds:  # padding pixels keep their stored value, whatever the model said
        keep = src_ds.pixel_array != src_ds.PixelPaddingValue
    diff = np.abs(hu_out - expected_hu(source, smooth_and_shift(hu_in[None])[0]))
    assert diff[keep].max() <= 1.0
    if DCIODVFY or IN_CI:
        errors = dciodvfy_errors(derived)
        assert errors <= dciodvfy_errors(source), sorted(errors - dciodvfy_errors(source))
        if relative.startswith("mayo"):
            assert errors == set()


class CountingDenoiser:
    """smooth_and_shift that counts its calls and can fail on a chosen call (a model or server dying mid-series)."""

    def __init__(self, fail_on_call: int = 0):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, hu):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise denoise.DenoiseError("model server went away")
        return smooth_and_shift(hu)


def _two_series(root: Path) -> tuple[Path, Path]:
    hu = np.rint(sample_data.ct_small_hu())
    ident = sample_data.Identity("MRN0000777", "Roe^Rita")
    good = sample_data.write_series(root / "in" / "good", [hu, hu + 1, hu + 2], ident)
    bad = sample_data.write_series(root / "in" / "bad", [hu, hu + 1, hu + 2], ident)
    ds = pydicom.dcmread(bad[1])
    ds.RescaleSlope = 0  # a header error: a constant -1024 HU slice that the writer cannot invert
    ds.save_as(bad[1], enforce_file_format=True)
    return root / "in", root / "out"


def test_series_with_an_implausible_slice_is_not_written_at_all(tmp_path, caplog):
    source, out = _two_series(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldct_tf.denoise"):
        summary = denoise.denoise(source, out, smooth_and_shift, MODEL, progress=False)
    assert summary.series == 1 and summary.slices == 3
    assert sorted(p.relative_to(out).parts[0] for p in out.rglob("*.dcm")) == ["good"] * 3
    assert not (out / "bad").exists() and not list(out.glob(".ldct_tf-partial-*"))
    reasons = {Path(s.path).name: s.reason.split(":")[0] for s in summary.skipped}
    assert reasons == {"IM0002.dcm": "implausible_rescale", "IM0001.dcm": "series_not_written",
                       "IM0003.dcm": "series_not_written"}
    assert any("not written: 1 of its 3 slices are unusable" in r.getMessage() for r in caplog.records)
    assert [r.reasons for r in summary.refused] == [("IM0002.dcm: implausible_rescale",)]


def test_a_failure_mid_series_leaves_no_partial_series(tmp_path):
    hu = np.rint(sample_data.ct_small_hu())
    ident = sample_data.Identity("MRN0000778", "Roe^Rob")
    sample_data.write_series(tmp_path / "in" / "s", [hu + i for i in range(4)], ident)
    out = tmp_path / "out"
    with pytest.raises(denoise.DenoiseError, match="went away"):
        denoise.denoise(tmp_path / "in", out, CountingDenoiser(fail_on_call=2), MODEL, batch_size=2, progress=False)
    assert [p for p in out.rglob("*") if p.is_file()] == []  # neither the first batch nor a staging folder
    # so a re-run needs no --overwrite, and writes the whole series
    assert denoise.denoise(tmp_path / "in", out, smooth_and_shift, MODEL, batch_size=2, progress=False).slices == 4


def test_unwritable_or_too_long_output_fails_before_the_model_runs(ct_small_series, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    model = CountingDenoiser()
    for output, message in ((blocker / "out", "is a file, not a folder"),
                            (tmp_path / ("x" * 300), "name would be 300 bytes"),
                            (tmp_path.joinpath(*["d" * 250] * 17), "bytes long, more than")):
        with pytest.raises(denoise.DenoiseError, match=message):
            denoise.denoise(ct_small_series, output, model, MODEL, progress=False)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(denoise.DenoiseError, match="not writable"):
            denoise.denoise(ct_small_series, locked / "out", model, MODEL, progress=False)
    assert model.calls == 0
    # The CLI says it in one line, before loading any model.
    assert denoise_cli.main([str(ct_small_series), str(blocker / "out"), "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]


# ------------------------------------------------------------------------------------------- issue 27
def _series(folder: Path, n: int, identity=None, series_uid: str | None = None) -> list[Path]:
    hu = np.rint(sample_data.ct_small_hu())
    identity = identity or sample_data.Identity("MRN0000901", "Poe^Pat")
    paths = sample_data.write_series(folder, [hu + i for i in range(n)], identity)
    if series_uid is not None:
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = series_uid
            ds.save_as(path, enforce_file_format=True)
    return paths


def test_two_series_planned_to_one_folder_is_an_error_not_an_overwrite(tmp_path, capsys, monkeypatch):
    """The issue's layout: two series side by side plus a subfolder ``series_1/`` (what an earlier output leaves)."""
    root = tmp_path / "in"
    _series(root, 2)
    for path in _series(tmp_path / "tmp", 2):
        path.rename(root / f"B{path.name}")
    _series(root / "series_1", 2)
    out = tmp_path / "out"
    with pytest.raises(denoise.DenoiseError, match="two input series would be written here"):
        denoise.denoise(root, out, smooth_and_shift, MODEL, progress=False)
    assert not out.exists() or [p for p in out.rglob("*.dcm")] == []
    monkeypatch.setattr(denoise, "load_saved_model", lambda path, batch_size, strength=None: (smooth_and_shift, MODEL))
    assert denoise_cli.main([str(root), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two input series would be written here" in err[0]


@pytest.mark.parametrize("damage", ["truncated", "short_pixels", "huge_header", "multi_frame", "burned_in"])
def test_a_series_with_an_unusable_slice_is_refused_whole_with_a_nonzero_exit(tmp_path, capsys, monkeypatch,
                                                                                damage):
    root = tmp_path / "in"
    good = _series(root / "good", 2)
    bad = _series(root / "bad", 3, sample_data.Identity("MRN0000902", "Doe^Dan"))
    ds = pydicom.dcmread(bad[1])
    if damage == "truncated":
        raw = bad[1].read_bytes()
        bad[1].write_bytes(raw[: len(raw) - 5000])
    elif damage == "short_pixels":
        ds.PixelData = ds.PixelData[:100]
        ds.save_as(bad[1], enforce_file_format=True)
    elif damage == "huge_header":  # a header claiming a 5000x5000 slice (9.2 GB to denoise) over its real pixels
        ds.Rows = ds.Columns = 5000
        ds.save_as(bad[1], enforce_file_format=True)
    elif damage == "multi_frame":
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
        ds.save_as(bad[1], enforce_file_format=True)
    else:
        ds.BurnedInAnnotation = "YES"
        ds.save_as(bad[1], enforce_file_format=True)
    deidentify = ["--deidentify"] if damage == "burned_in" else []
    monkeypatch.setattr(denoise, "load_saved_model", lambda path, batch_size, strength=None: (smooth_and_shift, MODEL))
    out = tmp_path / "out"
    assert denoise_cli.main([str(root), str(out), "--no-progress", "--no-audit", *deidentify]) == 1
    captured = capsys.readouterr()
    assert "not written: 1 of its 3 slices are unusable: IM0002.dcm" in captured.err
    assert "Doe" not in captured.err and "MRN0000902" not in captured.err
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == len(good)  # the good series whole, nothing of the bad one
    assert {pydicom.dcmread(p).PatientName.family_name for p in written} != {"Doe"}


def test_two_patients_sharing_a_series_uid_are_two_derived_series(tmp_path):
    uid = generate_uid()
    _series(tmp_path / "in" / "a", 2, sample_data.Identity("MRN0000903", "Aa^Al"), series_uid=uid)
    _series(tmp_path / "in" / "b", 2, sample_data.Identity("MRN0000904", "Bb^Bo"), series_uid=uid)
    out = tmp_path / "out"
    summary = denoise.denoise(tmp_path / "in", out, smooth_and_shift, MODEL, progress=False, audit_series=False)
    assert (summary.series, summary.slices) == (2, 4)
    by_series = {}
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, set()).add(ds.PatientID)
    assert sorted(by_series.values(), key=sorted) == [{"MRN0000903"}, {"MRN0000904"}]


def test_non_numeric_rescale_intercept_is_refused_not_read_as_zero(tmp_path):
    paths = _series(tmp_path / "in", 2)
    ds = pydicom.dcmread(paths[0])
    ds.RescaleIntercept = "-1023.75"
    ds.save_as(paths[0], enforce_file_format=True)
    raw = paths[0].read_bytes()
    assert raw.count(b"-1023.75") == 1
    paths[0].write_bytes(raw.replace(b"-1023.75", b"unknown "))
    with pytest.raises(dicom.NotUsableCT, match="implausible_rescale: RescaleIntercept is not a number"):
        dicom.read_ct_dataset(paths[0])
    summary = denoise.denoise(tmp_path / "in", tmp_path / "out", smooth_and_shift, MODEL, progress=False)
    assert summary.slices == 0 and summary.refused[0].reasons[0].endswith("implausible_rescale")


def test_slices_above_max_pixels_are_refused_before_decoding(tmp_path, monkeypatch):
    _series(tmp_path / "in", 2)  # 128x128 slices
    decoded = []
    original = dicom.slices.decode_pixels
    monkeypatch.setattr("ldct_tf.dicom.read.decode_pixels", lambda ds, source: decoded.append(source) or
                        original(ds, source))
    summary = denoise.denoise(tmp_path / "in", tmp_path / "out", smooth_and_shift, MODEL, progress=False,
                              max_pixels=100 * 100)
    assert summary.slices == 0 and decoded == []
    assert [s.reason.split(":")[0] for s in summary.skipped] == ["image_too_large"] * 2
    assert denoise.denoise(tmp_path / "in", tmp_path / "out2", smooth_and_shift, MODEL, progress=False).slices == 2


def _paint_block(hu: np.ndarray) -> np.ndarray:
    """A 'denoiser' that adds a 400 HU block to every slice: the audit flags each one and writes its PNG."""
    out = hu.copy()
    out[:, 40:80, 40:80] += 400.0
    return out


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_removes_every_file_of_the_earlier_run_and_nothing_else(tmp_path):
    """Issue 27: a re-run with ``--overwrite`` and fewer slices (and no flagged slice) left the first run's extra
    slice, audit PNGs and whole other series behind.  Now exactly the recorded files go; the user's files stay."""
    root, out = tmp_path / "in", tmp_path / "out"
    _series(root / "s", 3)
    _series(root / "t", 2, sample_data.Identity("MRN0000905", "Ee^Eve"))
    first = denoise.denoise(root, out, _paint_block, MODEL, progress=False)
    assert first.flagged_slices == 5 and len(list(out.rglob("slice_*.png"))) == 5
    (out / "mine.txt").write_text("the user's own notes")
    (out / "s" / "audit" / "keep.txt").write_text("also the user's")
    (root / "s" / "IM0003.dcm").unlink()
    shutil.rmtree(root / "t")
    second = denoise.denoise(root, out, lambda hu: hu.copy(), MODEL, progress=False, overwrite=True)
    assert (second.slices, second.flagged_slices) == (2, 0)
    fresh = tmp_path / "fresh"
    denoise.denoise(root, fresh, lambda hu: hu.copy(), MODEL, progress=False)
    assert _files(out) == _files(fresh) | {"mine.txt", "s/audit/keep.txt"}  # no stale slice, PNG or series
    assert not (out / "t").exists()  # the folders the first run made and that became empty are gone
    assert (out / "mine.txt").read_text() == "the user's own notes"
    record = json.loads((out / denoise.output.RECORD_NAME).read_text())
    assert set(record["files"]) == _files(fresh) - {denoise.output.RECORD_NAME}


def test_overwrite_never_replaces_a_file_it_did_not_write(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    _series(root / "s", 2)
    (out / "s").mkdir(parents=True)
    (out / "s" / "IM_00001.dcm").write_text("a file of the user's, where denoise would write")
    with pytest.raises(denoise.DenoiseError, match="IM_00001.dcm: exists and was not written by denoise"):
        denoise.denoise(root, out, smooth_and_shift, MODEL, progress=False, overwrite=True)
    assert (out / "s" / "IM_00001.dcm").read_text().startswith("a file of the user's")
    # an audit PNG's name is known only after the model ran: refused at the series' commit, nothing of it moved
    (out / "s" / "IM_00001.dcm").unlink()
    (out / "s" / "audit").mkdir()
    (out / "s" / "audit" / "slice_0001.png").write_text("the user's picture")
    with pytest.raises(denoise.DenoiseError, match="slice_0001.png: exists and was not written by denoise"):
        denoise.denoise(root, out, _paint_block, MODEL, progress=False, overwrite=True)
    assert _files(out) == {"s/audit/slice_0001.png"}


def _within_seconds(seconds: float, fifo: Path, run):
    """``run()``'s result; a run still going after ``seconds`` (blocked opening ``fifo``) is released and fails."""
    result = []
    thread = threading.Thread(target=lambda: result.append(run()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer unblocks the reader's open()
        thread.join(seconds)
        pytest.fail(f"denoise still running after {seconds} s: it opened the FIFO")
    assert result, "denoise raised (see the thread's exception above)"
    return result[0]


def test_a_fifo_in_the_input_is_skipped_not_opened(tmp_path):
    """Issue 27: opening a FIFO waits for a writer forever; it is skipped from its stat, with the pipeline's reason."""
    root = tmp_path / "in"
    _series(root, 2)
    os.mkfifo(root / "pipe.dcm")
    (root / "link.dcm").symlink_to(root / "pipe.dcm")
    summary = _within_seconds(30, root / "pipe.dcm",
                              lambda: denoise.denoise(root, tmp_path / "out", smooth_and_shift, MODEL, progress=False))
    assert summary.slices == 2
    assert {Path(s.path).name: s.reason.split(":")[0] for s in summary.skipped} == {
        "pipe.dcm": "not_a_regular_file", "link.dcm": "not_a_regular_file"}
    alone = _within_seconds(30, root / "pipe.dcm", lambda: denoise.denoise(root / "pipe.dcm", tmp_path / "out2",
                                                                           smooth_and_shift, MODEL, progress=False))
    assert alone.slices == 0 and [s.reason.split(":")[0] for s in alone.skipped] == ["not_a_regular_file"]
