"""The numbers behind the per-slice change audit: patch-wise Fourier ring correlation and method-noise structure.

Why these two signals, and why reference-free: in a clinic there is no normal-dose twin of a low-dose scan, so the only
trustworthy image to compare the denoised slice with is the low-dose input itself, the standard-of-care
reconstruction.  A denoiser may remove noise; it must not remove or invent anatomy.

1. *Scanning FRC* (the sFRC idea of the FDA/DIDSR group, Kc et al., github.com/DIDSR/sfrc): cut both images into
   small overlapping patches and compute, per patch, the Fourier ring correlation between the denoised patch and the
   input patch.  Noise lives at high spatial frequencies; anatomy at low ones.  Where the two images share their
   anatomy, the correlation at low frequencies stays high whatever the denoiser did to the noise; a patch whose
   correlation breaks down in the *anatomy band* (``frc_band_cyc_per_mm``) holds something that is in one image and
   not in the other.  Our score is the mean FRC over the rings of that band (one number per patch; low = suspicious).
2. *Method noise* (Buades et al.): the residual ``input - output`` is what the denoiser removed.  It should look like
   the scanner's noise.  A band-pass of it (difference of Gaussians at lesion scale, ``blob_sigmas_mm``) shows a
   removed or painted lesion as a blob.  ``blob_hu`` is the strongest such blob (HU) in the patch's central
   ``stride`` square, looked for only in soft tissue away from strong edges (``soft_tissue_hu``,
   ``edge_clearance_mm``; only the soft-tissue part of the residual is band-passed, so what a denoiser did to bone
   and air does not leak into it) and where the blob is most of the band-passed input (``removed_fraction_min``: an
   erased lesion is all of it, a painted one more; a vessel made brighter or darker by a few HU is a fraction), and
   ``blob_z`` is the same divided by the
   residual's own robust SD over the body, so that a strong denoiser's larger residual noise is not read as a blob.
   ``anatomy_corr`` is the Pearson correlation of the band-passed residual with the band-passed output, counted only
   where the residual has structure (``structure_hu``): a residual that follows the anatomy's edges means anatomy
   was smoothed away.

A patch is flagged when a score crosses its threshold (:class:`AuditThresholds`, from ``configs/audit.yaml``): FRC
below ``frc_min``; ``blob_z`` above ``blob_z_max`` with ``blob_hu`` above ``blob_hu_min``; ``anatomy_corr`` above
``anatomy_corr_max`` with ``structure_hu`` above ``anatomy_hu_min``.  The three tuned thresholds are set on development
patients by the rule of ``ldct_tf.audit.calibration`` (``python -m experiments.audit_thresholds``); the two HU floors
are physical choices, not tuned.
Everything is vectorised (one batched FFT over all patches, one matrix product for the ring sums, separable filters):
``python -m benchmarks.audit`` measures the cost per 512x512 slice beside the model's inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ldct_tf.errors import LdctError

REPO = Path(__file__).resolve().parents[2]  # ldct_tf/STAGE/this file -> the checkout
_PAIRS = ("frc_band_cyc_per_mm", "blob_sigmas_mm", "soft_tissue_hu")
DEFAULT_CONFIG = REPO / "configs" / "audit.yaml"


@dataclass(frozen=True)
class AuditThresholds:
    """Patch geometry, frequency band and the flag thresholds (``configs/audit.yaml``, section ``audit``)."""

    patch_px: int = 48
    stride_px: int = 24
    body_threshold_hu: float = -500.0
    min_body_fraction: float = 0.9  # a patch is scored when this share of its pixels is inside the body
    frc_band_cyc_per_mm: tuple[float, float] = (0.03, 0.25)
    blob_sigmas_mm: tuple[float, float] = (2.0, 6.0)
    band_sd_floor_hu: float = 0.5  # a band-passed residual smaller than this is "nothing removed", not a z of infinity
    soft_tissue_hu: tuple[float, float] = (-150.0, 250.0)  # blobs are looked for where the smoothed input is in here
    max_local_range_hu: float = 250.0  # ... and far from strong edges: the smoothed input's range within
    edge_clearance_mm: float = 6.0  # this distance stays below max_local_range_hu
    frc_min: float = 0.0  # flag when the anatomy-band FRC is below this
    blob_z_max: float = float("inf")  # flag when max |z| of the band-passed residual exceeds this ...
    blob_hu_min: float = 5.0  # ... and the blob is at least this strong in HU (a 10 HU lesion gives about 5)
    removed_fraction_min: float = 0.5  # ... and it is at least this share of the band-passed input there
    anatomy_corr_max: float = 1.0  # flag when the residual correlates with the anatomy more than this ...
    anatomy_hu_min: float = 3.0  # ... and the band-passed residual's SD in the patch is at least this (HU)

    def __post_init__(self):
        if self.patch_px < 8 or self.stride_px < 1:
            raise ValueError(f"patch_px must be >= 8 and stride_px >= 1, got {self.patch_px}, {self.stride_px}")
        lo, hi = self.frc_band_cyc_per_mm
        if not 0 <= lo < hi:
            raise ValueError(f"frc_band_cyc_per_mm must be [low, high] with 0 <= low < high, got {[lo, hi]}")
        s1, s2 = self.blob_sigmas_mm
        if not 0 < s1 < s2:
            raise ValueError(f"blob_sigmas_mm must be [small, large] with 0 < small < large, got {[s1, s2]}")

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in _PAIRS:
            out[key] = list(out[key])
        return out


class AuditConfigError(LdctError, ValueError):
    """The audit config file is missing or malformed (the message names the file)."""


def load_config(path: Optional[str | Path] = None) -> dict:
    """The whole audit config file (thresholds, their provenance, lesion simulation settings) as a dict."""
    import yaml

    path = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AuditConfigError(f"{path}: audit config not found") from None
    except yaml.YAMLError as exc:
        raise AuditConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("audit"), dict):
        raise AuditConfigError(f"{path}: expected a mapping with an 'audit' section")
    return data


def load_thresholds(path: Optional[str | Path] = None, **overrides) -> AuditThresholds:
    """:class:`AuditThresholds` from ``path`` (default ``configs/audit.yaml``); unknown keys are errors."""
    section = dict(load_config(path)["audit"])
    section.update(overrides)
    known = set(AuditThresholds.__dataclass_fields__)
    unknown = set(section) - known
    if unknown:
        raise AuditConfigError(f"{path or DEFAULT_CONFIG}: unknown audit keys {sorted(unknown)}; known: "
                               f"{sorted(known)}")
    try:
        for key in _PAIRS:
            if key in section:
                section[key] = tuple(float(v) for v in section[key])
        return AuditThresholds(**section)
    except (TypeError, ValueError) as exc:
        raise AuditConfigError(f"{path or DEFAULT_CONFIG}: {exc}") from None


# ------------------------------------------------------------------------------------------------ patch geometry
def patch_corners(shape: tuple[int, int], patch: int, stride: int) -> np.ndarray:
    """Top-left corners ``[n, 2]`` of a ``patch`` grid with ``stride``; the last row/column is flush with the edge."""
    def starts(n: int) -> np.ndarray:
        if n < patch:
            return np.zeros(0, int)
        s = list(range(0, n - patch + 1, stride))
        if s[-1] != n - patch:
            s.append(n - patch)
        return np.asarray(s)

    rows, cols = starts(shape[0]), starts(shape[1])
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1)


def extract_patches(image: np.ndarray, corners: np.ndarray, patch: int) -> np.ndarray:
    """``[n, patch, patch]`` views of ``image`` at ``corners`` (one fancy-index, no Python loop)."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(image), (patch, patch))
    return windows[corners[:, 0], corners[:, 1]]


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Pixels inside the patient: the largest connected region above ``threshold_hu`` (lightly smoothed), holes
    filled.  The table and air are outside."""
    smooth = ndimage.uniform_filter(np.asarray(hu, np.float32), 5) > threshold_hu
    labels, count = ndimage.label(smooth)
    if count == 0:
        return np.zeros(np.shape(hu), bool)
    largest = 1 + int(np.argmax(ndimage.sum(smooth, labels, range(1, count + 1))))
    return ndimage.binary_fill_holes(labels == largest)


# ------------------------------------------------------------------------------------------------ FRC
def ring_matrix(patch: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot ring membership ``[patch*patch, rings]`` of the FFT grid (ring k = |f| in [k-0.5, k+0.5) cycles per
    patch) and each ring's radius in cycles per pixel; rings beyond Nyquist are dropped."""
    f = np.fft.fftfreq(patch) * patch
    radius = np.rint(np.hypot(*np.meshgrid(f, f, indexing="ij"))).astype(int).ravel()
    rings = patch // 2 + 1
    onehot = np.zeros((patch * patch, rings), np.float32)
    keep = radius < rings
    onehot[np.flatnonzero(keep), radius[keep]] = 1.0
    return onehot, np.arange(rings) / patch


