"""ldct_tf.denoise's input checks, duplicate instances and run overview (issue 26, items 4 and 5).

Series are written with pydicom from pydicom's bundled CT_small.dcm (real CT, 128x128): with extra noise it reads as
low dose (noise index above ``checks.NORMAL_DOSE_MAX_NOISE_HU``); smoothed it reads as normal dose.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ldct_tf import denoise
from ldct_tf.demo import sample_data
from ldct_tf.denoise import checks, overview
from ldct_tf.denoise import __main__ as denoise_cli

MODEL = denoise.ModelInfo("test_denoiser", "7", "a test function")
IDENTITY = sample_data.Identity("PID-771", "Doe^Jane")


def minus_five(hu: np.ndarray) -> np.ndarray:
    return (hu - 5.0).astype(np.float32)


def _slices(kind: str, count: int) -> list[np.ndarray]:
    base = sample_data.ct_small_hu()
    rng = np.random.default_rng(3)
    if kind == "normal":
        return [ndimage.gaussian_filter(np.roll(base, i, 1), 2.0) for i in range(count)]
    return [np.roll(base, i, 1) + rng.normal(0, 30, base.shape).astype(np.float32) for i in range(count)]


def _series(folder: Path, kind: str, count: int = 4, **kwargs) -> list[Path]:
    """A series whose file names are the source's SOP Instance UIDs, as many archives name them."""
    paths = []
    for path in sample_data.write_series(folder, _slices(kind, count), IDENTITY, **kwargs):
        named = path.with_name(f"{pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm")
        path.rename(named)
        paths.append(named)
    return paths


def test_sample_data_sits_on_either_side_of_the_threshold():
    """The fixture's premise: what the tests call low dose and normal dose is measured as such."""
    from ldct_tf import noise

    assert noise.noise_index(_slices("low", 1)[0]) > checks.NORMAL_DOSE_MAX_NOISE_HU
    assert noise.noise_index(_slices("normal", 1)[0]) < checks.NORMAL_DOSE_MAX_NOISE_HU


def test_normal_dose_series_is_skipped_without_force_and_denoised_with_it(tmp_path, monkeypatch, caplog, capsys):
    _series(tmp_path / "in" / "low", "low")
    _series(tmp_path / "in" / "normal", "normal")
    monkeypatch.setattr(denoise, "load_saved_model", lambda path, batch_size, strength=None: (minus_five, MODEL))
    with caplog.at_level(logging.WARNING, logger="ldct_tf.denoise"):
        assert denoise_cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"]) == 0
    lines = [r.getMessage() for r in caplog.records if "normal_dose" in r.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "in" / "normal") in lines[0] and "--force" in lines[0]
    assert [p.parent.name for p in (tmp_path / "out").rglob("*.dcm")] == ["low"] * 4
    shown = capsys.readouterr().out
    assert "noise index before" in shown and "normal_dose" in shown  # the summary, on the console

    assert denoise_cli.main([str(tmp_path / "in"), str(tmp_path / "forced"), "--no-progress", "--force"]) == 0
    assert sorted({p.parent.name for p in (tmp_path / "forced").rglob("*.dcm")}) == ["low", "normal"]
    assert "denoised anyway (--force)" in (tmp_path / "forced" / "summary.md").read_text()


def test_series_smaller_than_the_model_minimum_is_skipped(tmp_path, caplog):
    _series(tmp_path / "in", "low", 2)  # 128 x 128
    small_model = denoise.ModelInfo("big_input_model", "1", "a test function", min_size=256)
    with caplog.at_level(logging.WARNING, logger="ldct_tf.denoise"):
        summary = denoise.denoise(tmp_path / "in", tmp_path / "out", minus_five, small_model, progress=False,
                                  check_inputs=True)
    assert summary.slices == 0 and [c.code for c in summary.input_checks] == [checks.TOO_SMALL]
    assert any("128x128 pixels, the model needs at least 256x256" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "out").rglob("*.dcm")) == []
    assert not (tmp_path / "out").exists()  # nothing denoised: no output folder, not even a summary


