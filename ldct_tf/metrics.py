"""Image-quality metrics for CT denoising: fidelity to a reference slice, and the criteria CT readers use.

Every function takes HU arrays (numpy, 2-D) and returns plain floats or arrays, so the evaluate CLI, the quality
benchmark and notebooks all score exactly the same way.

Fidelity (against a paired reference, e.g. the full-dose slice)
    :func:`psnr`, :func:`ssim` in a named HU window (both images clipped to the window, data range = window width),
    :func:`rmse_hu` unclipped.  Two windows are always reported by the evaluation because published figures are not
    comparable otherwise: ``abdomen`` [-160, 240] (data range 400, the RED-CNN convention) and ``wide``
    [-1024, 1900] (data range 2924, the 2024 ldct-benchmark convention).  SSIM follows Wang et al. (2004) with
    scikit-image's defaults (7x7 uniform window, sample covariance, K1 0.01, K2 0.03, border of 3 pixels excluded),
    so figures match ``skimage.metrics.structural_similarity`` and published skimage-based numbers.

Reader criteria
    :func:`noise_sd` in homogeneous ROIs (given as :class:`Box` es or found by :func:`find_flat_rois`),
    :func:`cnr` between two ROIs, the noise power spectrum (:func:`nps_2d`, :func:`nps_radial`) and its mean
    frequency (:func:`nps_mean_frequency`) - a denoiser that moves noise power to low frequencies produces the blotchy
    "plastic" texture radiologists reject even when its noise SD is low - and :func:`edge_sharpness`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ldct_tf import ct

WindowLike = Union[str, ct.Window]

#: Mean-HU ranges of the tissue classes :func:`find_flat_rois` looks for.  ``soft_tissue`` covers liver parenchyma
#: (40-70 HU unenhanced, up to about 130 HU in the portal venous phase), spleen and muscle; the liver is usually the
#: largest homogeneous soft-tissue region of an abdominal slice, so it supplies most of the ROIs there.
TISSUE_HU: dict[str, tuple[float, float]] = {
    "soft_tissue": (0.0, 150.0),
    "fat": (-150.0, -50.0),
    "air": (-1010.0, -900.0),
}


def _window(window: WindowLike) -> ct.Window:
    return window if isinstance(window, ct.Window) else ct.window(window)


def _pair(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"image shape {x.shape} differs from reference shape {ref.shape}")
    if x.ndim != 2:
        raise ValueError(f"expected 2-D HU slices, got shape {x.shape}")
    return x, ref


# --------------------------------------------------------------------------------------------------------- fidelity
def rmse_hu(x: np.ndarray, ref: np.ndarray) -> float:
    """Root-mean-square difference in HU over the whole slice, without clipping."""
    x, ref = _pair(x, ref)
    return float(np.sqrt(np.mean((x - ref) ** 2)))


def psnr(x: np.ndarray, ref: np.ndarray, window: WindowLike = "abdomen") -> float:
    """Peak signal-to-noise ratio in dB, both images clipped to ``window``, peak = the window width.

    Identical images give ``inf``.
    """
    w = _window(window)
    x, ref = _pair(x, ref)
    mse = float(np.mean((w.clip(x) - w.clip(ref)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(w.width ** 2 / mse))


def ssim(x: np.ndarray, ref: np.ndarray, window: WindowLike = "abdomen", win_size: int = 7) -> float:
    """Mean structural similarity, both images clipped to ``window``, data range = the window width.

    Local statistics over a ``win_size`` square uniform window with the unbiased (N-1) covariance, constants
    (0.01 L)^2 and (0.03 L)^2; the mean skips a border of ``win_size // 2`` pixels where the window would leave the
    image.  These are scikit-image's defaults, so the result equals ``structural_similarity(..., data_range=L)``.
    """
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size!r}")
    w = _window(window)
    x, ref = _pair(x, ref)
    if min(x.shape) < win_size:
        raise ValueError(f"image {x.shape} is smaller than the SSIM window {win_size}")
    x, ref = w.clip(x), w.clip(ref)
    c1, c2 = (0.01 * w.width) ** 2, (0.03 * w.width) ** 2
    n = win_size * win_size
    unbias = n / (n - 1.0)

    def mean(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=win_size, mode="reflect")

    mx, my = mean(x), mean(ref)
    vx = unbias * (mean(x * x) - mx * mx)
    vy = unbias * (mean(ref * ref) - my * my)
    cxy = unbias * (mean(x * ref) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    b = win_size // 2
    return float(s[b:-b, b:-b].mean())


# ------------------------------------------------------------------------------------------------------------- ROIs
@dataclass(frozen=True)
class Box:
    """A rectangular ROI: top-left corner (row, column) and size in pixels."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def crop(self, image: np.ndarray) -> np.ndarray:
        if self.top < 0 or self.left < 0 or self.top + self.height > image.shape[0] \
                or self.left + self.width > image.shape[1]:
            raise ValueError(f"ROI {self} does not fit in an image of shape {image.shape}")
        return np.asarray(image)[self.slices]

    def as_list(self) -> list[int]:
        return [self.top, self.left, self.height, self.width]