def frc_curves(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of patch stacks ``a``, ``b`` ``[n, p, p]``: ``(curves [n, rings], f cycles/pixel)``.

    Each patch's mean is removed and a 2-D Hann window applied first (edges of a cut patch would otherwise put
    spurious power on the axes); FRC_k = Re(sum A B*) / sqrt(sum |A|^2 sum |B|^2) over ring k.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    n, p, _ = a.shape
    hann = np.hanning(p + 2)[1:-1]
    window = np.outer(hann, hann).astype(np.float32)
    fa = np.fft.fft2((a - a.mean(axis=(1, 2), keepdims=True)) * window).reshape(n, -1)
    fb = np.fft.fft2((b - b.mean(axis=(1, 2), keepdims=True)) * window).reshape(n, -1)
    onehot, freq = ring_matrix(p)
    cross = np.real(fa * np.conj(fb)) @ onehot
    power = (np.abs(fa) ** 2 @ onehot) * (np.abs(fb) ** 2 @ onehot)
    with np.errstate(invalid="ignore", divide="ignore"):
        curves = np.where(power > 0, cross / np.sqrt(power), 0.0)
    return curves, freq


def band_rings(freq_cyc_per_px: np.ndarray, spacing_mm: float, band: Sequence[float]) -> np.ndarray:
    """Boolean mask of the rings whose frequency in cycles/mm lies in ``band`` (at least ring 1 is kept)."""
    f_mm = freq_cyc_per_px / spacing_mm
    sel = (f_mm >= band[0]) & (f_mm <= band[1]) & (np.arange(len(f_mm)) > 0)
    if not sel.any():
        sel = np.zeros(len(f_mm), bool)
        sel[1] = True
    return sel


