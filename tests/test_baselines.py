"""Classical baselines: HU in / HU out, they reduce noise on a phantom, the registry, the tuning helper, and the
clear error when the optional bm3d package is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ldct_tf import baselines as B
from ldct_tf import metrics as M


def _pair(seed=0, shape=(64, 64), sigma=40.0):
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    clean = np.full(shape, 50.0)  # soft tissue with a fat and an enhancing insert: edges a smoother may blur
    clean[np.hypot(rr - 20, cc - 20) < 10] = -100.0
    clean[np.hypot(rr - 46, cc - 22) < 6] = 150.0
    noisy = clean + np.random.default_rng(seed).normal(0.0, sigma, shape)
    return noisy.astype(np.float32), clean


FAST = ["gaussian", "nlm", "tv"]


@pytest.mark.parametrize("name", FAST)
def test_baseline_denoises_in_hu(name):
    noisy, clean = _pair()
    out = B.get(name)(noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert M.rmse_hu(out, clean) < 0.8 * M.rmse_hu(noisy, clean)
    assert abs(float(out[30:40, 40:50].mean()) - 50.0) < 10.0  # the HU scale survives (no [0, 1] leak)
    assert np.array_equal(noisy, _pair()[0])  # the input is not modified in place


@pytest.mark.parametrize("name, param", [("gaussian", "sigma"), ("nlm", "h_hu"), ("tv", "weight_hu")])
def test_strength_parameter_controls_smoothing(name, param):
    noisy, _ = _pair()
    lo, _, hi = B.GRIDS[name][1][0], None, B.GRIDS[name][1][-1]
    weak, strong = B.get(name, **{param: lo})(noisy), B.get(name, **{param: hi})(noisy)
    roi = M.Box(34, 34, 12, 12)
    assert M.noise_sd(strong, roi) < M.noise_sd(weak, roi)


def test_none_is_the_input():
    noisy, _ = _pair()
    out = B.get("none")(noisy)
    np.testing.assert_array_equal(out, noisy)
    out[0, 0] = 1.0
    assert noisy[0, 0] != 1.0 or out is not noisy


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown baseline 'median'"):
        B.get("median")
    with pytest.raises(ValueError, match="takes \\['sigma'\\]"):
        B.get("gaussian", h_hu=3.0)
    with pytest.raises(ValueError, match="2-D"):
        B.gaussian(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="sigma"):
        B.gaussian(np.zeros((8, 8)), sigma=-1.0)
    assert set(B.DEFAULTS) | {"none"} == set(B.NAMES)


def test_tune_picks_the_best_psnr_of_the_grid():
    pairs = [_pair(seed=s) for s in range(2)]
    result = B.tune("gaussian", pairs, values=[0.1, 1.0, 6.0])
    assert result["parameter"] == "sigma" and result["slices"] == 2
    psnrs = [g["psnr_mean"] for g in result["grid"]]
    assert result["best"] == [0.1, 1.0, 6.0][int(np.argmax(psnrs))] == 1.0
    assert not result["at_grid_edge"]
    assert B.tune("gaussian", pairs, values=[0.05, 0.1])["at_grid_edge"]
    with pytest.raises(ValueError, match="no tunable"):
        B.tune("none", pairs)


def test_bm3d_missing_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # makes `import bm3d` raise ImportError
    assert not B.bm3d_available()
    with pytest.raises(B.BaselineUnavailable, match=r"pip install 'ldct_tf\[baselines\]'"):
        B.get("bm3d")
    with pytest.raises(ImportError):
        B.bm3d(np.zeros((8, 8)))


def test_bm3d_denoises():
    pytest.importorskip("bm3d", reason="bm3d is an optional extra: pip install 'ldct_tf[baselines]'")
    noisy, clean = _pair(shape=(64, 64))
    out = B.get("bm3d")(noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert M.rmse_hu(out, clean) < 0.7 * M.rmse_hu(noisy, clean)


def test_bm3d_adaptive_sets_its_strength_from_each_slice_s_own_noise(monkeypatch):
    from ldct_tf import baselines as b

    seen = []
    monkeypatch.setattr(b, "bm3d", lambda hu, sigma_hu: seen.append(sigma_hu) or hu)
    rng = np.random.default_rng(0)
    quiet = (40 + rng.normal(0, 10, (96, 96))).astype(np.float32)
    noisy = (40 + rng.normal(0, 40, (96, 96))).astype(np.float32)
    b.bm3d_adaptive(quiet, factor=2.0)
    b.bm3d_adaptive(noisy, factor=2.0)
    b.bm3d_adaptive(noisy, factor=4.0)
    assert seen[1] / seen[0] == pytest.approx(4.0, rel=0.2)  # 4x the noise, 4x the strength
    assert seen[2] == pytest.approx(2 * seen[1])
    with pytest.raises(ValueError, match="factor"):
        b.bm3d_adaptive(noisy, factor=0)
