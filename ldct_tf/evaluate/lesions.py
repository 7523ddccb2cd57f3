"""Synthetic liver-lesion-like discs, their simulated low-dose scans, and two denoisers known to fail on them.

Why: the audit (``ldct_tf.audit``) and the detectability figures (``ldct_tf.evaluate.detectability``) need ground truth that a
real scan cannot give, "here was a 9 mm, 25 HU hypodense lesion".  A disc is inserted into a NORMAL-dose slice, and
only then is the low-dose scan simulated (``ldct_tf.simulate.simulate_low_dose``), so that the lesion passes through
the projector, the noise and the filtered back projection like real anatomy.  The same slice is simulated again with
the same seed and no lesion, so that ``with - without`` isolates what each denoiser does to the lesion alone.

Placement mimics focal liver lesions: discs 5-15 mm across, 10-40 HU above or below their surroundings, centred in
homogeneous soft tissue (smoothed HU in ``SOFT_TISSUE_HU``, low local SD) well inside the body, never overlapping.

The two known failures: :func:`median_eraser` (a strong median filter, which wipes out small low-contrast discs) and
:class:`DiscPainter` (an otherwise faithful denoiser that paints a disc where there is none, as a hallucinating
network would).  An audit that does not flag them is broken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

SOFT_TISSUE_HU = (20.0, 130.0)
#: Noise settings that make ``simulate_low_dose`` match the real Mayo quarter dose per reconstruction kernel
#: (shared/REFERENCE_FIGURES.md and ldct_tf.simulate's docstring); configs/audit.yaml repeats them with provenance.
KERNEL_SIMULATION = {"D45f": {"i0": 5e5, "filter_name": "ramp"}, "B30f": {"i0": 4.4e5, "filter_name": "hann"}}


@dataclass(frozen=True)
class Lesion:
    """A disc: centre (row, col) in pixels, diameter in mm, contrast in HU (negative: hypodense)."""

    row: float
    col: float
    diameter_mm: float
    contrast_hu: float

    def radius_px(self, spacing_mm: float) -> float:
        return self.diameter_mm / 2.0 / spacing_mm

    def as_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}

    def box(self, spacing_mm: float, margin_px: int = 2) -> list[int]:
        """``[top, left, height, width]`` around the disc."""
        r = self.radius_px(spacing_mm) + margin_px
        top, left = int(np.floor(self.row - r)), int(np.floor(self.col - r))
        size = int(np.ceil(2 * r)) + 1
        return [top, left, size, size]


def disc_image(shape: tuple[int, int], lesions: Sequence[Lesion], spacing_mm: float) -> np.ndarray:
    """The lesions' HU offsets as an image: each disc's contrast inside it, an anti-aliased one-pixel edge."""
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for lesion in lesions:
        dist = np.hypot(rr - lesion.row, cc - lesion.col)
        out += lesion.contrast_hu * np.clip(lesion.radius_px(spacing_mm) - dist + 0.5, 0.0, 1.0)
    return out


def candidate_mask(normal_hu: np.ndarray, spacing_mm: float, max_diameter_mm: float = 15.0,
                   max_local_sd_hu: float = 25.0) -> np.ndarray:
    """Where a disc of ``max_diameter_mm`` fits in homogeneous soft tissue (see the module docstring)."""
    hu = np.asarray(normal_hu, np.float32)
    radius = max_diameter_mm / 2.0 / spacing_mm
    size = int(2 * radius + 7)
    smooth = ndimage.gaussian_filter(hu, 2.0)
    mean = ndimage.uniform_filter(smooth, size)
    sq = ndimage.uniform_filter(smooth * smooth, size)
    sd = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    lo, hi = SOFT_TISSUE_HU
    inside = ndimage.minimum_filter(smooth, size) > lo
    inside &= ndimage.maximum_filter(smooth, size) < hi + 60
    ok = inside & (mean > lo) & (mean < hi) & (sd < max_local_sd_hu)
    margin = size  # keep clear of the image edge
    ok[:margin] = ok[-margin:] = False
    ok[:, :margin] = ok[:, -margin:] = False
    return ok


def place_lesions(normal_hu: np.ndarray, spacing_mm: float, n: int, rng: np.random.Generator,
                  diameter_mm: Sequence[float] = (5.0, 15.0), contrast_hu: Sequence[float] = (10.0, 40.0),
                  avoid: Sequence[Lesion] = (), min_gap_mm: float = 12.0) -> list[Lesion]:
    """Up to ``n`` non-overlapping discs at random candidate positions; hypo- and hyperdense alternate.

    Sizes and |contrasts| are uniform in the given ranges.  Fewer than ``n`` come back when the slice has no room.
    ``avoid`` keeps the new discs clear of existing ones (the painter uses it).
    """
    ok = candidate_mask(normal_hu, spacing_mm, max(diameter_mm))
    rows, cols = np.nonzero(ok)
    placed: list[Lesion] = []
    taken = list(avoid)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    for index in rng.permutation(len(rows)):
        if len(placed) == n:
            break
        r, c = float(rows[index]), float(cols[index])
        d = float(rng.uniform(*diameter_mm))
        gap = (d / 2 + min_gap_mm) / spacing_mm
        if any(np.hypot(r - o.row, c - o.col) < gap + o.radius_px(spacing_mm) for o in taken):
            continue
        lesion = Lesion(r, c, d, sign * float(rng.uniform(*contrast_hu)))
        placed.append(lesion)
        taken.append(lesion)
        sign = -sign
    return placed


def simulation_settings(kernel: str, config: Optional[dict] = None) -> dict:
    """``simulate_low_dose`` keyword arguments for a reconstruction kernel (``config['simulation']`` wins)."""
    table = dict(KERNEL_SIMULATION)
    if config and "simulation" in config:
        table.update({k: dict(v) for k, v in config["simulation"].get("kernels", {}).items()})
    settings = table.get(kernel) or table.get("default") or KERNEL_SIMULATION["D45f"]
    return {"i0": float(settings["i0"]), "filter_name": str(settings["filter_name"])}


@dataclass
class LesionCase:
    """One slice with inserted lesions, simulated at low dose with and without them (same noise seed)."""

    name: str
    lesions: list[Lesion]
    spacing_mm: float
    low_with: np.ndarray
    low_without: np.ndarray
    ref_with: np.ndarray  # the lesion slice through the projector and FBP, no noise
    ref_without: np.ndarray

    @property
    def signal(self) -> np.ndarray:
        """The lesions as the scanner renders them (noise-free): what an observer looks for."""
        return self.ref_with - self.ref_without


def simulate_case(name: str, normal_hu: np.ndarray, spacing_mm: float, lesions: Sequence[Lesion], kernel: str,
                  seed: int, dose_fraction: float = 0.25, config: Optional[dict] = None) -> LesionCase:
    """Insert ``lesions`` into the normal-dose slice, then simulate ``dose_fraction`` dose with and without them."""
    from ldct_tf.simulate import simulate_low_dose

    settings = simulation_settings(kernel, config)
    normal = np.asarray(normal_hu, np.float32)
    with_lesions = normal + disc_image(normal.shape, lesions, spacing_mm)
    low_w, ref_w = simulate_low_dose(with_lesions, dose_fraction, seed=seed, pixel_spacing_mm=spacing_mm, **settings)
    low_o, ref_o = simulate_low_dose(normal, dose_fraction, seed=seed, pixel_spacing_mm=spacing_mm, **settings)
    return LesionCase(name, list(lesions), spacing_mm, low_w, low_o, ref_w, ref_o)


# ------------------------------------------------------------------------------------------------ known failures
def median_eraser(size_px: int = 11) -> Callable[[np.ndarray], np.ndarray]:
    """A strong median filter: removes noise and, with it, small low-contrast discs (and fine anatomy)."""
    if size_px < 3:
        raise ValueError(f"size_px must be >= 3, got {size_px}")

    def erase(hu: np.ndarray) -> np.ndarray:
        return ndimage.median_filter(np.asarray(hu, np.float32), size=size_px)

    return erase


class DiscPainter:
    """A denoiser that paints discs that are not there: ``base(hu) + discs`` at positions chosen per call.

    ``base`` is a faithful denoiser (default: a light Gaussian), so that only the painted discs are wrong; the discs
    follow the lesion size and contrast ranges and keep clear of ``avoid`` (the real inserted lesions).
    ``painted`` holds the discs of the last call, for scoring.
    """

    def __init__(self, spacing_mm: float, n: int = 1, seed: int = 0,
                 base: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 diameter_mm: Sequence[float] = (5.0, 15.0), contrast_hu: Sequence[float] = (10.0, 40.0)):
        self.spacing_mm = float(spacing_mm)
        self.n = int(n)
        self.rng = np.random.default_rng(seed)
        self.base = base or (lambda hu: ndimage.gaussian_filter(np.asarray(hu, np.float32), 0.7))
        self.diameter_mm, self.contrast_hu = tuple(diameter_mm), tuple(contrast_hu)
        self.avoid: Sequence[Lesion] = ()
        self.painted: list[Lesion] = []

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        hu = np.asarray(hu, np.float32)
        self.painted = place_lesions(hu, self.spacing_mm, self.n, self.rng, self.diameter_mm, self.contrast_hu,
                                     avoid=self.avoid)
        return self.base(hu) + disc_image(hu.shape, self.painted, self.spacing_mm)