# ------------------------------------------------------------------------------------------------ method noise
def _robust_sd(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _gaussian_transfer(shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """The Fourier transfer function of a Gaussian blur of ``sigma_px`` on an ``rfft2`` grid of ``shape``."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2.0 * np.pi ** 2 * sigma_px ** 2 * (fy * fy + fx * fx)).astype(np.float32)


class _Spectral:
    """Gaussian filtering by FFT (a few ms for a 512x512 slice, against ~50 ms per wide spatial Gaussian): images
    are reflect-padded by at least three large sigmas, up to a size the FFT handles fast, so nothing wraps around."""

    def __init__(self, shape: tuple[int, int], sigmas_px: Sequence[float]):
        from scipy import fft

        self._fft = fft
        pad = int(np.ceil(3 * max(sigmas_px)))
        self.shape = tuple(fft.next_fast_len(n + 2 * pad, real=True) for n in shape)
        self.before = (pad, pad)
        self.after = (self.shape[0] - shape[0] - pad, self.shape[1] - shape[1] - pad)
        self.size = tuple(shape)
        self.transfer = [_gaussian_transfer(self.shape, s) for s in sigmas_px]

    def spectrum(self, image: np.ndarray) -> np.ndarray:
        widths = [(self.before[0], self.after[0]), (self.before[1], self.after[1])]
        padded = np.pad(np.asarray(image, np.float32), widths, mode="reflect")
        return self._fft.rfft2(padded)

    def back(self, spectrum: np.ndarray) -> np.ndarray:
        full = self._fft.irfft2(spectrum, s=self.shape)
        return full[self.before[0]:self.before[0] + self.size[0], self.before[1]:self.before[1] + self.size[1]]


def bandpass(image: np.ndarray, sigmas_px: Sequence[float]) -> np.ndarray:
    """Difference of Gaussians: keeps structures of about lesion size, drops pixel noise and slow trends."""
    spectral = _Spectral(np.shape(image), sigmas_px)
    return spectral.back(spectral.spectrum(image) * (spectral.transfer[0] - spectral.transfer[1]))


@dataclass
class SliceAudit:
    """The audit of one slice: per-patch scores, which patches are flagged, and slice-level figures."""

    corners: np.ndarray  # [n, 2] top-left (row, col) of every scored patch
    patch_px: int
    frc_band: np.ndarray  # [n] mean FRC over the anatomy band
    blob_z: np.ndarray  # [n] max |z| of the band-passed residual in the patch's soft tissue
    blob_hu: np.ndarray  # [n] |band-passed residual| (HU) where that maximum is
    anatomy_corr: np.ndarray  # [n] Pearson corr(band-passed residual, band-passed output)
    structure_hu: np.ndarray  # [n] SD of the band-passed residual in the patch (HU)
    flags: np.ndarray  # [n, 3] bool: frc, blob, anatomy
    residual_sd_hu: float  # robust SD of the residual in the body (what was removed, mostly noise)
    residual_mean_hu: float  # mean of the residual in the body (a global HU shift)
    band_residual_sd_hu: float  # robust SD of the band-passed residual: the z-map's unit
    extra: dict = field(default_factory=dict)

    @property
    def flagged(self) -> np.ndarray:
        return self.flags.any(axis=1)

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())

    def boxes(self, flagged_only: bool = True) -> list[list[int]]:
        """``[top, left, height, width]`` per (flagged) patch."""
        sel = self.flagged if flagged_only else np.ones(len(self.corners), bool)
        return [[int(r), int(c), self.patch_px, self.patch_px] for r, c in self.corners[sel]]

    def summary(self) -> dict:
        """Slice-level scores (JSON-ready): counts, the worst patch score of each signal, residual figures."""
        def worst(values: np.ndarray, fn) -> Optional[float]:
            return float(fn(values)) if len(values) else None

        return {
            "patches": int(len(self.corners)), "flagged_patches": self.n_flagged,
            "flagged_by": {"frc": int(self.flags[:, 0].sum()), "blob": int(self.flags[:, 1].sum()),
                           "anatomy": int(self.flags[:, 2].sum())},
            "frc_band_min": worst(self.frc_band, np.min), "frc_band_median": worst(self.frc_band, np.median),
            "blob_z_max": worst(self.blob_z, np.max), "blob_hu_max": worst(self.blob_hu, np.max),
            "anatomy_corr_max": worst(self.anatomy_corr, np.max),
            "residual_sd_hu": self.residual_sd_hu, "residual_mean_hu": self.residual_mean_hu,
            "band_residual_sd_hu": self.band_residual_sd_hu,
        }

    def flagged_patches(self) -> list[dict]:
        """One dict per flagged patch: box, its three scores and which of them crossed its threshold."""
        out = []
        for i in np.flatnonzero(self.flagged):
            r, c = self.corners[i]
            out.append({"box": [int(r), int(c), self.patch_px, self.patch_px],
                        "frc_band": float(self.frc_band[i]), "blob_z": float(self.blob_z[i]),
                        "blob_hu": float(self.blob_hu[i]), "anatomy_corr": float(self.anatomy_corr[i]),
                        "structure_hu": float(self.structure_hu[i]),
                        "why": [name for name, hit in zip(("frc", "blob", "anatomy"), self.flags[i]) if hit]})
        return out


def audit_slice(low_hu: np.ndarray, denoised_hu: np.ndarray, pixel_spacing_mm: Sequence[float] = (0.7, 0.7),
                thresholds: Optional[AuditThresholds] = None) -> SliceAudit:
    """Audit one denoised slice against its low-dose input (both HU, same shape); see the module docstring."""
    t = thresholds or AuditThresholds()
    low = np.asarray(low_hu, np.float32)
    out = np.asarray(denoised_hu, np.float32)
    if low.ndim != 2 or low.shape != out.shape:
        raise ValueError(f"audit needs two 2-D slices of one shape, got {low.shape} and {out.shape}")
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(out))):
        raise ValueError("audit: slices contain NaN or Inf")
    spacing = float(np.mean(pixel_spacing_mm))
    p = min(t.patch_px, *low.shape)
    body = body_mask(low, t.body_threshold_hu)
    corners = patch_corners(low.shape, p, t.stride_px)
    inside = extract_patches(body, corners, p).mean(axis=(1, 2)) >= t.min_body_fraction
    corners = corners[inside]

    residual = low - out
    sig = [s / spacing for s in t.blob_sigmas_mm]
    spectral = _Spectral(low.shape, sig)
    f_res, f_low = spectral.spectrum(residual), spectral.spectrum(low)
    dog = spectral.transfer[0] - spectral.transfer[1]
    band_res = spectral.back(f_res * dog)
    band_out = spectral.back((f_low - f_res) * dog)  # the output is input - residual
    smooth_in = spectral.back(f_low * spectral.transfer[0])
    res_sd = _robust_sd(residual[body])
    band_sd = max(_robust_sd(band_res[body]), t.band_sd_floor_hu)
    reach = max(3, 2 * int(round(t.edge_clearance_mm / spacing)) + 1)
    local_range = ndimage.maximum_filter(smooth_in, reach) - ndimage.minimum_filter(smooth_in, reach)
    light = ndimage.uniform_filter(low, 3)
    hard = (light < t.soft_tissue_hu[0]) | (light > t.soft_tissue_hu[1])  # bone, air, their partial volume
    hard = ndimage.maximum_filter(hard, max(3, 2 * int(round(2.0 / spacing)) + 1))  # and 2 mm around them
    soft_px = body & ~hard & (smooth_in >= t.soft_tissue_hu[0]) & (smooth_in <= t.soft_tissue_hu[1])
    # blobs are band-passed from the soft-tissue part of the residual only: what a denoiser did to bone and air
    # edges (often hundreds of HU) must not leak into the soft tissue beside them
    band_soft = spectral.back(spectral.spectrum(np.where(soft_px, residual, 0.0)) * dog)
    soft = soft_px & (local_range <= t.max_local_range_hu)
    # a lesion erased or painted in is (about) all of the band-passed input there, or more; a denoiser that
    # sharpens or dims a vessel that both images show changes only a fraction of it
    band_low = spectral.back(f_low * dog)
    wholesale = np.abs(band_soft) >= t.removed_fraction_min * np.abs(band_low)
    blob_map = np.where(soft & wholesale, np.abs(band_soft), 0.0)

    n = len(corners)
    if n:
        curves, freq = frc_curves(extract_patches(out, corners, p), extract_patches(low, corners, p))
        frc_band = curves[:, band_rings(freq, spacing, t.frc_band_cyc_per_mm)].mean(axis=1)
        # a blob belongs to the patch whose central stride x stride square holds it, so overlapping patches do
        # not all report the same lesion
        core = min(t.stride_px, p)
        offset = (p - core) // 2
        blob_hu = extract_patches(blob_map, corners + offset, core).reshape(n, -1).max(axis=1)
        blob_z = blob_hu / band_sd
        ra = extract_patches(band_res, corners, p).reshape(n, -1).astype(np.float64)
        oa = extract_patches(band_out, corners, p).reshape(n, -1).astype(np.float64)
        ra -= ra.mean(axis=1, keepdims=True)
        oa -= oa.mean(axis=1, keepdims=True)
        structure = ra.std(axis=1)
        denom = np.sqrt((ra * ra).sum(axis=1) * (oa * oa).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where(denom > 0, (ra * oa).sum(axis=1) / denom, 0.0)
        flags = np.stack([frc_band < t.frc_min,
                          (blob_z > t.blob_z_max) & (blob_hu > t.blob_hu_min),
                          (corr > t.anatomy_corr_max) & (structure > t.anatomy_hu_min)], axis=1)
    else:
        frc_band = blob_z = blob_hu = corr = structure = np.zeros(0)
        flags = np.zeros((0, 3), bool)
    return SliceAudit(corners=corners, patch_px=p, frc_band=frc_band, blob_z=blob_z, blob_hu=blob_hu,
                      anatomy_corr=corr, structure_hu=structure, flags=flags, residual_sd_hu=res_sd,
                      residual_mean_hu=float(residual[body].mean()) if body.any() else 0.0,
                      band_residual_sd_hu=float(band_sd))
