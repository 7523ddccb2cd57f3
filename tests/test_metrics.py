"""Metrics: fidelity figures against scikit-image and the independent reference figures, reader criteria on
phantoms whose true answer is known."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct_tf import metrics as M

RNG = np.random.default_rng(0)


def _phantom(shape=(128, 128), noise=20.0, seed=1):
    """Fat (-100 HU) body with a soft-tissue disc (60 HU) and a bright insert (200 HU), in air, plus white noise."""
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    r0, c0 = shape[0] / 2, shape[1] / 2
    img = np.full(shape, -1000.0)
    img[np.hypot(rr - r0, cc - c0) < 0.45 * shape[0]] = -100.0
    img[np.hypot(rr - r0, cc - c0 - 12) < 0.25 * shape[0]] = 60.0
    img[np.hypot(rr - r0 + 25, cc - c0 + 25) < 6] = 200.0
    return img + np.random.default_rng(seed).normal(0, noise, shape)


@pytest.mark.parametrize("window", ["abdomen", "wide"])
def test_psnr_ssim_match_skimage(window):
    from ldct_tf import ct

    ref = _phantom(noise=5.0, seed=2)
    x = _phantom(noise=40.0, seed=3)
    w = ct.window(window)
    a, b = np.clip(x, w.low, w.high), np.clip(ref, w.low, w.high)
    assert M.psnr(x, ref, window) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=w.width), abs=1e-9)
    assert M.ssim(x, ref, window) == pytest.approx(structural_similarity(a, b, data_range=w.width), abs=1e-9)


def test_identical_images_and_rmse():
    ref = _phantom()
    assert M.psnr(ref, ref) == float("inf")
    assert M.ssim(ref, ref, "wide") == pytest.approx(1.0)
    assert M.rmse_hu(ref + 7.0, ref) == pytest.approx(7.0)
    # Outside the window nothing counts: a change of air from -1000 to -900 HU is invisible in the abdomen window.
    moved = ref.copy()
    moved[ref < -500] += 100.0
    assert M.psnr(moved, ref) == float("inf") and M.rmse_hu(moved, ref) > 10


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        M.psnr(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="unknown HU window"):
        M.psnr(np.zeros((8, 8)), np.zeros((8, 8)), "nope")
    with pytest.raises(ValueError, match="win_size"):
        M.ssim(np.zeros((16, 16)), np.zeros((16, 16)), win_size=4)
    with pytest.raises(ValueError, match="unknown tissue"):
        M.find_flat_rois(np.zeros((32, 32)), "bone")
    with pytest.raises(ValueError, match="does not fit"):
        M.noise_sd(np.zeros((8, 8)), M.Box(4, 4, 8, 8))


def test_flat_rois_land_in_the_right_tissue_and_measure_the_noise():
    reference = _phantom(shape=(160, 160), noise=10.0, seed=5)  # choose ROIs on one image, measure on another
    img = _phantom(shape=(160, 160), noise=20.0)
    clean = _phantom(shape=(160, 160), noise=0.0)
    soft = M.find_flat_rois(reference, "soft_tissue", size=12, n=5)
    fat = M.find_flat_rois(reference, "fat", size=12, n=5)
    assert len(soft) == 5 and len(fat) == 5
    for box in soft:
        assert np.all(box.crop(clean) == 60.0)
    for box in fat:
        assert np.all(box.crop(clean) == -100.0)
    boxes = soft + fat
    for i, a in enumerate(boxes):  # no two ROIs overlap
        for b in boxes[i + 1:]:
            assert abs(a.top - b.top) >= 12 or abs(a.left - b.left) >= 12
    assert M.noise_sd(img, soft) == pytest.approx(20.0, rel=0.1)
    assert M.noise_sd(ndimage.gaussian_filter(img, 1.0), soft + fat) < 8.0  # ROIs keep clear of tissue edges
    assert M.find_flat_rois(np.full((64, 64), 500.0), "soft_tissue", size=12) == []
    assert np.isnan(M.noise_sd(img, []))
    mask = np.zeros(img.shape, bool)
    mask[soft[0].slices] = True
    assert M.noise_sd(img, mask) == pytest.approx(M.noise_sd(img, soft[0]))


def test_cnr():
    img = _phantom(shape=(160, 160), noise=20.0)
    reference = _phantom(shape=(160, 160), noise=10.0, seed=5)
    soft, fat = M.find_flat_rois(reference, "soft_tissue", size=12, n=1), M.find_flat_rois(reference, "fat", size=12, n=1)
    value = M.cnr(img, soft[0], fat[0])
    assert value == pytest.approx(160.0 / 20.0, rel=0.2)
    assert M.cnr(ndimage.gaussian_filter(img, 1.0), soft[0], fat[0]) > 1.5 * value


def test_nps_of_white_noise_is_flat_and_integrates_to_the_variance():
    sigma, spacing = 10.0, (0.5, 0.8)
    noise = RNG.normal(0.0, sigma, (64, 64, 64))
    fy, fx, nps = M.nps_2d(noise, spacing, detrend=0)
    assert nps.shape == (64, 64) and fy[32] == 0 and fx[32] == 0
    df = (fy[1] - fy[0]) * (fx[1] - fx[0])
    assert nps.sum() * df == pytest.approx(sigma ** 2, rel=0.02)
    assert nps[1:, 1:].mean() == pytest.approx(sigma ** 2 * spacing[0] * spacing[1], rel=0.03)
    f, nps_r = M.nps_radial(noise, spacing)
    assert f.max() <= 1 / (2 * max(spacing)) + 1e-9
    assert np.std(nps_r[1:]) / np.mean(nps_r[1:]) < 0.1  # flat
    # Smoothing moves noise power to low frequencies: the mean frequency drops.
    smooth = np.stack([ndimage.gaussian_filter(n, 1.5) for n in noise])
    f_white = M.nps_mean_frequency(f, nps_r)
    f_smooth = M.nps_mean_frequency(*M.nps_radial(smooth, spacing))
    assert f_smooth < 0.6 * f_white


def test_nps_detrending_removes_a_ramp():
    rr, cc = np.mgrid[0:32, 0:32]
    ramp = 3.0 * rr + 2.0 * cc + 0.05 * rr * cc
    noise = RNG.normal(0, 1.0, (32, 32))
    _, _, raw = M.nps_2d(noise + ramp, detrend=0)
    _, _, detrended = M.nps_2d(noise + ramp, detrend=2)
    _, _, pure = M.nps_2d(noise, detrend=2)
    assert raw.sum() > 100 * pure.sum()
    assert detrended.sum() == pytest.approx(pure.sum(), rel=0.05)
    with pytest.raises(ValueError, match="detrend"):
        M.nps_2d(noise, detrend=3)


def test_edge_sharpness_sees_blur_but_not_noise():
    ref = _phantom(noise=0.0)
    noisy = ref + RNG.normal(0, 30.0, ref.shape)
    assert M.edge_sharpness(ref, ref) == pytest.approx(1.0)
    assert M.edge_sharpness(noisy, ref) == pytest.approx(1.0, abs=0.05)
    blurred = M.edge_sharpness(ndimage.gaussian_filter(ref, 2.0), ref)
    assert blurred < 0.8
    assert M.edge_sharpness(ndimage.gaussian_filter(ref, 4.0), ref) < blurred
    assert np.isnan(M.edge_sharpness(np.zeros((32, 32)), np.zeros((32, 32))))


def test_none_row_matches_the_reference_figures(shared_data):
    """The quarter-dose input scored against full dose on all 25 Mayo pairs equals the independently computed
    figures in shared/REFERENCE_FIGURES.md ("none" row: mean of PSNR/SSIM abdomen and wide, RMSE HU)."""
    from ldct_tf import dicom

    root = shared_data / "mayo_pairs"
    rows = list(csv.DictReader(open(root / "pairs.csv", newline="")))
    assert len(rows) == 25
    scores = []
    for row in rows:
        full, _ = dicom.read_slice(str(root / row["full_dose"]))
        quarter, _ = dicom.read_slice(str(root / row["quarter_dose"]))
        scores.append([M.psnr(quarter, full), M.ssim(quarter, full), M.psnr(quarter, full, "wide"),
                       M.ssim(quarter, full, "wide"), M.rmse_hu(quarter, full)])
    mean = np.mean(scores, axis=0)
    expected = [21.63, 0.738, 36.73, 0.850, 46.3]  # REFERENCE_FIGURES.md, rounded there to these digits
    for name, got, want, tol in zip(["psnr_abd", "ssim_abd", "psnr_wide", "ssim_wide", "rmse"], mean, expected,
                                    [0.006, 0.0006, 0.006, 0.0006, 0.06]):
        assert abs(got - want) <= tol, f"{name}: {got:.4f} vs reference {want}"
