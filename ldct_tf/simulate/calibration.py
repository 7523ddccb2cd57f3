"""Unpaired calibration of the low-dose simulator: which ``i0`` and FBP filter make simulated-from-normal slices
carry the noise of a site's real low-dose slices.

A clinic has low-dose scans of some patients and normal-dose scans of others, never both of one patient, so the
calibration cannot compare a slice with itself.  It compares noise STATISTICS instead, per reconstruction kernel:

* in flat soft-tissue tiles inside the body (found on each image alone, no reference needed) it measures each slice's
  tile noise variance;
* it projects each slice itself (the line integrals average its noise away) and reconstructs one realisation of the
  quantum noise that a scan of that body would carry at a reference ``i0`` (times the dose fraction for low-dose
  slices), with each FBP filter: the predicted noise variance of that slice's tiles.  Patients differ in size, and
  noise with them (on the Mayo slices the per-slice i0 estimates span a factor of 7), which is why each slice
  predicts its own noise rather than the two sets being compared directly;
* in the frequency band where that noise is strong and anatomy is weak (above 0.15 cycles/mm), the measured noise
  power of each slice's tiles is proportional to the predicted power, with slope ``i0_ref / i0`` (the quantum noise
  variance is proportional to 1 / i0): one least-squares slope over the slices of BOTH sets gives ``i0``, the
  per-slice ratios of the low set its range; the filter is the one whose predicted NPS mean frequency is nearest that
  measured on the low-dose slices.

``i0`` and the dose fraction ``k`` enter the added noise only through ``(1 - k) / (k i0)``: from images alone they
cannot be told apart.  ``k`` comes from the headers (CTDIvol ratio of the two sets) when they differ, else from the
caller (the Mayo quarter-dose images carry the full-dose CTDIvol, so 0.25 is given), and ``i0`` is fitted for it.

The result is a small JSON file (:func:`save`) that the simulated-pair stream, ``evaluate --simulate`` and the exported
model's metadata read.  ``python -m ldct_tf.simulate calibrate --data SHARDS --out calibration.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ldct_tf import simulate

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
REFERENCE_I0 = 1e6
TILE = 32
FORMAT_VERSION = 1


def flat_mask(hu: np.ndarray, tissue_hu: tuple[float, float] = (-150.0, 200.0), max_gradient_hu: float = 6.0,
              margin_px: int = 8) -> np.ndarray:
    """Pixels inside the body where the heavily smoothed image is soft tissue and nearly flat.

    Works on one image with no reference: smoothing (sigma 4 px) removes quarter-dose noise well enough that what
    remains is anatomy, and a small smoothed gradient means no organ boundary crosses the neighbourhood.
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(hu, np.float64), 4.0)
    gradient = np.hypot(*np.gradient(smooth))
    return (simulate.body_mask(hu, margin_px=margin_px) & (smooth > tissue_hu[0]) & (smooth < tissue_hu[1])
            & (gradient < max_gradient_hu))


def _detrended_tiles(image: np.ndarray, mask: np.ndarray, tile: int) -> np.ndarray:
    """Tiles wholly inside ``mask``, each with its least-squares plane removed (slow anatomy is not noise)."""
    tiles = _tiles(image, mask, tile)
    if len(tiles) == 0:
        return tiles
    rr, cc = np.mgrid[0:tile, 0:tile]
    design = np.stack([np.ones(tile * tile), rr.ravel() / tile - 0.5, cc.ravel() / tile - 0.5], axis=1)
    flat = tiles.reshape(len(tiles), -1).T
    coef, *_ = np.linalg.lstsq(design, flat, rcond=None)
    return (flat - design @ coef).T.reshape(tiles.shape)


def _tiles(image: np.ndarray, mask: np.ndarray, tile: int) -> np.ndarray:
    from ldct_tf import metrics

    return metrics.mask_tiles(np.asarray(image, np.float64), mask, tile, stride=tile)


#: Below this spatial frequency anatomy (organ texture, vessels) dominates a flat tile's power spectrum.
MIN_BAND_FREQ = 0.15


