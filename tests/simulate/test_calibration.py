"""Unpaired calibration of the simulator: it recovers a known i0 and FBP filter from two unpaired simulated sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldct_tf.simulate import __main__ as simulate_cli
from ldct_tf.simulate import calibration as C
from ldct_tf import simulate as S

N = 128
SPACING = (1.0, 1.0)


def _body(radius_r: float, radius_c: float, inserts: list) -> np.ndarray:
    """An elliptical soft-tissue body (40 HU) in air with small fat/bone inserts: flat regions and some anatomy."""
    rr, cc = np.mgrid[0:N, 0:N]
    img = np.full((N, N), -1000.0)
    img[((rr - N / 2) / radius_r) ** 2 + ((cc - N / 2) / radius_c) ** 2 < 1] = 40.0
    for r, c, rad, hu in inserts:
        img[np.hypot(rr - r, cc - c) < rad] = hu
    return img


def _scan(truth: np.ndarray, dose: float, i0: float, filter_name: str, seed: int) -> np.ndarray:
    """A "real" scan of a noise-free phantom: the whole quantum noise of a ``dose * i0`` acquisition."""
    sim = S.ProjectionSimulator(truth, SPACING[0])
    rng = np.random.default_rng(seed)
    return sim.reference(filter_name) + sim.noise_hu(sim.sinogram_noise(dose, i0, noise_model="gaussian", rng=rng),
                                                     filter_name)


@pytest.fixture(scope="module")
def unpaired_sets():
    """Low dose of two phantoms, normal dose of two OTHER phantoms (no pair), true i0 3e4, hann filter."""
    lows = [_scan(_body(52, 58, [(50, 50, 5, -100)]), 0.25, 3e4, "hann", 1),
            _scan(_body(55, 50, [(70, 80, 4, 700)]), 0.25, 3e4, "hann", 2)]
    normals = [_scan(_body(48, 54, [(60, 44, 6, -100)]), 1.0, 3e4, "hann", 3),
               _scan(_body(56, 56, [(80, 60, 4, 500)]), 1.0, 3e4, "hann", 4)]
    return lows, normals


def test_recovers_a_known_i0_and_filter_from_unpaired_sets(unpaired_sets):
    lows, normals = unpaired_sets
    fit = C.calibrate_kernel(lows, normals, SPACING, 0.25, filters=("ramp", "hann"), tile=16)
    assert fit["filter_name"] == "hann"
    assert abs(np.log(fit["i0"] / 3e4)) < np.log(1.25), fit["i0"]
    low, high = fit["i0_range"]
    assert low <= fit["i0"] * 1.01 and high >= fit["i0"] * 0.99
    # The normal-dose set alone points to the same i0: the two sets agree, as they must without pairs.
    assert abs(np.log(fit["filters"]["hann"]["i0_from_normal_only"] / 3e4)) < np.log(1.4)


def test_a_noisier_low_dose_set_gives_a_lower_i0(unpaired_sets):
    lows, normals = unpaired_sets
    noisier = [_scan(_body(52, 58, [(50, 50, 5, -100)]), 0.25, 1e4, "hann", 5)]
    base = C.calibrate_kernel(lows[:1], normals, SPACING, 0.25, filters=("hann",), tile=16)["i0"]
    low = C.calibrate_kernel(noisier, normals, SPACING, 0.25, filters=("hann",), tile=16)["i0"]
    assert low < 0.6 * base


def test_file_round_trip_and_parameters_per_kernel(tmp_path, unpaired_sets):
    calibration = {"kernels": {"D45f": {"i0": 5e5, "i0_range": [2e5, 6e5], "filter_name": "ramp",
                                        "dose_fraction": 0.25, "electronic_noise": 10.0, "noise_model": "insert"}},
                   "default_kernel": "D45f"}
    path = C.save(calibration, tmp_path / "c.json")
    loaded = C.load(path)
    assert C.simulation_parameters(loaded, "D45f")["i0"] == 5e5
    assert C.simulation_parameters(loaded, "B30f")["filter_name"] == "ramp"  # uncalibrated kernel: the default's
    (tmp_path / "bad.json").write_text(json.dumps({"kernels": {}}))
    with pytest.raises(ValueError, match="bad.json"):
        C.load(tmp_path / "bad.json")


def _modulated(z_mm: np.ndarray) -> np.ndarray:
    """CTDIvol of a tube-current-modulated normal-dose scan: it follows the body along z (5 to 25 mGy)."""
    return 15.0 + 10.0 * np.sin(z_mm / 40.0)


def test_recovers_a_known_dose_fraction_from_matched_slices_under_tube_current_modulation():
    z = np.arange(-300.0, 0.0, 3.0)
    normal = [C.HeaderSlice(("P1", "S1"), float(v), float(c)) for v, c in zip(z, _modulated(z))]
    normal += [C.HeaderSlice(("P2", "S9"), float(v), 40.0) for v in z]  # another patient at the same positions
    low_z = z[10:40] + 0.2  # the low-dose series covers part of the range, positions within 0.5 mm
    low = [C.HeaderSlice(("P1", "S1"), float(v), 0.3 * float(_modulated(v - 0.2))) for v in low_z]
    low += [C.HeaderSlice(("P1", "S1"), -500.0 - i, 1.0) for i in range(5)]  # positions with no normal-dose slice
    header = C.dose_fraction_from_headers(low, normal)
    assert header.fraction == pytest.approx(0.3, rel=1e-6) and header.matched == 30
    # What the old rule did (medians of unmatched sets) is far off: the test can tell the two apart.
    naive = np.median([h.ctdivol for h in low]) / np.median([h.ctdivol for h in normal])
    assert abs(naive / 0.3 - 1.0) > 0.2
    assert C.resolve_dose_fraction(header, None) == (pytest.approx(0.3), f"headers: {header.reason}", None)


def test_refuses_to_override_a_given_dose_fraction():
    z = np.arange(-60.0, 0.0, 3.0)
    normal = [C.HeaderSlice(("P1", "S1"), float(v), float(c)) for v, c in zip(z, _modulated(z))]
    low = [C.HeaderSlice(("P1", "S1"), float(v), 0.5 * float(c)) for v, c in zip(z, _modulated(z))]
    header = C.dose_fraction_from_headers(low, normal)
    fraction, source, note = C.resolve_dose_fraction(header, 0.25)
    assert fraction == 0.25 and source == "given (--dose-fraction)"
    assert "\n" not in note and "0.500" in note and "keeping the given 0.25" in note and note.startswith("warning")
    assert C.resolve_dose_fraction(header, 0.52) == (0.52, "given (--dose-fraction)", None)  # agrees: nothing to say


@pytest.mark.parametrize("low_key, low_factor, why", [
    (("P1", "S2"), 0.25, "cannot tell"),  # another study: no slice matches
    (("P1", "S1"), 1.0, "not credible"),  # noise-inserted data: the full-dose CTDIvol on the low-dose slices
])
def test_headers_that_cannot_tell_leave_the_given_value(low_key, low_factor, why):
    z = np.arange(-60.0, 0.0, 3.0)
    normal = [C.HeaderSlice(("P1", "S1"), float(v), float(c)) for v, c in zip(z, _modulated(z))]
    low = [C.HeaderSlice(low_key, float(v), low_factor * float(c)) for v, c in zip(z, _modulated(z))]
    header = C.dose_fraction_from_headers(low, normal)
    assert header.fraction is None and why in header.reason
    assert C.resolve_dose_fraction(header, 0.1) == (0.1, "given (--dose-fraction)", None)
    fraction, source, note = C.resolve_dose_fraction(header, None)
    assert (fraction, source) == (C.DEFAULT_DOSE_FRACTION, "default") and why in note and "\n" not in note


def test_inconsistent_matched_ratios_are_not_used():
    z = np.arange(-60.0, 0.0, 3.0)
    normal = [C.HeaderSlice(("P1",), float(v), 20.0) for v in z]
    low = [C.HeaderSlice(("P1",), float(v), 2.0 + 8.0 * (i % 2)) for i, v in enumerate(z)]  # ratios 0.1 and 0.5
    header = C.dose_fraction_from_headers(low, normal)
    assert header.fraction is None and "disagree" in header.reason


def test_bootstrap_interval_covers_the_fit_and_widens_with_disagreeing_slices(unpaired_sets):
    lows, normals = unpaired_sets
    fit = C.calibrate_kernel(lows, normals, SPACING, 0.25, filters=("hann",), tile=16, bootstrap=500)
    lo, hi = fit["i0_interval_95"]
    assert lo <= fit["i0"] <= hi and lo > 0.5 * 3e4 and hi < 2.0 * 3e4
    assert fit["bootstrap"] == {"resamples": 500, "unit": "slice"}
    noisier = _scan(_body(52, 58, [(50, 50, 5, -100)]), 0.25, 1e4, "hann", 5)
    mixed = C.calibrate_kernel([lows[0], noisier], normals, SPACING, 0.25, filters=("hann",), tile=16,
                               bootstrap=500)
    same = fit["filters"]["hann"]["i0_from_low_only_interval_95"]
    spread = mixed["filters"]["hann"]["i0_from_low_only_interval_95"]
    assert spread[1] / spread[0] > 2.0 > same[1] / same[0]


def _write_set(folder, scans, identity, z_mm, ctdivol):
    from ldct_tf.demo import sample_data

    folder.mkdir()
    for i, (hu, z, c) in enumerate(zip(scans, z_mm, ctdivol)):
        sample_data.write_ct_slice(folder / f"{i}.dcm", hu, identity, series_uid=f"1.2.3.{id(folder) % 997}",
                                   instance=i + 1, z_mm=z, ctdivol=c, kernel="B30f", pixel_spacing_mm=SPACING)


def test_cli_from_dicom_matches_slices_keeps_a_given_fraction_and_says_so_once(tmp_path, unpaired_sets, capsys):
    from ldct_tf.demo import sample_data

    lows, normals = unpaired_sets
    patient = sample_data.Identity("MRN1", "Doe^John")
    _write_set(tmp_path / "low", lows + [lows[0]], patient, [-30.0, -60.0, -90.0], [2.5, 6.25, 1.0])
    _write_set(tmp_path / "normal", normals, patient, [-30.2, -60.0], [10.0, 25.0])
    out = tmp_path / "cal.json"
    args = ["--low", str(tmp_path / "low"), "--normal", str(tmp_path / "normal"), "--out", str(out),
            "--bootstrap", "200"]
    assert simulate_cli.main(["calibrate", *args]) == 0
    entry = C.load(out)["kernels"]["B30f"]
    assert entry["dose_fraction"] == pytest.approx(0.25) and entry["dose_fraction_source"].startswith("headers")
    assert "slice 5/5" in capsys.readouterr().out  # progress, one line per slice
    assert simulate_cli.main(["calibrate", *args, "--dose-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert C.load(out)["kernels"]["B30f"]["dose_fraction"] == 0.1
    assert [line for line in printed.splitlines() if "warning" in line] == [
        "B30f: warning: CTDIvol ratio 0.250 of 2 matched slices suggests dose fraction 0.250; keeping the given 0.1"]
    written = C.load(out)
    assert written["runtime_s"] > 0 and "--dose-fraction 0.1 --bootstrap 200" in written["command"]
    # the record names no path: clinical folder and file names can hold patient names and IDs
    assert str(tmp_path) not in json.dumps(written) and "--low <1 path(s)> --normal <1 path(s)>" in written["command"]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert simulate_cli.main(["calibrate", "--low", str(tmp_path / "nothing"), "--normal", str(tmp_path),
                              "--out", str(tmp_path / "c.json")]) == 1  # bad input: exit 1, as every command
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nothing: no such file or folder" in err


def test_projection_simulator_reuses_the_projection():
    img = _body(50, 50, [])
    sim = S.ProjectionSimulator(img, 1.0)
    a, ref = sim.pair(0.25, 3e4, seed=1)
    b, ref2 = S.simulate_low_dose(img, 0.25, 3e4, seed=1, pixel_spacing_mm=1.0)
    np.testing.assert_allclose(a, b, atol=1e-3)  # the same as the one-shot function
    np.testing.assert_array_equal(ref, ref2)
    c, _ = sim.pair(0.25, 3e4, seed=2)
    assert not np.array_equal(a, c)


def test_tiles_overlap_by_half_to_use_every_flat_region():
    """A 64 x 64 flat region holds 16 disjoint 16 x 16 tiles but 49 half-overlapping ones (Welch's estimate)."""
    image = np.zeros((80, 80))
    mask = np.zeros((80, 80), bool)
    mask[8:72, 8:72] = True
    assert len(C._tiles(image, mask, 16)) == 49


def test_the_development_calibration_covers_both_kernels_with_intervals():
    """configs/calibration_mayo_dev.json (both development patients, both kernels; see its provenance): each kernel's
    i0 inside its bootstrap interval, the interval non-degenerate, and no path in the file."""
    path = Path(__file__).resolve().parents[2] / "configs" / "calibration_mayo_dev.json"
    calibration = C.load(path)
    assert sorted(calibration["kernels"]) == ["B30f", "D45f"] and not calibration["not_calibrated"]
    for entry in calibration["kernels"].values():
        low, high = entry["i0_interval_95"]
        assert low < entry["i0"] < high and high / low > 1.05
    assert "mayo_pairs/" not in calibration["command"] and "L286_" not in path.read_text()
