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
cannot be told apart.  ``k`` comes from the user, or from the headers of MATCHED slices only: a low-dose and a
normal-dose slice of the same patient (and study, where known) at the same table position.  Under tube-current
modulation CTDIvol follows the body along z (5 to 28 mGy within one Mayo series), so a ratio of unmatched slices
measures anatomy, not dose; and noise-inserted data (Mayo's quarter dose) carry the full-dose CTDIvol, a ratio of 1
that is not credible.  In both cases the calibration says so in one line and uses the given value; a value the user
gave is never replaced (:func:`resolve_dose_fraction`).

Every flat tile of every slice is used, and the i0 of each kernel comes with a bootstrap 95 % interval over slices
(patients differ more than tiles do, so the slice is the unit that is resampled).

The result is a small JSON file (:func:`save`) that the simulated-pair stream, ``evaluate --simulate`` and the exported
model's metadata read.  ``python -m ldct_tf.simulate calibrate --data SHARDS --out calibration.json``, or
straight from DICOM files or folders: ``--low PATH... --normal PATH...``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from ldct_tf import simulate

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
REFERENCE_I0 = 1e6
TILE = 32
FORMAT_VERSION = 1
#: The dose fraction used when neither the user nor matched headers give one (the Mayo quarter-dose data).
DEFAULT_DOSE_FRACTION = 0.25
#: Slices of the two doses closer than this along z are the same table position.
MATCH_TOLERANCE_MM = 0.5
BOOTSTRAP_RESAMPLES = 2000
Progress = Callable[[str], None]


def print_progress(line: str) -> None:
    print(line, flush=True)


def progress_bar(total: Optional[int], desc: str, show: Optional[bool], unit: str = "slice", leave: bool = True):
    """A tqdm bar on stderr: ``show`` None draws it only when stderr is a terminal (in a log file a bar is carriage
    returns and escapes), False never, True always.  Why a bar: calibration and the simulated-pair stream spend
    minutes on slices that each cost seconds, and printed nothing until they ended."""
    from tqdm import tqdm  # not tqdm.auto: a notebook widget needs ipywidgets, and its output bloats the notebook

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=None if show is None else not show,
                dynamic_ncols=True)


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
    """Every ``tile`` square wholly inside ``mask``, overlapping by half (Welch's NPS estimate): on the Mayo slices
    this finds about four times the tiles of a non-overlapping grid, where a slice may hold only one or two."""
    from ldct_tf import metrics

    return metrics.mask_tiles(np.asarray(image, np.float64), mask, tile, stride=max(1, tile // 2))


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


def _collect_evidence(sets: dict, spacing: tuple, filters: Sequence[str], electronic_noise: float, tile: int,
                      rng: np.random.Generator, n_angles: Optional[int], progress: Optional[Progress],
                      label: str, bar: Optional[bool] = None) -> dict:
    """:func:`_slice_evidence` of every slice of ``sets`` ({side: (slices, dose)}); each costs one projection and one
    FBP per filter (seconds to tens of seconds at 512 x 512), so a progress bar (``bar``, see :func:`progress_bar`)
    follows them, or, where no bar is drawn, one plain ``progress`` line per slice (log files keep those)."""
    evidence: dict[str, list] = {side: [] for side in sets}
    total, done, start = sum(len(slices) for slices, _ in sets.values()), 0, time.monotonic()
    with progress_bar(total, f"{label}calibrating", bar) as bars:
        for side, (slices, dose) in sets.items():
            for hu in slices:
                item = _slice_evidence(np.asarray(hu, np.float64), dose, spacing, filters, electronic_noise, tile,
                                       rng, n_angles)
                done += 1
                if item is not None:
                    evidence[side].append(item)
                bars.update(1)
                if progress is not None and bars.disable:
                    elapsed = time.monotonic() - start
                    progress(f"{label}slice {done}/{total} ({side} dose): {item['tiles'] if item else 0} flat "
                             f"tiles, {elapsed:.0f} s, about {elapsed / done * (total - done):.0f} s left")
    return evidence


def _bootstrap_i0(measured: dict, predicted: dict, resamples: int, rng: np.random.Generator) -> dict:
    """95 % percentile intervals of the pooled i0 and of the low-side-only i0, resampling slices with replacement
    within each side (the slope of measured on predicted band power, as in :func:`calibrate_kernel`)."""
    sums = {}
    for side in measured:
        n = len(measured[side])
        idx = rng.integers(0, n, size=(resamples, n))
        pr, m = predicted[side][idx], measured[side][idx]
        sums[side] = ((pr * m).sum(axis=1), (pr * pr).sum(axis=1))
    pooled = REFERENCE_I0 * sum(s[1] for s in sums.values()) / sum(s[0] for s in sums.values())
    low = REFERENCE_I0 * sums["low"][1] / sums["low"][0]
    return {"i0_interval_95": [float(v) for v in np.percentile(pooled, [2.5, 97.5])],
            "i0_from_low_only_interval_95": [float(v) for v in np.percentile(low, [2.5, 97.5])]}


def _fit_filter(evidence: dict, name: str, f: np.ndarray, floor: float, low_freq: float, resamples: int,
                rng: np.random.Generator) -> dict:
    """i0 for one FBP filter: the least-squares slope of measured on predicted band power over the slices."""
    from ldct_tf import metrics

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
    return {"i0": float(REFERENCE_I0 / slope), **_bootstrap_i0(measured, predicted, resamples, rng),
            "i0_from_low_only": per_side["low"], "i0_from_normal_only": per_side["normal"],
            "i0_per_low_slice": [float(v) for v in per_slice],
            "i0_range": [float(per_slice.min()), float(per_slice.max())],
            "band_cycles_per_mm": [float(f[band].min()), float(f[band].max())],
            "nps_mean_freq": freq, "nps_mean_freq_error": abs(freq - low_freq)}


def calibrate_kernel(low_slices: Sequence[np.ndarray], normal_slices: Sequence[np.ndarray],
                     pixel_spacing_mm: Sequence[float], dose_fraction: float = DEFAULT_DOSE_FRACTION,
                     filters: Sequence[str] = FILTERS, electronic_noise: float = simulate.ELECTRONIC_NOISE_VAR,
                     tile: int = TILE, seed: int = 0, n_angles: Optional[int] = None,
                     bootstrap: int = BOOTSTRAP_RESAMPLES, progress: Optional[Progress] = None,
                     label: str = "", bar: Optional[bool] = None) -> dict:
    """Fit ``i0`` (for ``dose_fraction``) and the FBP filter from real ``low_slices`` and ``normal_slices`` of other
    patients (no pairs; see the module docstring), from every flat tile of every slice, with a bootstrap interval
    over slices (``bootstrap`` resamples).  Returns the fitted parameters and the evidence.  ``bar``: the progress
    bar over slices (:func:`progress_bar`; None: on a terminal only)."""
    from ldct_tf import metrics

    if not low_slices or not normal_slices:
        raise simulate.SimulationError("calibration needs at least one low-dose and one normal-dose slice")
    if not 0.0 < dose_fraction < 1.0:
        raise simulate.SimulationError(f"dose_fraction must be in (0, 1), got {dose_fraction!r}")
    if bootstrap < 100:
        raise simulate.SimulationError(f"bootstrap needs at least 100 resamples for a 95 % interval, got {bootstrap!r}")
    spacing = tuple(float(s) for s in pixel_spacing_mm)
    rng = np.random.default_rng(seed)
    evidence = _collect_evidence({"low": (low_slices, dose_fraction), "normal": (normal_slices, 1.0)}, spacing,
                                 filters, electronic_noise, tile, rng, n_angles, progress, label, bar)
    if not evidence["low"] or not evidence["normal"]:
        raise simulate.SimulationError("no flat soft-tissue tile found in the low- or the normal-dose slices")
    f = evidence["low"][0]["f"]
    floor = min(MIN_BAND_FREQ, 0.25 * float(f.max()))  # coarse pixels: a quarter of Nyquist
    low_nps = np.mean([e["nps"] for e in evidence["low"]], axis=0)
    low_freq = metrics.nps_mean_frequency(f[f >= floor], low_nps[f >= floor])
    results = {name: _fit_filter(evidence, name, f, floor, low_freq, bootstrap, np.random.default_rng([seed, i]))
               for i, name in enumerate(filters)}
    best = min(results, key=lambda n: results[n]["nps_mean_freq_error"])
    return {"i0": results[best]["i0"], "i0_interval_95": results[best]["i0_interval_95"],
            "i0_range": results[best]["i0_range"], "filter_name": best,
            "dose_fraction": float(dose_fraction),
            "electronic_noise": float(electronic_noise), "noise_model": "insert",
            "measured": {"low_nps_mean_freq_above_band_floor": low_freq,
                         "tiles": {side: [e["tiles"] for e in items] for side, items in evidence.items()}},
            "fit": results[best], "filters": results, "bootstrap": {"resamples": int(bootstrap), "unit": "slice"},
            "low_slices": len(evidence["low"]), "normal_slices": len(evidence["normal"]),
            "pixel_spacing_mm": list(spacing)}


# -------------------------------------------------------------------------------------------- the dose fraction
class HeaderSlice(NamedTuple):
    """What the headers say about one slice: ``key`` groups slices of one patient (and study, where known)."""

    key: tuple
    z_mm: float
    ctdivol: float


class HeaderDose(NamedTuple):
    """The dose fraction the headers of matched slices support (None when they cannot tell), how many slice pairs
    matched, and why, in words (one line)."""

    fraction: Optional[float]
    matched: int
    reason: str


def matched_ctdivol(low: Sequence[HeaderSlice], normal: Sequence[HeaderSlice],
                    tolerance_mm: float = MATCH_TOLERANCE_MM) -> list[tuple[float, float]]:
    """``(low, normal)`` CTDIvol of each low-dose slice that has a normal-dose slice of the same key within
    ``tolerance_mm`` along z (the nearest one); slices without a usable CTDIvol (NaN, <= 0) take no part."""
    by_key: dict[tuple, list[HeaderSlice]] = {}
    for item in normal:
        if np.isfinite(item.ctdivol) and item.ctdivol > 0 and np.isfinite(item.z_mm):
            by_key.setdefault(tuple(item.key), []).append(item)
    pairs = []
    for item in low:
        candidates = by_key.get(tuple(item.key), [])
        if not candidates or not (np.isfinite(item.ctdivol) and item.ctdivol > 0 and np.isfinite(item.z_mm)):
            continue
        nearest = min(candidates, key=lambda c: abs(c.z_mm - item.z_mm))
        if abs(nearest.z_mm - item.z_mm) <= tolerance_mm:
            pairs.append((float(item.ctdivol), float(nearest.ctdivol)))
    return pairs


def dose_fraction_from_headers(low: Sequence[HeaderSlice], normal: Sequence[HeaderSlice],
                               tolerance_mm: float = MATCH_TOLERANCE_MM) -> HeaderDose:
    """The low/normal CTDIvol ratio over MATCHED slices only (same key, same z; see the module docstring for why),
    when it is credible: below 0.95 and the same (within 20 %) on every matched pair."""
    pairs = matched_ctdivol(low, normal, tolerance_mm)
    if not pairs:
        return HeaderDose(None, 0, f"cannot tell: no low-dose slice has a normal-dose slice of the same patient "
                                   f"and study within {tolerance_mm:g} mm")
    ratios = np.array([lo / no for lo, no in pairs])
    median = float(np.median(ratios))
    if median >= 0.95:
        return HeaderDose(None, len(pairs), f"headers not credible: {len(pairs)} matched slices carry the same "
                                            f"CTDIvol in both doses (ratio {median:.2f}; noise-inserted data?)")
    if ratios.max() - ratios.min() > 0.2 * median:
        return HeaderDose(None, len(pairs), f"headers disagree: the CTDIvol ratio of {len(pairs)} matched slices "
                                            f"ranges {ratios.min():.3f} to {ratios.max():.3f}")
    return HeaderDose(median, len(pairs), f"CTDIvol ratio {median:.3f} of {len(pairs)} matched slices")


def resolve_dose_fraction(header: HeaderDose, given: Optional[float],
                          default: float = DEFAULT_DOSE_FRACTION) -> tuple[float, str, Optional[str]]:
    """``(dose fraction, its source, one line to show or None)``.

    A value the user ``given`` always wins; when matched headers point elsewhere (more than 10 % off) the line says
    so.  Without one, a credible header ratio is used; otherwise ``default``, and the line says why.
    """
    if given is not None:
        if header.fraction is not None and abs(header.fraction / given - 1.0) > 0.1:
            return given, "given (--dose-fraction)", (f"warning: {header.reason} suggests dose fraction "
                                                      f"{header.fraction:.3f}; keeping the given {given:g}")
        return given, "given (--dose-fraction)", None
    if header.fraction is not None:
        return header.fraction, f"headers: {header.reason}", None
    return default, "default", f"dose fraction: {header.reason}; using {default:g} (give --dose-fraction to set it)"


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
        raise simulate.SimulationError(f"{path}: not an ldct_tf calibration file (format_version {FORMAT_VERSION}, 'kernels')")
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


# ----------------------------------------------------------------------------------------------- the slice sets
def _add_slice(sets: dict, kernel: str, hu: np.ndarray, header: HeaderSlice, spacing: Sequence[float],
               max_slices: Optional[int]) -> None:
    """Append one slice to its kernel's set (square slices only: the projector needs them)."""
    entry = sets.setdefault(kernel or "unknown", {"slices": [], "headers": [], "spacing": []})
    if (max_slices is None or len(entry["slices"]) < max_slices) and hu.shape[0] == hu.shape[1]:
        entry["slices"].append(np.asarray(hu, np.float64))
        entry["headers"].append(header)
        entry["spacing"].append([float(v) for v in spacing])


def _slices_by_kernel(data_dir: str, split: str, dose: str, max_slices: Optional[int],
                      bar: Optional[bool] = None) -> dict:
    """Every slice of one dose of a pipeline output, by kernel.  The shards carry the patient pseudonym but no study,
    so slices match on patient and z only."""
    from ldct_tf import data

    out: dict[str, dict] = {}
    with progress_bar(None, f"reading {dose}-dose shards", bar, leave=False) as bars:
        for hu, meta in data.slice_dataset(data_dir, split, dose):
            header = HeaderSlice((meta["patient"].numpy().decode(),), float(meta["z_mm"]), float(meta["ctdivol"]))
            _add_slice(out, meta["kernel"].numpy().decode(), hu.numpy()[..., 0], header,
                       meta["pixel_spacing_mm"].numpy(), max_slices)
            bars.update(1)
    return out


def _dicom_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and every file under the folders named (sorted, so runs are repeatable)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise simulate.SimulationError(f"{raw}: no such file or folder")
    return files


def slices_from_dicom(paths: Sequence[str], max_slices: Optional[int] = None,
                      progress: Optional[Progress] = None, bar: Optional[bool] = None) -> dict:
    """Every usable axial CT slice under ``paths`` (files or folders), by kernel; files that are not usable CT are
    skipped with one line each.  Slices match on PatientID and StudyInstanceUID (kept in memory only).  ``bar``: a
    progress bar over the files (:func:`progress_bar`)."""
    from tqdm import tqdm

    from ldct_tf import dicom

    out: dict[str, dict] = {}
    files = _dicom_files(paths)
    for path in tqdm(files, desc="reading DICOM", unit="file", leave=False, disable=None if bar is None else not bar):
        try:
            slices = dicom.read_slices(str(path))
        except dicom.NotUsableCT as exc:
            if progress is not None:
                progress(f"skipped: {exc}")
            continue
        for hu, info in slices:
            header = HeaderSlice((info.patient_id, info.study_uid), float(info.position_mm[2]), float(info.ctdivol))
            _add_slice(out, info.kernel, hu, header, info.pixel_spacing_mm, max_slices)
    return out


def calibrate_sets(lows: dict, normals: dict, dose_fraction: Optional[float] = None,
                   progress: Optional[Progress] = print_progress, **kwargs) -> dict:
    """Calibrate every kernel that has both low- and normal-dose slices (sets as :func:`slices_from_dicom` returns);
    ``dose_fraction`` is the user's (None: matched headers, else :data:`DEFAULT_DOSE_FRACTION`), ``kwargs`` go to
    :func:`calibrate_kernel`."""
    kernels, skipped = {}, {}
    for kernel in sorted(set(lows) | set(normals)):
        if kernel not in lows or kernel not in normals:
            skipped[kernel] = f"no {'normal' if kernel in lows else 'low'}-dose slices of this kernel"
            continue
        low, normal = lows[kernel], normals[kernel]
        header = dose_fraction_from_headers(low["headers"], normal["headers"])
        fraction, source, note = resolve_dose_fraction(header, dose_fraction)
        if note and progress is not None:
            progress(f"{kernel}: {note}")
        spacing = np.mean(np.array(low["spacing"] + normal["spacing"]), axis=0)
        fitted = calibrate_kernel(low["slices"], normal["slices"], spacing, fraction, progress=progress,
                                  label=f"{kernel}: ", **kwargs)
        fitted.update(dose_fraction_source=source, dose_fraction_headers=header.reason)
        kernels[kernel] = fitted
        if progress is not None:
            lo, hi = fitted["i0_interval_95"]
            progress(f"{kernel}: i0 {fitted['i0']:.3g} (95 % interval {lo:.3g} to {hi:.3g}, {fitted['low_slices']} "
                     f"low + {fitted['normal_slices']} normal slices), filter {fitted['filter_name']}, dose fraction "
                     f"{fraction:g} ({source})")
    if not kernels:
        raise simulate.SimulationError(f"no kernel has both low- and normal-dose slices (low: {sorted(lows)}, "
                         f"normal: {sorted(normals)})")
    default = max(kernels, key=lambda k: kernels[k]["low_slices"])
    return {"kernels": kernels, "default_kernel": default, "not_calibrated": skipped}


def calibrate_shards(data_dir: str, split: str = "train", max_slices: Optional[int] = None,
                     dose_fraction: Optional[float] = None, progress: Optional[Progress] = print_progress,
                     **kwargs) -> dict:
    """Calibrate every kernel that has both low- and normal-dose slices in ``split`` of a pipeline output (all its
    slices unless ``max_slices`` per kernel and dose)."""
    try:
        lows = _slices_by_kernel(data_dir, split, "low", max_slices, kwargs.get("bar"))
        normals = _slices_by_kernel(data_dir, split, "normal", max_slices, kwargs.get("bar"))
    except simulate.SimulationError:
        raise
    except ValueError as exc:  # ldct_tf.data's checks of the manifest and the split
        raise simulate.SimulationError(str(exc)) from None
    try:
        result = calibrate_sets(lows, normals, dose_fraction, progress, **kwargs)
    except ValueError as exc:
        raise simulate.SimulationError(f"{data_dir}: split {split!r}: {exc}") from None
    result["source"] = {"split": split, "max_slices_per_kernel_and_dose": max_slices}
    return result