def _slice_evidence(hu: np.ndarray, dose: float, spacing: tuple, filters: Sequence[str], electronic_noise: float,
                    tile: int, rng: np.random.Generator, n_angles: Optional[int]) -> Optional[dict]:
    """Measured radial NPS of one slice's flat tiles, and per filter the predicted quantum-noise NPS of the same
    tiles at ``dose * REFERENCE_I0``; None when the slice has no flat tile."""
    from ldct_tf import metrics

    mask = flat_mask(hu)
    measured = _detrended_tiles(hu, mask, tile)
    if len(measured) == 0:
        return None
    simulator = simulate.ProjectionSimulator(hu, float(np.mean(spacing)), n_angles)
    sino_noise = simulator.sinogram_noise(dose, REFERENCE_I0, electronic_noise, noise_model="gaussian", rng=rng)
    f, nps = metrics.nps_radial(measured, spacing, detrend=0)
    predicted = {name: metrics.nps_radial(_detrended_tiles(simulator.noise_hu(sino_noise, name), mask, tile),
                                          spacing, detrend=0)[1] for name in filters}
    return {"f": f, "nps": nps, "predicted": predicted, "tiles": int(len(measured))}


def calibrate_kernel(low_slices: Sequence[np.ndarray], normal_slices: Sequence[np.ndarray],
                     pixel_spacing_mm: Sequence[float], dose_fraction: float = 0.25,
                     filters: Sequence[str] = FILTERS, electronic_noise: float = simulate.ELECTRONIC_NOISE_VAR,
                     tile: int = TILE, seed: int = 0, n_angles: Optional[int] = None) -> dict:
    """Fit ``i0`` (for ``dose_fraction``) and the FBP filter from real ``low_slices`` and ``normal_slices`` of other
    patients (no pairs; see the module docstring).  Returns the fitted parameters and the evidence."""
    from ldct_tf import metrics

    if not low_slices or not normal_slices:
        raise simulate.SimulationError("calibration needs at least one low-dose and one normal-dose slice")
    if not 0.0 < dose_fraction < 1.0:
        raise simulate.SimulationError(f"dose_fraction must be in (0, 1), got {dose_fraction!r}")
    spacing = tuple(float(s) for s in pixel_spacing_mm)
    rng = np.random.default_rng(seed)
    evidence: dict[str, list] = {"low": [], "normal": []}
    from tqdm import tqdm  # a bar on a terminal only (disable=None): each slice is a projection and FBPs, seconds

    for side, slices, dose in (("low", low_slices, dose_fraction), ("normal", normal_slices, 1.0)):
        for hu in tqdm(slices, desc=f"calibrating on {side}-dose slices", unit="slice", leave=False, disable=None):
            item = _slice_evidence(np.asarray(hu, np.float64), dose, spacing, filters, electronic_noise, tile, rng,
                                   n_angles)
            if item is not None:
                evidence[side].append(item)
    if not evidence["low"] or not evidence["normal"]:
        raise simulate.SimulationError("no flat soft-tissue tile found in the low- or the normal-dose slices")
    f = evidence["low"][0]["f"]
    floor = min(MIN_BAND_FREQ, 0.25 * float(f.max()))  # coarse pixels: a quarter of Nyquist
    low_nps = np.mean([e["nps"] for e in evidence["low"]], axis=0)
    low_freq = metrics.nps_mean_frequency(f[f >= floor], low_nps[f >= floor])
    results = {}
    for name in filters:
        # The frequency band where this filter's noise is strong and anatomy is not: the measured power there is
        # quantum noise, so its ratio to the predicted power is i0_ref / i0.
        shape = np.mean([e["predicted"][name] for e in evidence["low"]], axis=0)
        band = (f >= floor) & (shape >= 0.25 * shape[f >= floor].max())
        measured = {side: np.array([e["nps"][band].sum() for e in items]) for side, items in evidence.items()}
        predicted = {side: np.array([e["predicted"][name][band].sum() for e in items])
                     for side, items in evidence.items()}
        m, pr = np.concatenate(list(measured.values())), np.concatenate(list(predicted.values()))
        slope = float(pr @ m / (pr @ pr))
        per_side = {side: float(REFERENCE_I0 / (predicted[side] @ measured[side] / (predicted[side] @ predicted[side])))
                    for side in evidence}
        per_slice = REFERENCE_I0 * predicted["low"] / measured["low"]
        pred_low = slope * np.mean([e["predicted"][name] for e in evidence["low"]], axis=0)
        freq = metrics.nps_mean_frequency(f[f >= floor], pred_low[f >= floor])
        results[name] = {"i0": float(REFERENCE_I0 / slope), "i0_from_low_only": per_side["low"],
                         "i0_from_normal_only": per_side["normal"],
                         "i0_per_low_slice": [float(v) for v in per_slice],
                         "i0_range": [float(per_slice.min()), float(per_slice.max())],
                         "band_cycles_per_mm": [float(f[band].min()), float(f[band].max())],
                         "nps_mean_freq": freq, "nps_mean_freq_error": abs(freq - low_freq)}
    best = min(results, key=lambda n: results[n]["nps_mean_freq_error"])
    return {"i0": results[best]["i0"], "i0_range": results[best]["i0_range"], "filter_name": best,
            "dose_fraction": float(dose_fraction),
            "electronic_noise": float(electronic_noise), "noise_model": "insert",
            "measured": {"low_nps_mean_freq_above_band_floor": low_freq,
                         "tiles": {side: [e["tiles"] for e in items] for side, items in evidence.items()}},
            "fit": results[best], "filters": results,
            "low_slices": len(evidence["low"]), "normal_slices": len(evidence["normal"]),
            "pixel_spacing_mm": list(spacing)}


