"""Scoring denoisers on paired slices: data in, summary out (nothing is written here; ``report`` writes).

Why pure: the quality benchmark, the demo and the CLI all want the same numbers, and tests check them without a
folder.  ROIs are chosen once per slice on the normal-dose reference so every denoiser is measured on the same
anatomy; NPS curves come back beside the rows (:class:`Scores`), not inside them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from ldct_tf import metrics
from ldct_tf.audit import report as audit_report
from ldct_tf.evaluate.denoisers import SliceDenoiser
from ldct_tf.evaluate.pairs import EvaluateInputError, Pair

#: metrics.csv columns after ``slice`` and ``denoiser``.  ``higher`` says which direction is better (None: neither;
#: a lower noise SD alone is not better, over-smoothing also lowers it).
METRICS: dict[str, Optional[bool]] = {
    "psnr_abdomen": True, "ssim_abdomen": True, "psnr_wide": True, "ssim_wide": True, "rmse_hu": False,
    "noise_sd_hu": None, "cnr": None, "nps_mean_freq": None, "edge_sharpness": None, "seconds": None,
}
#: Metrics for which "wins per slice" are counted (the fidelity figures, where better is unambiguous).
WIN_METRICS = ("psnr_abdomen", "ssim_abdomen", "psnr_wide", "ssim_wide", "rmse_hu")
REFERENCE = "reference"  # the normal-dose slice's own row in the reader study and the noise summary


@dataclass
class SliceRois:
    """ROIs chosen once per slice on the normal-dose reference, so every denoiser is measured on the same anatomy."""

    soft: list[metrics.Box]
    fat: list[metrics.Box]
    nps: list[metrics.Box]


def choose_rois(reference: np.ndarray) -> SliceRois:
    """Soft-tissue and fat ROIs for noise SD and CNR (about 10 mm squares), larger soft-tissue ROIs for the NPS."""
    small = max(8, min(16, min(reference.shape) // 8))
    large = max(16, min(32, min(reference.shape) // 4))
    return SliceRois(soft=metrics.find_flat_rois(reference, "soft_tissue", size=small, n=6),
                     fat=metrics.find_flat_rois(reference, "fat", size=small, n=3),
                     nps=metrics.find_flat_rois(reference, "soft_tissue", size=large, n=8))


NpsCurve = tuple[np.ndarray, np.ndarray]  # (frequencies in cycles/mm, radial NPS)


def _nps(image: np.ndarray, rois: SliceRois, spacing) -> tuple[np.ndarray, np.ndarray, float]:
    if not rois.nps:
        return np.zeros(0), np.zeros(0), float("nan")
    f, nps_r = metrics.nps_radial(np.stack([b.crop(image) for b in rois.nps]), spacing)
    return f, nps_r, metrics.nps_mean_frequency(f, nps_r)


def noise_figures(image: np.ndarray, rois: SliceRois, spacing) -> tuple[dict, NpsCurve]:
    """Reference-free figures of one image (noise SD, CNR soft tissue vs fat, NPS mean frequency) and its NPS curve."""
    f, nps_r, f_mean = _nps(image, rois, spacing)
    return {
        "noise_sd_hu": metrics.noise_sd(image, rois.soft),
        "cnr": metrics.cnr(image, rois.soft[0], rois.fat[0]) if rois.soft and rois.fat else float("nan"),
        "nps_mean_freq": f_mean,
    }, (f, nps_r)


def score_slice(out: np.ndarray, pair: Pair, rois: SliceRois) -> tuple[dict, NpsCurve]:
    """All metrics of one denoised slice against its pair's reference, and the output's NPS curve."""
    ref = pair.normal
    row = {
        "psnr_abdomen": metrics.psnr(out, ref, "abdomen"), "ssim_abdomen": metrics.ssim(out, ref, "abdomen"),
        "psnr_wide": metrics.psnr(out, ref, "wide"), "ssim_wide": metrics.ssim(out, ref, "wide"),
        "rmse_hu": metrics.rmse_hu(out, ref),
    }
    noise, curve = noise_figures(out, rois, pair.pixel_spacing_mm)
    row.update(noise)
    row["edge_sharpness"] = metrics.edge_sharpness(out, ref)
    return row, curve


def interval95(values: Sequence[float]) -> dict:
    """Mean, SD and the 95 % confidence interval of the mean (Student t) of the finite values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": [None, None]}
    mean = float(v.mean())
    if v.size == 1:
        return {"n": 1, "mean": mean, "sd": 0.0, "ci95": [mean, mean]}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, v.size - 1) * sd / math.sqrt(v.size))
    return {"n": int(v.size), "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def count_wins(rows: Sequence[dict], names: Sequence[str]) -> dict[str, dict[str, int]]:
    """For each fidelity metric, on how many slices each denoiser was the best (ties count for all tied)."""
    wins = {n: {m: 0 for m in WIN_METRICS} for n in names}
    by_slice: dict[str, list[dict]] = {}
    for r in rows:
        by_slice.setdefault(r["slice"], []).append(r)
    for group in by_slice.values():
        for m in WIN_METRICS:
            values = [(r[m], r["denoiser"]) for r in group if np.isfinite(r[m])]
            if not values:
                continue
            best = max(v for v, _ in values) if METRICS[m] else min(v for v, _ in values)
            for v, n in values:
                if v == best:
                    wins[n][m] += 1
    return wins


def _unique_names(pairs: Sequence[Pair]) -> list[str]:
    """Slice names as given, with ``#2``, ``#3`` ... appended to repeats, so per-slice rows never merge."""
    seen: dict[str, int] = {}
    names = []
    for p in pairs:
        seen[p.name] = seen.get(p.name, 0) + 1
        names.append(p.name if seen[p.name] == 1 else f"{p.name}#{seen[p.name]}")
    return names


@dataclass
class Scores:
    """What :func:`score` computes: the ``summary`` dict, plus what only the figures need (NPS curves per denoiser and
    for the reference, and the first slices' outputs for side-by-side panels)."""

    summary: dict
    curves: dict[str, list[NpsCurve]] = field(default_factory=dict)
    panels: list[tuple[str, Pair, dict[str, np.ndarray], SliceRois]] = field(default_factory=list)


def score(pairs: Sequence[Pair], denoisers: Mapping[str, SliceDenoiser], *, progress: bool = True,
          panel_slices: int = 3, info: Optional[dict] = None, lesions: int = 0) -> Scores:
    """Run every denoiser on every pair and score it (see ``ldct_tf.evaluate.evaluate`` for the summary's keys)."""
    if not pairs:
        raise EvaluateInputError("evaluate() needs at least one pair")
    if not denoisers:
        raise EvaluateInputError("evaluate() needs at least one denoiser")
    names = list(denoisers)
    rows: list[dict] = []
    ref_rows: list[dict] = []
    curves: dict[str, list[NpsCurve]] = {n: [] for n in [*names, REFERENCE]}
    panels: list[tuple[str, Pair, dict[str, np.ndarray], SliceRois]] = []
    audit_rows: list[dict] = []  # ldct_tf.audit.report: change audit of every output; lesion detectability
    iterator: Iterable[Pair] = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="evaluate", unit="slice")
    slice_names = _unique_names(pairs)
    for i, pair in enumerate(iterator):
        label = slice_names[i]
        rois = choose_rois(pair.normal)
        ref_fig, ref_curve = noise_figures(pair.normal, rois, pair.pixel_spacing_mm)
        curves[REFERENCE].append(ref_curve)
        ref_rows.append({"slice": label, **ref_fig})
        outputs = {}
        for name, fn in denoisers.items():
            start = time.perf_counter()
            out = np.asarray(fn(pair.low), dtype=np.float32)
            seconds = time.perf_counter() - start
            if out.shape != pair.low.shape:
                raise ValueError(f"denoiser {name!r} returned shape {out.shape} for a {pair.low.shape} slice")
            scored, curve = score_slice(out, pair, rois)
            row = {"slice": label, "denoiser": name, **scored, "seconds": seconds}
            curves[name].append(curve)
            rows.append(row)
            outputs[name] = out
            audit_rows.append(audit_report.audit_row(label, name, pair.low, out, pair.pixel_spacing_mm))
        if i < panel_slices:
            panels.append((label, pair, outputs, rois))

    summary = {
        "slices": len(pairs),
        "denoisers": names,
        "metrics": {n: {m: interval95([r[m] for r in rows if r["denoiser"] == n]) for m in METRICS} for n in names},
        "wins": count_wins(rows, names),
        "reference": {m: interval95([r[m] for r in ref_rows]) for m in ("noise_sd_hu", "cnr", "nps_mean_freq")},
        "nps_mean_freq_distance_to_reference": {
            n: interval95([abs(r["nps_mean_freq"] - ref["nps_mean_freq"])
                           for r, ref in zip([r for r in rows if r["denoiser"] == n], ref_rows)]) for n in names},
        "rows": rows,
        "reference_rows": ref_rows,
        "roi_rule": "ldct_tf.metrics.find_flat_rois on the normal-dose slice: soft tissue 0..150 HU (noise SD, NPS), "
                    "fat -150..-50 HU (CNR soft tissue vs fat); lowest-SD squares first",
        "info": dict(info or {}),
        "files": {},
        **audit_report.extras(audit_rows, names, pairs, denoisers, lesions),
    }
    return Scores(summary, curves, panels)
