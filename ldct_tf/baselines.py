r"""Classical denoisers with the project's call convention: one HU slice in, one HU slice out.

Gaussian smoothing, non-local means and total-variation (Chambolle) come from scikit-image; BM3D from the ``bm3d``
package, which is free for non-commercial use only and therefore an optional extra (``pip install
'ldct_tf[baselines]'``).  Each function takes its strength in HU (or pixels for the Gaussian), so the figures mean
the same on any scanner.  NLM, TV and BM3D run on HU clipped to [-1024, 3071] and scaled to [0, 1], the scaling the
independent reference figures (``shared/REFERENCE_FIGURES.md``) used; a strength ``s`` HU there is ``s / 4095``.

How the default strengths were chosen (never on the test patient): :func:`tune` scans a log grid (:data:`GRIDS`)
and keeps the value with the best mean abdomen-window PSNR against the full-dose slice, on the development patients
L096 and L143 of the AAPM-Mayo pairs (21 slices; BM3D on every 4th of them, 6 slices, because it costs about 7 s a
slice).  Patient L286 is held out as the test patient of the quality benchmark.  Reproduce with::

    python -m ldct_tf.evaluate --pairs $LDCT_DATA_DIR/mayo_pairs/pairs.csv --patients L096,L143 \
        --tune gaussian,nlm,tv --out tuning
    python -m ldct_tf.evaluate --pairs $LDCT_DATA_DIR/mayo_pairs/pairs.csv --patients L096,L143 \
        --tune bm3d --tune-stride 4 --out tuning_bm3d

Result (mean abdomen PSNR dB / SSIM on the development slices at each grid value; best marked *):

- gaussian sigma px: 0.25 21.23/0.726, 0.354 21.66/0.734, 0.5 23.67/0.766, *0.707 24.69/0.771, 1.0 23.56/0.732,
  1.414 21.83/0.676, 2.0 20.83/0.623
- nlm h HU: 15 21.67/0.736, 21.2 22.30/0.745, 30 23.17/0.753, 42.4 24.32/0.753, *60 25.12/0.734, 84.9 24.89/0.701,
  120 24.26/0.671
- tv weight HU: 10 23.14/0.760, 15.9 24.02/0.772, 25.2 24.94/0.777, *40 25.51/0.765, 63.5 25.23/0.735,
  100.8 24.22/0.694, 160 22.80/0.643
- bm3d sigma HU (6 slices): 30 23.47/0.764, 45.6 24.66/0.772, 69.3 25.76/0.762, *105.3 26.04/0.737,
  160 25.64/0.715

Gaussian, NLM and TV agree with the strengths that ``shared/REFERENCE_FIGURES.md`` found on all 25 pairs (0.71 px,
57 HU, 41 HU), so holding L286 out did not move them; for BM3D the coarser 5-point grid on 6 development slices
picked 105 HU where the reference (8 of all 25 slices) picked 82 HU.  PSNR and SSIM disagree: SSIM peaks at weaker
smoothing (TV 25 HU, NLM 30-42 HU); the defaults follow PSNR, say so when quoting a "best".  A per-kernel strength
(the data mix sharp D45f and smooth B30f reconstructions) would score higher; one strength per method keeps the
comparison simple and is what a user without kernel-specific tuning would get.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

from ldct_tf import ct
from ldct_tf.errors import LdctError

Denoiser = Callable[[np.ndarray], np.ndarray]

_SPAN = ct.HU_MAX - ct.HU_MIN

#: Tuned default strengths (see the module docstring for how): Gaussian sigma in pixels, the others in HU.
DEFAULTS: dict[str, dict[str, float]] = {
    "gaussian": {"sigma": 0.707},
    "nlm": {"h_hu": 60.0},
    "tv": {"weight_hu": 40.0},
    "bm3d": {"sigma_hu": 105.3},
    # BM3D with its strength set per image from the image's own noise (sigma = factor x ldct_tf.noise's index), so one
    # setting serves every dose.  The factor is BM3D's abdomen-PSNR optimum for a 25 % dose on the development
    # patient L143 (python -m experiments.v3 bm3d; experiments/results/v3_validation.json, "sim_25").
    "bm3d_adaptive": {"factor": 2.5},
}

#: The strength parameter of each method and the log grid :func:`tune` scans.
GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "gaussian": ("sigma", tuple(np.round(np.geomspace(0.25, 2.0, 7), 3))),
    "nlm": ("h_hu", tuple(np.round(np.geomspace(15.0, 120.0, 7), 1))),
    "tv": ("weight_hu", tuple(np.round(np.geomspace(10.0, 160.0, 7), 1))),
    "bm3d": ("sigma_hu", tuple(np.round(np.geomspace(30.0, 160.0, 5), 1))),
}


class BaselineError(LdctError, ValueError):
    """A baseline name, parameter or input that cannot be used; names the value.  A ``ValueError`` too, as these
    checks raised before the project had one error base."""


class BaselineUnavailable(LdctError, ImportError):
    """A baseline whose optional package is not installed."""


def _check(hu: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise BaselineError(f"expected one 2-D HU slice, got shape {hu.shape}")
    return hu.astype(np.float64)


def _to_unit(hu: np.ndarray) -> np.ndarray:
    return (np.clip(hu, ct.HU_MIN, ct.HU_MAX) - ct.HU_MIN) / _SPAN


def _from_unit(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float64) * _SPAN + ct.HU_MIN).astype(np.float32)


def gaussian(hu: np.ndarray, sigma: float = DEFAULTS["gaussian"]["sigma"]) -> np.ndarray:
    """Isotropic Gaussian smoothing with standard deviation ``sigma`` pixels."""
    if sigma < 0:
        raise BaselineError(f"sigma must be >= 0, got {sigma!r}")
    return ndimage.gaussian_filter(_check(hu), sigma, mode="nearest").astype(np.float32)


def nlm(hu: np.ndarray, h_hu: float = DEFAULTS["nlm"]["h_hu"], patch_size: int = 5,
        patch_distance: int = 6) -> np.ndarray:
    """Non-local means (scikit-image, fast mode): ``h_hu`` is the patch-distance cut-off in HU."""
    from skimage.restoration import denoise_nl_means

    if h_hu <= 0:
        raise BaselineError(f"h_hu must be > 0, got {h_hu!r}")
    out = denoise_nl_means(_to_unit(_check(hu)), patch_size=patch_size, patch_distance=patch_distance,
                           h=h_hu / _SPAN, fast_mode=True)
    return _from_unit(out)


def tv(hu: np.ndarray, weight_hu: float = DEFAULTS["tv"]["weight_hu"]) -> np.ndarray:
    """Total-variation denoising (Chambolle's algorithm, scikit-image); ``weight_hu`` is the TV weight in HU."""
    from skimage.restoration import denoise_tv_chambolle

    if weight_hu <= 0:
        raise BaselineError(f"weight_hu must be > 0, got {weight_hu!r}")
    return _from_unit(denoise_tv_chambolle(_to_unit(_check(hu)), weight=weight_hu / _SPAN))


def bm3d_available() -> bool:
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True


def bm3d(hu: np.ndarray, sigma_hu: float = DEFAULTS["bm3d"]["sigma_hu"]) -> np.ndarray:
    """BM3D (both stages, the ``bm3d`` package) assuming white noise of ``sigma_hu`` HU.

    Raises :class:`BaselineUnavailable` with the install command when the optional package is missing.
    """
    try:
        import bm3d as bm3d_pkg
    except ImportError as err:
        raise BaselineUnavailable(
            "the bm3d baseline needs the optional bm3d package: pip install 'ldct_tf[baselines]' "
            "(bm3d==4.0.3; free for non-commercial use only)") from err
    if sigma_hu <= 0:
        raise BaselineError(f"sigma_hu must be > 0, got {sigma_hu!r}")
    return _from_unit(bm3d_pkg.bm3d(_to_unit(_check(hu)), sigma_psd=sigma_hu / _SPAN))


def bm3d_adaptive(hu: np.ndarray, factor: float = DEFAULTS["bm3d_adaptive"]["factor"]) -> np.ndarray:
    """BM3D at ``factor`` times the slice's own noise index (``ldct_tf.noise``): the noise-adaptive comparator a
    fixed-strength BM3D is not (a 10 % and a 50 % dose scan need very different strengths)."""
    from ldct_tf import noise  # lazy: TensorFlow, which the numpy baselines above do not need

    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    return bm3d(hu, sigma_hu=max(factor * noise.noise_index(_check(hu)), 1.0))


def identity(hu: np.ndarray) -> np.ndarray:
    """The low-dose input itself (the ``none`` denoiser): what every method must beat."""
    return np.asarray(hu, dtype=np.float32).copy()


_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "none": identity, "gaussian": gaussian, "nlm": nlm, "tv": tv, "bm3d": bm3d, "bm3d_adaptive": bm3d_adaptive,
}
NAMES: tuple[str, ...] = tuple(_FUNCTIONS)


