"""Progress of the slow simulation steps (issue 26 item 7): calibration and the simulated-pair stream spend minutes on
slices that each cost seconds, so they draw a bar on a terminal, none with ``--no-progress``, and leave no bar,
carriage return or ANSI escape in a file when their output is redirected."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ldct_tf.simulate import __main__ as simulate_cli
from tests.conftest import REPO
from tests.simulate import test_calibration as phantoms


@pytest.fixture(scope="module")
def dicom_sets(tmp_path_factory):
    """Two low-dose and two normal-dose phantom slices (128 x 128, kernel B30f) as DICOM folders."""
    from ldct_tf.demo import sample_data

    root = tmp_path_factory.mktemp("progress")
    lows = [phantoms._scan(phantoms._body(52, 58, [(50, 50, 5, -100)]), 0.25, 3e4, "hann", 1),
            phantoms._scan(phantoms._body(55, 50, [(70, 80, 4, 700)]), 0.25, 3e4, "hann", 2)]
    normals = [phantoms._scan(phantoms._body(48, 54, [(60, 44, 6, -100)]), 1.0, 3e4, "hann", 3),
               phantoms._scan(phantoms._body(56, 56, [(80, 60, 4, 500)]), 1.0, 3e4, "hann", 4)]
    patient = sample_data.Identity("MRN1", "Doe^John")
    phantoms._write_set(root / "low", lows, patient, [-30.0, -60.0], [2.5, 6.25])
    phantoms._write_set(root / "normal", normals, patient, [-30.2, -60.0], [10.0, 25.0])
    return root


def _calibrate_args(root, out) -> list[str]:
    return ["calibrate", "--low", str(root / "low"), "--normal", str(root / "normal"), "--out", str(out),
            "--bootstrap", "200", "--dose-fraction", "0.25"]


def _as_terminal(monkeypatch) -> None:
    """Make the captured stderr say it is a terminal, as a user's shell is (tqdm decides by ``isatty``); in the test
    body, as capsys swaps in its stream only when the test starts."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


def test_calibrate_draws_a_bar_on_a_terminal(dicom_sets, tmp_path, capsys, monkeypatch):
    _as_terminal(monkeypatch)
    assert simulate_cli.main(_calibrate_args(dicom_sets, tmp_path / "c.json")) == 0
    err = capsys.readouterr().err
    assert "B30f: calibrating" in err and "4/4" in err, err  # the bar over the 2 + 2 slices, finished


def test_calibrate_no_progress_draws_no_bar(dicom_sets, tmp_path, capsys, monkeypatch):
    _as_terminal(monkeypatch)
    assert simulate_cli.main([*_calibrate_args(dicom_sets, tmp_path / "c.json"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "calibrating" not in captured.err and "\r" not in captured.err
    assert "slice 4/4" in captured.out  # without a bar: one plain line per slice, as a log file wants


def test_redirected_output_holds_no_bar_and_no_terminal_codes(dicom_sets, tmp_path):
    log = tmp_path / "calibrate.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as handle:
        done = subprocess.run([sys.executable, "-m", "ldct_tf.simulate",
                               *_calibrate_args(dicom_sets, tmp_path / "c.json")],
                              stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=300)
    text = log.read_bytes()
    assert done.returncode == 0, text.decode(errors="replace")[-2000:]
    assert b"\x1b[" not in text and b"\r" not in text, text[-2000:]
    assert b"slice 4/4" in text and b"Wrote" in text  # the plain per-slice lines instead of the bar


def _normal_record(size: int = 64) -> bytes:
    from ldct_tf import records

    rr, cc = np.mgrid[0:size, 0:size]
    image = np.where(np.hypot(rr - size / 2, cc - size / 2) < size / 3, 40, -1000).astype(np.int16)
    return records.encode(records.SliceRecord(
        image=image, dose="normal", split="train", patient="P1", series="S1", instance=1, z_mm=0.0,
        pixel_spacing_mm=(1.0, 1.0), slice_thickness_mm=1.0, kvp=120.0, exposure_mas=200.0, ctdivol=10.0,
        kernel="B30f", manufacturer="SIEMENS"))


CALIBRATION = {"kernels": {"B30f": {"i0": 2e5, "i0_range": [1e5, 4e5], "filter_name": "ramp", "dose_fraction": 0.25,
                                    "electronic_noise": 10.0, "noise_model": "insert"}}, "default_kernel": "B30f"}


@pytest.mark.parametrize("progress", [True, False])
def test_simulated_pair_stage_advances_a_bar_per_slice(progress, capsys):
    from ldct_tf.pipeline import simulate_pairs

    fn = simulate_pairs.SimulatePairsFn(CALIBRATION, 1, total=2, progress=progress)
    for _ in range(2):
        assert len(list(fn.process(_normal_record()))) == 1
    fn.teardown()
    err = capsys.readouterr().err
    assert ("simulating pairs" in err and "2/2" in err) == progress, err


def test_pairs_cli_takes_no_progress():
    args, beam_args = simulate_cli.build_parser().parse_known_args(
        ["pairs", "--data", "d", "--calibration", "c.json", "--no-progress", "--runner", "DirectRunner"])
    assert args.no_progress and beam_args == ["--runner", "DirectRunner"]  # ours, not passed on to Beam