Roi = Union[Box, np.ndarray]  # a Box or a boolean mask of the image's shape


def _roi_pixels(hu: np.ndarray, roi: Roi) -> np.ndarray:
    hu = np.asarray(hu, dtype=np.float64)
    if isinstance(roi, Box):
        return roi.crop(hu).ravel()
    mask = np.asarray(roi)
    if mask.dtype != bool or mask.shape != hu.shape:
        raise ValueError(f"ROI mask must be boolean with the image's shape {hu.shape}, got {mask.dtype} {mask.shape}")
    return hu[mask]


def find_flat_rois(reference: np.ndarray, tissue: str = "soft_tissue", size: int = 16, n: int = 6,
                   max_sd_hu: Optional[float] = None) -> list[Box]:
    """Find up to ``n`` non-overlapping homogeneous ``size`` x ``size`` ROIs of a tissue class in ``reference``.

    The rule (documented so readers can reproduce it): slide a ``size`` square over the reference slice on a grid of
    ``size // 4`` pixels and judge each position on the square enlarged by a guard band of ``size // 4`` pixels per
    side (so an ROI never touches a tissue boundary, which blurring would smear into it); keep positions whose
    enlarged square has a mean HU in ``TISSUE_HU[tissue]`` and no pixel at or below -1024 HU (clipped or padding
    values, whose SD is not noise); among those take the lowest SD first, greedily, skipping any ROI that overlaps one
    already taken; stop at ``n`` ROIs or when the SD exceeds ``max_sd_hu``.  Run it on the reference (normal-dose)
    slice and measure every image in the same ROIs: all are scored on the same anatomy, and the images measured do
    not carry the selection bias (choosing the lowest-SD squares of a noisy image under-states its own noise by
    about 10 %).  Returns an empty list when the slice has no such region.
    """
    if tissue not in TISSUE_HU:
        raise ValueError(f"unknown tissue {tissue!r}; known: {sorted(TISSUE_HU)}")
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or min(ref.shape) < size:
        raise ValueError(f"reference of shape {ref.shape} cannot hold a {size}x{size} ROI")
    lo, hi = TISSUE_HU[tissue]
    guard = size // 4
    big = size + 2 * guard
    mean = ndimage.uniform_filter(ref, size=big, mode="constant")
    sq = ndimage.uniform_filter(ref * ref, size=big, mode="constant")
    clipped = ndimage.uniform_filter((ref <= ct.HU_MIN).astype(np.float64), size=big, mode="constant")
    sd = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    # uniform_filter centres a window of even size at index big // 2; convert centres to top-left corners.
    half = big // 2
    step = max(1, size // 4)
    tops = np.arange(0, ref.shape[0] - big + 1, step)
    lefts = np.arange(0, ref.shape[1] - big + 1, step)
    if tops.size == 0 or lefts.size == 0:
        return []
    ct_r, ct_c = np.meshgrid(tops + half, lefts + half, indexing="ij")
    m, s, c = mean[ct_r, ct_c], sd[ct_r, ct_c], clipped[ct_r, ct_c]
    ok = (m >= lo) & (m <= hi) & (c < 0.5 / (big * big))
    if max_sd_hu is not None:
        ok &= s <= max_sd_hu
    order = np.argsort(s[ok], kind="stable")
    cand_r, cand_c = (ct_r[ok] - half + guard)[order], (ct_c[ok] - half + guard)[order]
    chosen: list[Box] = []
    for r, col in zip(cand_r, cand_c):
        if all(abs(r - b.top) >= size or abs(col - b.left) >= size for b in chosen):
            chosen.append(Box(int(r), int(col), size, size))
            if len(chosen) == n:
                break
    return chosen


def mask_tiles(image: np.ndarray, mask: np.ndarray, size: int, stride: Optional[int] = None) -> np.ndarray:
    """All ``size`` x ``size`` squares of ``image`` on a ``stride`` grid (default ``size // 2``) that lie wholly inside
    ``mask``, as a stack ``[n, size, size]`` - e.g. crops of a difference image inside the body for :func:`nps_2d`."""
    image, mask = np.asarray(image), np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    stride = stride or max(1, size // 2)
    tiles = [image[r:r + size, c:c + size]
             for r in range(0, image.shape[0] - size + 1, stride)
             for c in range(0, image.shape[1] - size + 1, stride)
             if mask[r:r + size, c:c + size].all()]
    return np.stack(tiles) if tiles else np.zeros((0, size, size), image.dtype)


def noise_sd(hu: np.ndarray, roi: Union[Roi, Sequence[Roi]]) -> float:
    """Noise SD (HU) in one ROI, or the root-mean-square of the per-ROI SDs for several (pooled variance).

    Each ROI's own mean is removed first, so anatomy that differs between ROIs does not count as noise.  Returns NaN
    for an empty list of ROIs.
    """
    rois = [roi] if isinstance(roi, Box) or (isinstance(roi, np.ndarray) and roi.dtype == bool) else list(roi)
    if not rois:
        return float("nan")
    variances = [np.var(_roi_pixels(hu, r), ddof=1) for r in rois]
    return float(np.sqrt(np.mean(variances)))


def cnr(hu: np.ndarray, roi_a: Roi, roi_b: Roi) -> float:
    """Contrast-to-noise ratio ``|mean_a - mean_b| / sqrt((sd_a^2 + sd_b^2) / 2)`` between two ROIs.

    The pooled noise of both ROIs is the denominator (rather than one "background" ROI) so the figure does not depend
    on which tissue is called the background.  Use e.g. a soft-tissue ROI and a fat ROI of the same slice.
    """
    a, b = _roi_pixels(hu, roi_a), _roi_pixels(hu, roi_b)
    noise = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2.0)
    return float(abs(a.mean() - b.mean()) / noise) if noise > 0 else float("inf")


# ---------------------------------------------------------------------------------------------- noise power spectrum
def _detrend(roi: np.ndarray, order: int) -> np.ndarray:
    """Remove the ROI mean (order 0) or a least-squares polynomial surface (order 1 or 2): slow anatomy is not noise."""
    roi = np.asarray(roi, dtype=np.float64)
    if order == 0:
        return roi - roi.mean()
    rr, cc = np.mgrid[0:roi.shape[0], 0:roi.shape[1]]
    rr = rr / roi.shape[0] - 0.5
    cc = cc / roi.shape[1] - 0.5
    terms = [np.ones_like(rr), rr, cc]
    if order >= 2:
        terms += [rr * rr, cc * cc, rr * cc]
    a = np.stack([t.ravel() for t in terms], axis=1)
    coef, *_ = np.linalg.lstsq(a, roi.ravel(), rcond=None)
    return roi - (a @ coef).reshape(roi.shape)


def nps_2d(noise: np.ndarray, pixel_spacing_mm: Sequence[float] = (1.0, 1.0),
           detrend: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D noise power spectrum in HU^2 mm^2, zero frequency at the centre.

    ``noise`` is one 2-D noise realisation or a stack ``[n, h, w]`` of equal-size ROIs (flat-region crops, or crops of
    the difference to a reference).  Each ROI is detrended (``detrend`` = polynomial order 0, 1 or 2), then
    ``NPS = (dy dx / (h w)) <|DFT(roi)|^2>`` averaged over ROIs, the usual CT definition, so the integral of the NPS
    over frequency equals the noise variance.  Returns ``(fy, fx, nps)`` with frequencies in cycles/mm.
    """
    stack = np.asarray(noise, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[0] == 0 or min(stack.shape[1:]) < 4:
        raise ValueError(f"noise must be [h, w] or [n, h, w] with h, w >= 4, got shape {np.shape(noise)}")
    if detrend not in (0, 1, 2):
        raise ValueError(f"detrend must be 0, 1 or 2, got {detrend!r}")
    dy, dx = (float(v) for v in pixel_spacing_mm)
    h, w = stack.shape[1:]
    power = np.zeros((h, w))
    for roi in stack:
        power += np.abs(np.fft.fft2(_detrend(roi, detrend))) ** 2
    nps = np.fft.fftshift(power / len(stack)) * (dy * dx) / (h * w)
    fy = np.fft.fftshift(np.fft.fftfreq(h, d=dy))
    fx = np.fft.fftshift(np.fft.fftfreq(w, d=dx))
    return fy, fx, nps


def radial_average(fy: np.ndarray, fx: np.ndarray, nps: np.ndarray,
                   n_bins: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Average a centred 2-D NPS over rings of radial frequency, up to the lower Nyquist frequency.

    The zero-frequency sample is left out: detrending sets it to about 0, which says nothing about the noise (and
    would dominate a log plot).  Returns ``(f, nps_r)``: ring centres in cycles/mm and the mean NPS in each ring
    (empty rings are dropped).
    """
    fr = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    f_max = min(np.abs(fy).max(), np.abs(fx).max())
    n_bins = n_bins or max(4, min(nps.shape) // 2)
    edges = np.linspace(0.0, f_max, n_bins + 1)
    idx = np.digitize(fr.ravel(), edges) - 1
    keep = (idx >= 0) & (idx < n_bins) & (fr.ravel() > 0)
    sums = np.bincount(idx[keep], weights=nps.ravel()[keep], minlength=n_bins)
    counts = np.bincount(idx[keep], minlength=n_bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    filled = counts > 0
    return centres[filled], sums[filled] / counts[filled]


def nps_radial(noise: np.ndarray, pixel_spacing_mm: Sequence[float] = (1.0, 1.0), detrend: int = 2,
               n_bins: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS ``(f cycles/mm, NPS HU^2 mm^2)`` of a noise image or ROI stack (see :func:`nps_2d`)."""
    return radial_average(*nps_2d(noise, pixel_spacing_mm, detrend), n_bins=n_bins)


def nps_mean_frequency(f: np.ndarray, nps_r: np.ndarray) -> float:
    """Mean frequency of a radial NPS, ``sum(f NPS(f)) / sum(NPS(f))`` in cycles/mm (the CT literature's f_av).

    Lower than the normal-dose image's value means noise texture shifted to coarse blotches.
    """
    f, nps_r = np.asarray(f, dtype=np.float64), np.asarray(nps_r, dtype=np.float64)
    total = nps_r.sum()
    return float((f * nps_r).sum() / total) if total > 0 else float("nan")


# --------------------------------------------------------------------------------------------------------- sharpness
def edge_sharpness(x: np.ndarray, ref: np.ndarray, window: WindowLike = "abdomen", sigma: float = 1.0,
                   edge_sigma: float = 2.0) -> float:
    """Edge sharpness of ``x`` relative to ``ref``: 1.0 = as sharp as the reference, below 1 = blurred.

    Edges are the Canny edges of the reference clipped to ``window`` (smoothing ``edge_sigma``).  At each edge pixel
    both images' gradients (Gaussian derivative, scale ``sigma``, after clipping to the window) are projected on the
    reference's unit edge normal; the result is the ratio of the summed projections.  Projecting on a fixed direction
    makes zero-mean noise cancel instead of adding gradient magnitude, so a noisy but unblurred image scores about
    1.0 and only lost edge contrast lowers the figure.  NaN when the reference has no edges.
    """
    from skimage.feature import canny

    w = _window(window)
    x, ref = _pair(x, ref)
    xc, rc = w.clip(x), w.clip(ref)
    edges = canny(rc, sigma=edge_sigma, low_threshold=0.05 * w.width, high_threshold=0.15 * w.width)
    if not edges.any():
        return float("nan")

    def grad(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (ndimage.gaussian_filter(a, sigma, order=(1, 0)), ndimage.gaussian_filter(a, sigma, order=(0, 1)))

    gry, grx = grad(rc)
    gxy, gxx = grad(xc)
    mag = np.hypot(gry, grx)[edges]
    ny, nx = gry[edges] / mag, grx[edges] / mag
    ref_proj = mag.sum()
    return float((gxy[edges] * ny + gxx[edges] * nx).sum() / ref_proj) if ref_proj > 0 else float("nan")