def get(name: str, **params: float) -> Denoiser:
    """The named baseline as ``HU slice -> HU slice`` with the tuned default strength, or ``params`` overriding it.

    ``bm3d`` raises :class:`BaselineUnavailable` here already when its package is missing, so a run fails before
    its first slice rather than after the others.
    """
    if name not in _FUNCTIONS:
        raise BaselineError(f"unknown baseline {name!r}; known: {list(NAMES)}")
    if name in ("bm3d", "bm3d_adaptive") and not bm3d_available():
        bm3d(np.zeros((8, 8)))  # raises BaselineUnavailable with the install hint
    allowed = set(DEFAULTS.get(name, {}))
    unknown = set(params) - allowed
    if unknown:
        raise BaselineError(f"baseline {name!r} takes {sorted(allowed) or 'no parameters'}, got {sorted(unknown)}")
    if name in ("nlm", "tv"):
        import skimage.restoration  # noqa: F401  (import now, so a timed first call measures denoising, not imports)
    fn = _FUNCTIONS[name]
    return functools.partial(fn, **params) if params else fn


def tune(name: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]], values: Optional[Sequence[float]] = None,
         window: str = "abdomen", progress: bool = False) -> dict:
    """Scan ``values`` (default :data:`GRIDS`) of ``name``'s strength; keep the best mean PSNR in ``window``.

    ``pairs`` are ``(low_hu, normal_hu)`` of DEVELOPMENT patients only.  Returns ``{"name", "parameter", "best",
    "grid": [{"value", "psnr_mean", "ssim_mean"}], "slices"}``; a best value at the edge of the grid is flagged with
    ``"at_grid_edge": True`` so the caller can widen the grid.
    """
    from ldct_tf import metrics

    if name not in GRIDS:
        raise BaselineError(f"no tunable strength for {name!r}; tunable: {sorted(GRIDS)}")
    param, default_grid = GRIDS[name]
    values = tuple(values) if values is not None else default_grid
    pairs = list(pairs)
    if not pairs:
        raise BaselineError("tune() needs at least one (low, normal) pair")
    scores = np.zeros((len(values), len(pairs), 2))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(values) * len(pairs), desc=f"tune {name}", unit="slice")
    for i, v in enumerate(values):
        fn = get(name, **{param: float(v)})
        for j, (low, normal) in enumerate(pairs):
            out = fn(low)
            scores[i, j] = metrics.psnr(out, normal, window), metrics.ssim(out, normal, window)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    means = scores.mean(axis=1)
    best = int(np.argmax(means[:, 0]))
    return {
        "name": name, "parameter": param, "window": window, "slices": len(pairs), "best": float(values[best]),
        "at_grid_edge": best in (0, len(values) - 1),
        "grid": [{"value": float(v), "psnr_mean": float(m[0]), "ssim_mean": float(m[1])} for v, m in zip(values, means)],
    }
