"""``make demo`` (python -m ldct_tf.demo): packaged CT -> simulated quarter dose DICOM -> denoised DICOM -> scores."""

import csv

import numpy as np
import pydicom
import pytest

from ldct_tf import demo
from ldct_tf.demo import __main__ as demo_cli
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
    assert demo_cli.main(["--out", str(out), "--model", str(test_model), "--max-slices", "1",
                          "--baseline", "gaussian"]) == 0
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
    assert demo_cli.main(["--out", str(tmp_path / "d"), "--model", str(tmp_path / "nowhere")]) == 1
    assert "no exported model" in capsys.readouterr().err


@pytest.mark.parametrize("number", ["1", "2"])
def test_shipped_model_denoises_a_packaged_slice_through_both_signatures(number):
    """Each shipped version loads, and both signatures turn a real CT slice into a plausible denoised one."""
    import tensorflow as tf
    from pydicom.data import get_testdata_file

    from ldct_tf import dicom
    from ldct_tf.demo import sample_data

    version = REPO / "saved_models" / "ldct_denoiser" / number
    assert (version / "saved_model.pb").exists() and (version / "metadata.json").exists()
    loaded = tf.saved_model.load(str(version))
    assert {"serving_default", "denoise_bytes"} <= set(loaded.signatures)
    clean, _ = dicom.read_slice(get_testdata_file("CT_small.dcm"))
    hu = np.round(sample_data.simulated_low_dose_hu(np.maximum(clean, -1024.0), 0.25, seed=0)).astype(np.float32)

    out = loaded.signatures["serving_default"](hu=tf.constant(hu[None, ..., None]))["denoised_hu"].numpy()
    assert out.shape == (1, *hu.shape, 1) and np.all(np.isfinite(out))
    change = np.abs(out[0, ..., 0] - hu)
    # A denoiser changes the slice (not the identity) without rewriting it (a mean change of tens of HU or more
    # would mean wrong scaling or a broken graph); its mean HU stays where the anatomy is.
    assert 0.5 < change.mean() < 40 and np.percentile(change, 99) < 300, (change.mean(), np.percentile(change, 99))
    assert abs(float(out.mean()) - float(hu.mean())) < 20

    raw = tf.constant([hu.astype("<i2").tobytes()])
    size = [tf.constant([hu.shape[0]], tf.int32), tf.constant([hu.shape[1]], tf.int32)]
    answer = loaded.signatures["denoise_bytes"](image_bytes=raw, height=size[0], width=size[1])["denoised_bytes"]
    from_bytes = np.frombuffer(answer.numpy()[0], "<i2").reshape(hu.shape)
    assert np.abs(from_bytes - out[0, ..., 0]).max() <= 1.0  # the same model, rounded to integer HU


def test_v3_is_the_default_and_refuses_inputs_below_its_minimum_size():
    """``saved_models/ldct_denoiser`` resolves to v3, which refuses a 3x3 input with a sentence that says why; v2
    removes more high-frequency noise from a simulated quarter-dose slice than v1.  (CT_small is a small, bony
    slice with its own noise, so it cannot rank the models on fidelity: benchmarks.quality does that on real pairs.)"""
    import tensorflow as tf
    from pydicom.data import get_testdata_file

    from ldct_tf import dicom
    from ldct_tf.demo import sample_data
    from ldct_tf.saved_model import resolve_version_dir

    root = REPO / "saved_models" / "ldct_denoiser"
    assert resolve_version_dir(root).name == "3"
    clean, _ = dicom.read_slice(get_testdata_file("CT_small.dcm"))
    clean = np.maximum(clean, -1024.0).astype(np.float32)
    hu = np.round(sample_data.simulated_low_dose_hu(clean, 0.25, seed=0)).astype(np.float32)
    from scipy import ndimage

    body = ndimage.binary_erosion(clean > -500, iterations=6)
    high_pass = {}
    for number in ("1", "2"):
        model = tf.saved_model.load(str(root / number))
        out = model.signatures["serving_default"](hu=tf.constant(hu[None, ..., None]))["denoised_hu"].numpy()[0, ..., 0]
        high_pass[number] = float((out - ndimage.gaussian_filter(out, 2))[body].std())
    assert high_pass["2"] < 0.95 * high_pass["1"], high_pass
    for number in ("2", "3"):
        model = tf.saved_model.load(str(root / number))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"is smaller than the model.*minimum of 16x16"):
            model.signatures["serving_default"](hu=tf.zeros((1, 3, 3, 1)))


def test_demo_refuses_an_out_holding_files_it_did_not_write(tmp_path, capsys):
    """--out . or --out DIR with DIR/low the input used to be deleted whole; nothing there may be lost."""
    out = tmp_path / "results"
    (out / "low").mkdir(parents=True)
    user_file = out / "low" / "slice.dcm"
    user_file.write_bytes(b"user data")
    assert demo_cli.main(["--input", str(out / "low"), "--out", str(out)]) == 1
    assert "overlaps the input" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert demo_cli.main(["--out", str(other), "--model", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "did not write" in err and len(err.strip().splitlines()) == 1
    assert user_file.read_bytes() == b"user data" and (other / "notes.txt").read_text() == "keep me"


def test_demo_rerun_replaces_only_its_own_outputs(tmp_path):
    out = tmp_path / "demo"
    demo.prepare_out(out, [])
    (out / "evaluation" / "figures").mkdir(parents=True)
    (out / "evaluation" / "figures" / "old.png").write_bytes(b"x")
    demo.prepare_out(out, [])  # a re-run: the previous run's outputs go
    assert not (out / "evaluation").exists() and (out / demo.MARKER).exists()
    (out / "mine.txt").write_text("user")  # something the demo did not write: refuse, delete nothing
    (out / "denoised_dicom").mkdir()
    with pytest.raises(demo.DemoError, match="did not write"):
        demo.prepare_out(out, [])
    assert (out / "mine.txt").exists() and (out / "denoised_dicom").exists()