def dose_fraction_from_headers(low_ctdivol: Sequence[float], normal_ctdivol: Sequence[float]) -> Optional[float]:
    """CTDIvol ratio of the two sets when the headers tell them apart (< 0.95), else None (e.g. noise-inserted data
    that carries the full-dose CTDIvol)."""
    low = [v for v in low_ctdivol if v > 0]
    normal = [v for v in normal_ctdivol if v > 0]
    if not low or not normal:
        return None
    ratio = float(np.median(low) / np.median(normal))
    return ratio if 0.0 < ratio < 0.95 else None


# ------------------------------------------------------------------------------------------------------ the file
def save(calibration: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **calibration}, indent=1) + "\n")
    return path


def load(path: str | Path) -> dict:
    """Read a calibration file; a missing or malformed one raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        calibration = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise simulate.SimulationError(f"{path}: cannot read the calibration: {exc}") from None
    if calibration.get("format_version") != FORMAT_VERSION or not calibration.get("kernels"):
        raise simulate.SimulationError(f"{path}: not an ldct_tf calibration file (format_version {FORMAT_VERSION}, "
                                       "'kernels')")
    return calibration


def _kernel_entry(calibration: dict, kernel: Optional[str]) -> dict:
    """The calibration of ``kernel``, or the default kernel's when it was not calibrated."""
    kernels = calibration["kernels"]
    return kernels.get(kernel or "") or kernels[calibration.get("default_kernel") or next(iter(kernels))]


def simulation_parameters(calibration: dict, kernel: Optional[str] = None) -> dict:
    """The simulation parameters for ``kernel`` (the default kernel's when it was not calibrated): the keyword
    arguments of :func:`ldct_tf.simulate.simulate_low_dose` plus ``i0_range``, the spread of the per-slice i0
    estimates of the low-dose set (patients differ: the simulated stream samples i0 across it)."""
    entry = _kernel_entry(calibration, kernel)
    return {key: entry[key] for key in ("dose_fraction", "i0", "i0_range", "filter_name", "electronic_noise",
                                        "noise_model")}


def normal_dose_i0(calibration: dict, kernel: Optional[str] = None) -> float:
    """The i0 whose noise the normal-dose slices themselves carry, fitted from the normal side alone
    (``fit.i0_from_normal_only``): what ``loss.noisier2noise_i0`` needs to know how much noise the reference has."""
    entry = _kernel_entry(calibration, kernel)
    return float(entry["fit"]["i0_from_normal_only"])


