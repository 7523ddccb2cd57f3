"""Unpaired calibration of the simulator: it recovers a known i0 and FBP filter from two unpaired simulated sets."""

from __future__ import annotations

import json

import numpy as np
import pytest

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


def test_dose_fraction_from_headers_only_when_they_differ():
    assert C.dose_fraction_from_headers([5.0, 5.0], [20.0, 20.0]) == pytest.approx(0.25)
    assert C.dose_fraction_from_headers([20.0], [20.0]) is None  # noise-inserted data: same CTDIvol on both
    assert C.dose_fraction_from_headers([0.0], [20.0]) is None


def test_projection_simulator_reuses_the_projection():
    img = _body(50, 50, [])
    sim = S.ProjectionSimulator(img, 1.0)
    a, ref = sim.pair(0.25, 3e4, seed=1)
    b, ref2 = S.simulate_low_dose(img, 0.25, 3e4, seed=1, pixel_spacing_mm=1.0)
    np.testing.assert_allclose(a, b, atol=1e-3)  # the same as the one-shot function
    np.testing.assert_array_equal(ref, ref2)
    c, _ = sim.pair(0.25, 3e4, seed=2)
    assert not np.array_equal(a, c)