def test_every_series_skipped_is_one_error_line_and_no_output_folder(tmp_path, monkeypatch, capsys):
    _series(tmp_path / "in" / "normal", "normal")
    monkeypatch.setattr(denoise, "load_saved_model", lambda path, batch_size, strength=None: (minus_five, MODEL))
    assert denoise_cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("nothing denoised: every series failed an input check (above); pass --force to "
                            "denoise them anyway")
    assert not (tmp_path / "out").exists()


def test_a_missing_input_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for an input that does not exist")

    monkeypatch.setattr(denoise, "load_saved_model", no_model)
    assert denoise_cli.main([str(tmp_path / "nothing"), str(tmp_path / "out"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"python -m ldct_tf.denoise: error: {tmp_path / 'nothing'}: input not found"
    assert "model:" not in captured.out and not (tmp_path / "out").exists()


def test_head_and_foreign_kernels_are_recognised():
    assert checks.kernel_problem("H30s") and checks.kernel_problem("BONE") and checks.kernel_problem("B70f")
    assert checks.kernel_problem("LUNG") and checks.kernel_problem("Hr38h")
    for known in ("B30f", "D45f", "STANDARD", "Br38f\\3", "SOFT"):
        assert checks.kernel_problem(known) is None, known
    yy, xx = np.mgrid[:256, :256]
    r = np.hypot(yy - 128, xx - 128)
    head = np.where(r < 90, 30.0, -1000.0) + np.where((r >= 80) & (r < 90), 1200.0, 0.0)  # brain in a skull
    belly = np.where(r < 120, 30.0, -1000.0)
    assert checks.head_by_content(head, (0.8, 0.8)) and not checks.head_by_content(belly, (1.4, 1.4))


def test_duplicate_instance_is_skipped_with_a_note_and_a_different_one_refuses_the_series(tmp_path, caplog):
    paths = _series(tmp_path / "in" / "a", "low", 3)
    (tmp_path / "in" / "a" / "copy.dcm").write_bytes(paths[1].read_bytes())
    with caplog.at_level(logging.WARNING, logger="ldct_tf.denoise"):
        summary = denoise.denoise(tmp_path / "in", tmp_path / "out", minus_five, MODEL, progress=False)
    assert (summary.series, summary.slices) == (1, 3)
    notes = [s for s in summary.skipped if s.reason.startswith("duplicate_instance")]
    assert len(notes) == 1 and notes[0].path in {str(paths[1]), str(paths[1].parent / "copy.dcm")}
    assert sum("duplicate_instance" in r.getMessage() for r in caplog.records) == 1

    changed = pydicom.dcmread(paths[1])
    changed.PixelData = (changed.pixel_array + 7).astype(changed.pixel_array.dtype).tobytes()
    changed.save_as(tmp_path / "in" / "a" / "copy.dcm", enforce_file_format=True)
    summary = denoise.denoise(tmp_path / "in", tmp_path / "out2", minus_five, MODEL, progress=False)
    assert summary.slices == 0 and len(summary.refused) == 1
    assert "duplicate_instance with different content" in summary.refused[0].line()


def test_every_run_writes_an_overview_without_identifiers(tmp_path):
    inputs = _series(tmp_path / "in" / "Doe_Jane", "low", 5)
    out = tmp_path / "out"
    summary = denoise.denoise(tmp_path / "in", out, minus_five, MODEL, progress=False)
    panels = sorted((out / overview.OVERVIEW_FOLDER).glob("*.png"))
    assert len(panels) == 3  # 25 / 50 / 75 % of the series
    text = (out / overview.SUMMARY_FILE).read_text()
    assert summary.overview == text and "| 1 | 5 |" in text and "noise index before" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 |")).split("|")
    assert float(row[3]) > checks.NORMAL_DOSE_MAX_NOISE_HU  # the noise index of the input, measured
    for secret in IDENTITY.values() + ["Doe_Jane"] + [p.stem for p in inputs]:
        assert secret not in text
        for panel in panels:
            assert secret.encode() not in panel.read_bytes()
    for path in (p for p in out.rglob("*") if p.is_file()):
        assert not any(p.stem in path.name for p in inputs), path  # no input file name kept
        assert "Jane" not in path.name


@pytest.mark.parametrize("count, expected", [(1, [0]), (2, [0, 1]), (4, [1, 2, 3]), (100, [25, 50, 75])])
def test_sample_indices(count, expected):
    assert checks.sample_indices(count) == expected