def texture_variants(calibration: dict, kernel: Optional[str] = None) -> list[dict]:
    """:func:`simulation_parameters` for ``kernel``, then the same with every other FBP filter the calibration fitted
    (each at its own fitted i0 and range): the noise textures from sharp to smooth at the calibrated level.

    Why: a denoiser trained only on the fitted (sharp, ramp-like) texture learns to keep smoother noise as anatomy;
    the simulated stream mixes these textures in so that kernels it could not calibrate (no normal-dose slice of
    that kernel) are still covered.
    """
    fitted = simulation_parameters(calibration, kernel)
    entry = _kernel_entry(calibration, kernel)
    others = [{**fitted, "filter_name": name, "i0": fit["i0"], "i0_range": fit["i0_range"]}
              for name, fit in sorted((entry.get("filters") or {}).items()) if name != fitted["filter_name"]]
    return [fitted, *others]


# -------------------------------------------------------------------------------------------------------- the CLI
def _slices_by_kernel(data_dir: str, split: str, dose: str, max_slices: int) -> dict:
    from ldct_tf import data

    out: dict[str, dict] = {}
    for hu, meta in data.slice_dataset(data_dir, split, dose):
        kernel = meta["kernel"].numpy().decode() or "unknown"
        entry = out.setdefault(kernel, {"slices": [], "ctdivol": [], "spacing": []})
        if len(entry["slices"]) < max_slices and hu.shape[0] == hu.shape[1]:
            entry["slices"].append(hu.numpy()[..., 0].astype(np.float64))
            entry["ctdivol"].append(float(meta["ctdivol"]))
            entry["spacing"].append([float(v) for v in meta["pixel_spacing_mm"].numpy()])
    return out


def calibrate_shards(data_dir: str, split: str = "train", max_slices: int = 6,
                     dose_fraction: float = 0.25) -> dict:
    """Calibrate every kernel that has both low- and normal-dose slices in ``split`` of a pipeline output.  Shards
    that cannot be read (another schema, a bad split) raise :class:`ldct_tf.simulate.SimulationError`."""
    try:
        lows = _slices_by_kernel(data_dir, split, "low", max_slices)
        normals = _slices_by_kernel(data_dir, split, "normal", max_slices)
    except simulate.SimulationError:
        raise
    except ValueError as exc:  # ldct_tf.data's checks of the manifest and the split
        raise simulate.SimulationError(str(exc)) from None
    kernels, skipped = {}, {}
    for kernel in sorted(set(lows) | set(normals)):
        if kernel not in lows or kernel not in normals:
            skipped[kernel] = f"no {'normal' if kernel in lows else 'low'}-dose slices of this kernel"
            continue
        low, normal = lows[kernel], normals[kernel]
        header_k = dose_fraction_from_headers(low["ctdivol"], normal["ctdivol"])
        spacing = np.mean(np.array(low["spacing"] + normal["spacing"]), axis=0)
        fitted = calibrate_kernel(low["slices"], normal["slices"], spacing, header_k or dose_fraction)
        fitted["dose_fraction_source"] = "header CTDIvol ratio" if header_k else "given (--dose-fraction)"
        kernels[kernel] = fitted
        measured = fitted["measured"]["low_nps_mean_freq_above_band_floor"]
        print(f"{kernel}: i0 {fitted['i0']:.3g}, filter {fitted['filter_name']}, NPS mean frequency "
              f"{fitted['fit']['nps_mean_freq']:.3f} vs {measured:.3f} cycles/mm on the low-dose slices", flush=True)
    if not kernels:
        raise simulate.SimulationError(f"{data_dir}: no kernel has both low- and normal-dose slices in split {split!r}")
    default = max(kernels, key=lambda k: kernels[k]["low_slices"])
    return {"kernels": kernels, "default_kernel": default, "not_calibrated": skipped,
            "source": {"split": split, "max_slices_per_kernel_and_dose": max_slices}}
