"""ldct_tf.audit / audit_scores: the per-slice change audit flags what was added or removed, and only that."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy import ndimage

from ldct_tf import audit, denoise
from ldct_tf.audit import __main__ as audit_cli
from ldct_tf.audit import scores as audit_scores
from ldct_tf.evaluate import lesions

SPACING = 0.7


def phantom(seed: int = 0, lesion: bool = True) -> tuple[np.ndarray, np.ndarray, list[lesions.Lesion]]:
    """A 256x256 'abdomen': a 60 HU body with fat rim, vessels, and (optionally) a 12 mm -35 HU lesion;
    returns (noise-free, noisy low dose, lesions).  The noise is correlated (like CT noise), SD about 25 HU."""
    rr, cc = np.mgrid[0:256, 0:256]
    clean = np.full((256, 256), -1000.0, np.float32)
    clean[np.hypot(rr - 128, cc - 128) < 120] = -100.0
    clean[np.hypot(rr - 128, cc - 128) < 110] = 60.0
    for r, c in ((90, 90), (170, 100), (100, 180)):
        clean[np.hypot(rr - r, cc - c) < 5] = 180.0
    found = [lesions.Lesion(150.0, 160.0, 12.0, -35.0)] if lesion else []
    clean += lesions.disc_image(clean.shape, found, SPACING)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(clean.shape), 0.8) * 60.0
    return clean, (clean + noise).astype(np.float32), found


def flagged_at(result: audit_scores.SliceAudit, lesion: lesions.Lesion) -> bool:
    p = result.patch_px
    r = lesion.radius_px(SPACING)
    for top, left in result.corners[result.flagged]:
        if top <= lesion.row - r and top + p >= lesion.row + r \
                and left <= lesion.col - r and left + p >= lesion.col + r:
            return True
    return False


@pytest.fixture(scope="module")
def thresholds() -> audit_scores.AuditThresholds:
    return audit_scores.load_thresholds()


def test_identity_changes_nothing_and_is_never_flagged(thresholds):
    _, low, _ = phantom()
    result = audit_scores.audit_slice(low, low.copy(), (SPACING, SPACING), thresholds)
    assert len(result.corners) > 10
    assert result.n_flagged == 0
    assert np.allclose(result.frc_band, 1.0) and result.residual_sd_hu == 0.0


def test_a_painted_disc_is_flagged_where_it_was_painted(thresholds):
    clean, low, _ = phantom(lesion=False)
    painted = lesions.Lesion(100.0, 120.0, 10.0, 30.0)
    out = low + lesions.disc_image(low.shape, [painted], SPACING)
    result = audit_scores.audit_slice(low, out, (SPACING, SPACING), thresholds)
    assert flagged_at(result, painted)
    assert result.n_flagged <= 4  # only the patches around the disc
    assert all("blob" in p["why"] for p in result.flagged_patches())


def test_an_erased_lesion_is_flagged_and_the_oracle_is_not(thresholds):
    clean, low, found = phantom()
    oracle = audit_scores.audit_slice(low, clean, (SPACING, SPACING), thresholds)
    assert not flagged_at(oracle, found[0])
    erased = clean - lesions.disc_image(clean.shape, found, SPACING)  # denoised perfectly, lesion gone
    result = audit_scores.audit_slice(low, erased, (SPACING, SPACING), thresholds)
    assert flagged_at(result, found[0])


def test_a_strong_median_filter_is_flagged_widely(thresholds):
    _, low, _ = phantom()
    result = audit_scores.audit_slice(low, lesions.median_eraser(11)(low), (SPACING, SPACING), thresholds)
    assert result.n_flagged >= 5


def test_frc_is_one_for_identical_patches_and_low_for_unrelated_ones():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 32, 32))
    curves, freq = audit_scores.frc_curves(a, a)
    assert np.allclose(curves[:, 1:], 1.0) and freq[0] == 0 and freq[-1] == 0.5
    curves, _ = audit_scores.frc_curves(a, rng.standard_normal((4, 32, 32)))
    assert np.abs(curves[:, 2:].mean()) < 0.1


def test_bad_inputs_are_refused(thresholds):
    with pytest.raises(ValueError, match="same shape|one shape"):
        audit_scores.audit_slice(np.zeros((64, 64)), np.zeros((64, 32)))
    with pytest.raises(ValueError, match="NaN"):
        audit_scores.audit_slice(np.full((64, 64), np.nan), np.zeros((64, 64)))
    with pytest.raises(ValueError, match="patch_px"):
        audit_scores.AuditThresholds(patch_px=2)


def test_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "audit.yaml"
    bad.write_text("audit:\n  patch_px: 48\n  typo_key: 1\n")
    with pytest.raises(audit.AuditConfigError, match="typo_key"):
        audit_scores.load_thresholds(bad)
    with pytest.raises(audit.AuditConfigError, match="not found"):
        audit_scores.load_thresholds(tmp_path / "missing.yaml")


def test_series_audit_writes_sidecar_and_a_png_per_flagged_slice(tmp_path, thresholds):
    clean, low, _ = phantom(lesion=False)
    auditor = audit.new_series_audit(tmp_path / "audit")
    auditor.add(low, low.copy(), (SPACING, SPACING), instance=1, sop_instance_uid="1.2.3")
    painted = lesions.Lesion(100.0, 120.0, 10.0, 30.0)
    auditor.add(low, low + lesions.disc_image(low.shape, [painted], SPACING), (SPACING, SPACING), instance=2)
    path = auditor.write()
    report = json.loads(path.read_text())
    assert report["slices"] == 2 and report["flagged_slices"] == 1
    assert report["thresholds"]["frc_min"] == thresholds.frc_min and "status" in report["provenance"]
    first, second = report["per_slice"]
    assert not first["flagged"] and "figure" not in first
    assert second["flagged"] and (tmp_path / "audit" / second["figure"]).stat().st_size > 1000
    box = second["patches_flagged"][0]["box"]
    assert box[0] <= 100 <= box[0] + box[2] and box[1] <= 120 <= box[1] + box[3]


@pytest.fixture()
def series(tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "in"
    folder.mkdir()
    uid = generate_uid()
    dtype = source.pixel_array.dtype
    for i in range(2):
        ds = source.copy()
        _, low, _ = phantom(seed=i, lesion=False)  # CT_small's header with the phantom's soft-tissue pixels
        ds.Rows, ds.Columns = low.shape
        ds.PixelSpacing = [SPACING, SPACING]
        stored = np.rint((low - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = stored.astype(dtype).tobytes()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 5.0 * i]
        ds.save_as(folder / f"s{i}.dcm", enforce_file_format=True)
    return folder


def _paint(hu: np.ndarray) -> np.ndarray:
    """A 'denoiser' that paints a 10 mm, 30 HU disc into the soft tissue of every slice of the batch."""
    disc = lesions.disc_image(hu.shape[1:], [lesions.Lesion(100.0, 120.0, 10.0, 30.0)], SPACING)
    return hu + disc[np.newaxis]


def test_denoise_writes_the_audit_by_default_and_no_audit_skips_it(series, tmp_path):
    model = denoise.ModelInfo("painter", "1", "a test function")
    summary = denoise.denoise(series, tmp_path / "out", _paint, model, progress=False)
    sidecar = tmp_path / "out" / "audit" / "audit.json"
    assert summary.audits == [sidecar]
    report = json.loads(sidecar.read_text())
    assert report["slices"] == 2 and report["flagged_slices"] == 2 and summary.flagged_slices == 2
    assert len(list((tmp_path / "out" / "audit").glob("slice_*.png"))) == 2
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "out").glob("*.dcm")}
    assert {s["sop_instance_uid"] for s in report["per_slice"]} == uids
    summary = denoise.denoise(series, tmp_path / "out2", _paint, model, progress=False, audit_series=False)
    assert summary.audits == [] and not (tmp_path / "out2" / "audit").exists()


def test_cli_audits_a_pair_of_series(series, tmp_path, capsys):
    model = denoise.ModelInfo("painter", "1", "a test function")
    denoise.denoise(series, tmp_path / "den", _paint, model, progress=False, audit_series=False)
    assert audit_cli.main([str(series), str(tmp_path / "den"), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert report["slices"] == 2 and report["flagged_slices"] == 2
    assert "2 flagged" in capsys.readouterr().out
    assert audit_cli.main([str(tmp_path / "nothing"), str(tmp_path / "den"), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err


@pytest.mark.parametrize("target", ["png", "sidecar"])
def test_a_full_disk_under_the_audit_is_one_line_and_leaves_no_partial_series(series, tmp_path, capsys,
                                                                              monkeypatch, target):
    """Issue 27 (Low): ENOSPC while writing the audit image was a bare OSError traceback mid-series."""
    import errno
    import pathlib

    from matplotlib.figure import Figure

    from ldct_tf.denoise import __main__ as denoise_cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "png":
        monkeypatch.setattr(Figure, "savefig", full)
    else:
        real_write_text = pathlib.Path.write_text
        monkeypatch.setattr(pathlib.Path, "write_text", lambda self, *a, **k: full() if self.name == audit.SIDECAR
                            else real_write_text(self, *a, **k))
    model = denoise.ModelInfo("painter", "1", "a test function")
    monkeypatch.setattr(denoise, "load_saved_model", lambda path, batch_size, strength=None: (_paint, model))
    out = tmp_path / "out"
    assert denoise_cli.main([str(series), str(out), "--no-progress", "--force"]) == 1  # the phantom: no noise
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the other line: the --force input check
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].endswith(f"{out / 'audit'}: cannot write the audit (no space left on device); its series was "
                              f"not written (free space, or pass --no-audit)")
    assert not [p for p in out.rglob("*") if p.suffix in (".dcm", ".png") or p.name.startswith(".ldct_tf-partial")]
