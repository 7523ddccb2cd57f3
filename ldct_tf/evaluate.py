"""``python -m ldct_tf.evaluate``: score denoisers on paired low/normal-dose CT, side by side, and run reader studies.

    python -m ldct_tf.evaluate --pairs pairs.csv --denoiser none --denoiser bm3d --denoiser model:saved_models/ldct_denoiser --out eval
    python -m ldct_tf.evaluate --low LOW_DIR --normal NORMAL_DIR --out eval
    python -m ldct_tf.evaluate --normal NORMAL_DIR --simulate 0.25 --out eval         # simulated quarter dose
    python -m ldct_tf.evaluate --pairs pairs.csv --reader-study 10 --out study         # + blinded reader-study kit
    python -m ldct_tf.evaluate --score-sheet reader1.csv --score-sheet reader2.csv --out study   # unblind, summarise
    python -m ldct_tf.evaluate --pairs pairs.csv --patients L096,L143 --tune gaussian,tv --out tuning  # baselines

Pairs CSV: header ``low,normal`` (``quarter_dose,full_dose`` is accepted too, so the Mayo ``pairs.csv`` works as is),
paths absolute or relative to the CSV's folder, an optional ``patient`` column for ``--patients``.  Denoisers:
``none`` (the low-dose input), ``gaussian``, ``nlm``, ``tv``, ``bm3d`` (tuned defaults, ``ldct_tf.baselines``) and
``model:PATH`` (a SavedModel version folder, or a model folder meaning its newest version).

Output folder: ``metrics.csv`` (one row per slice and denoiser), ``summary.json`` and ``report.md`` (mean and 95 %
interval per denoiser and metric, wins per slice, the normal-dose reference's own noise figures), ``figures/``
(liver-window panels with zoomed crops and difference maps, metric bars, NPS curves).  Slices are named after the
files you gave (never after DICOM header fields, which may identify the patient).

The core is :func:`evaluate` (pairs x denoisers -> summary dict), which the quality benchmark and the demo call
directly; :func:`load_pairs_csv`, :func:`load_pair_dirs`, :func:`simulated_pairs` and :func:`make_denoisers` build its
inputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ldct_tf import audit_report, baselines, ct, dicom, metrics

SliceDenoiser = Callable[[np.ndarray], np.ndarray]

#: metrics.csv columns after ``slice`` and ``denoiser``.  ``higher`` says which direction is better (None: neither;
#: a lower noise SD alone is not better, over-smoothing also lowers it).
METRICS: dict[str, Optional[bool]] = {
    "psnr_abdomen": True, "ssim_abdomen": True, "psnr_wide": True, "ssim_wide": True, "rmse_hu": False,
    "noise_sd_hu": None, "cnr": None, "nps_mean_freq": None, "edge_sharpness": None, "seconds": None,
}
#: Metrics for which "wins per slice" are counted (the fidelity figures, where better is unambiguous).
WIN_METRICS = ("psnr_abdomen", "ssim_abdomen", "psnr_wide", "ssim_wide", "rmse_hu")
READER_CRITERIA = ("noise", "sharpness", "artifacts", "diagnostic_confidence")
REFERENCE = "reference"  # the normal-dose slice's own row in the reader study and the noise summary


@dataclass
class Pair:
    """One paired slice in HU: the low-dose input and its normal-dose reference (same position, same grid)."""

    name: str
    low: np.ndarray
    normal: np.ndarray
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)


# ------------------------------------------------------------------------------------------------------------ input
def _read(path: Path) -> tuple[np.ndarray, dicom.SliceInfo]:
    try:
        return dicom.read_slice(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such DICOM file") from None


def load_pair(low_path: str | Path, normal_path: str | Path, name: Optional[str] = None) -> Pair:
    """Read a low-dose and a normal-dose DICOM file into a :class:`Pair`; different grids raise ``ValueError``."""
    low, low_info = _read(Path(low_path))
    normal, _ = _read(Path(normal_path))
    if low.shape != normal.shape:
        raise ValueError(f"{low_path} ({low.shape}) and {normal_path} ({normal.shape}) differ in size: not a pair")
    return Pair(name or Path(low_path).stem, low, normal, tuple(low_info.pixel_spacing_mm))


def _label(cell: str) -> str:
    """A slice's name: the low-dose path as written in the CSV, without its suffix (just the stem if absolute)."""
    p = Path(cell)
    return p.stem if p.is_absolute() else p.with_suffix("").as_posix()


def read_pairs_csv(path: str | Path, patients: Optional[Iterable[str]] = None) -> list[tuple[Path, Path, str]]:
    """``(low, normal, name)`` from a pairs CSV (see the module docstring), optionally only some patients."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such pairs CSV") from None
    low_col = next((c for c in ("low", "quarter_dose") if c in header), None)
    normal_col = next((c for c in ("normal", "full_dose") if c in header), None)
    if not rows or low_col is None or normal_col is None:
        raise ValueError(f"{path}: expected a header with columns low,normal (or quarter_dose,full_dose) and at least "
                         f"one row; got {list(header)}")
    wanted = set(patients) if patients else None
    if wanted and "patient" not in header:
        raise ValueError(f"{path}: --patients needs a 'patient' column")
    base = path.parent
    out = [((base / r[low_col]).resolve(), (base / r[normal_col]).resolve(), _label(r[low_col])) for r in rows
           if wanted is None or r["patient"] in wanted]
    if not out:
        raise ValueError(f"{path}: no pairs for patients {sorted(wanted or [])}")
    return out


def load_pairs_csv(path: str | Path, patients: Optional[Iterable[str]] = None) -> list[Pair]:
    return [load_pair(lo, no, name) for lo, no, name in read_pairs_csv(path, patients)]


def _dicom_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no files")
    return files


def load_pair_dirs(low_dir: str | Path, normal_dir: str | Path) -> list[Pair]:
    """Pairs from two folders matched by position in name order (equal counts required)."""
    lows, normals = _dicom_files(Path(low_dir)), _dicom_files(Path(normal_dir))
    if len(lows) != len(normals):
        raise ValueError(f"{low_dir} has {len(lows)} files but {normal_dir} has {len(normals)}: "
                         f"--low/--normal are matched by position and need equal counts")
    low_root = Path(low_dir) if Path(low_dir).is_dir() else Path(low_dir).parent
    return [load_pair(lo, no, lo.relative_to(low_root).with_suffix("").as_posix()) for lo, no in zip(lows, normals)]


#: The simulator calibration that ``--simulate`` uses unless ``--calibration`` names another (written by
#: ``python -m benchmarks.ablation`` with ``ldct_tf.calibration`` from unpaired AAPM-Mayo slices).
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "configs" / "calibration_aapm_mayo.json"


def simulated_pairs(normal_paths: Iterable[str | Path], dose_fraction: float, seed: int = 0,
                    calibration: Optional[dict] = None, **simulate_kwargs) -> list[Pair]:
    """Pairs simulated from normal-dose files: ``(simulated low dose, same slice through the same projector)``.

    With a ``calibration`` (``ldct_tf.calibration``) each slice is simulated with its kernel's calibrated ``i0`` and
    FBP filter (the uncalibrated 1e5 default is about 2.3x too noisy for the Mayo quarter dose)."""
    from ldct_tf import calibration as calibration_lib
    from ldct_tf import simulate

    pairs = []
    for i, path in enumerate(normal_paths):
        hu, info = _read(Path(path))
        if hu.shape[0] != hu.shape[1]:
            raise ValueError(f"{path}: --simulate needs square slices, got {hu.shape}")
        kwargs = dict(simulate_kwargs)
        if calibration is not None:
            params = calibration_lib.simulation_parameters(calibration, info.kernel)
            kwargs = {"i0": params["i0"], "filter_name": params["filter_name"],
                      "electronic_noise": params["electronic_noise"], **kwargs}
        low, ref = simulate.simulate_low_dose(hu, dose_fraction, seed=seed + i,
                                              pixel_spacing_mm=float(np.mean(info.pixel_spacing_mm)), **kwargs)
        pairs.append(Pair(Path(path).stem, low, ref, tuple(info.pixel_spacing_mm)))
    return pairs


# ------------------------------------------------------------------------------------------------------- denoisers
def model_denoiser(path: str | Path) -> SliceDenoiser:
    """A SavedModel (``ldct_tf.export``) as ``HU slice -> HU slice``; TensorFlow is imported only here."""
    from ldct_tf.export import SavedModelDenoiser

    model = SavedModelDenoiser(path)
    return lambda hu: np.asarray(model(np.asarray(hu, np.float32)), np.float32).reshape(np.shape(hu))


def make_denoisers(specs: Sequence[str]) -> dict[str, SliceDenoiser]:
    """``{name given: function}`` for specs ``none``, ``gaussian``, ``nlm``, ``tv``, ``bm3d``, ``model:PATH``."""
    out: dict[str, SliceDenoiser] = {}
    for spec in specs:
        if spec in out:
            raise ValueError(f"denoiser {spec!r} given twice")
        if spec.startswith("model:"):
            if not spec[len("model:"):]:
                raise ValueError("model: needs a path, e.g. model:saved_models/ldct_denoiser")
            out[spec] = model_denoiser(spec[len("model:"):])
        else:
            out[spec] = baselines.get(spec)
    return out


# ------------------------------------------------------------------------------------------------------- scoring
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


def _nps(image: np.ndarray, rois: SliceRois, spacing) -> tuple[np.ndarray, np.ndarray, float]:
    if not rois.nps:
        return np.zeros(0), np.zeros(0), float("nan")
    f, nps_r = metrics.nps_radial(np.stack([b.crop(image) for b in rois.nps]), spacing)
    return f, nps_r, metrics.nps_mean_frequency(f, nps_r)


def noise_figures(image: np.ndarray, rois: SliceRois, spacing) -> dict:
    """Reference-free figures of one image: noise SD, CNR soft tissue vs fat, NPS mean frequency (+ the curve)."""
    f, nps_r, f_mean = _nps(image, rois, spacing)
    return {
        "noise_sd_hu": metrics.noise_sd(image, rois.soft),
        "cnr": metrics.cnr(image, rois.soft[0], rois.fat[0]) if rois.soft and rois.fat else float("nan"),
        "nps_mean_freq": f_mean, "_nps": (f, nps_r),
    }


def score_slice(out: np.ndarray, pair: Pair, rois: SliceRois) -> dict:
    """All metrics of one denoised slice against its pair's reference."""
    ref = pair.normal
    row = {
        "psnr_abdomen": metrics.psnr(out, ref, "abdomen"), "ssim_abdomen": metrics.ssim(out, ref, "abdomen"),
        "psnr_wide": metrics.psnr(out, ref, "wide"), "ssim_wide": metrics.ssim(out, ref, "wide"),
        "rmse_hu": metrics.rmse_hu(out, ref),
    }
    row.update(noise_figures(out, rois, pair.pixel_spacing_mm))
    row["edge_sharpness"] = metrics.edge_sharpness(out, ref)
    return row


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


def evaluate(pairs: Sequence[Pair], denoisers: Mapping[str, SliceDenoiser], out_dir: Optional[str | Path] = None,
             *, figures: bool = True, progress: bool = True, panel_slices: int = 3,
             info: Optional[dict] = None, lesions: int = 0) -> dict:
    """Run every denoiser on every pair and score it; returns the summary dict (also written to ``out_dir``).

    Summary keys: ``slices``, ``denoisers`` (names in order), ``metrics`` (``{denoiser: {metric: interval95}}``),
    ``wins`` (:func:`count_wins`), ``reference`` (the normal-dose slices' own noise SD, CNR and NPS mean frequency),
    ``nps_mean_freq_distance_to_reference`` (per denoiser: mean |f_denoiser - f_reference| over slices), ``rows``
    (per slice and denoiser), ``info`` (``info`` as given: e.g. the input and the denoisers' parameters) and
    ``files`` (what was written).  ``out_dir=None`` computes without writing.
    """
    if not pairs:
        raise ValueError("evaluate() needs at least one pair")
    if not denoisers:
        raise ValueError("evaluate() needs at least one denoiser")
    names = list(denoisers)
    rows: list[dict] = []
    ref_rows: list[dict] = []
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in [*names, REFERENCE]}
    panels: list[tuple[str, Pair, dict[str, np.ndarray], SliceRois]] = []
    audit_rows: list[dict] = []  # ldct_tf.audit_report: change audit of every output; lesion detectability
    iterator: Iterable[Pair] = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="evaluate", unit="slice")
    slice_names = _unique_names(pairs)
    for i, pair in enumerate(iterator):
        label = slice_names[i]
        rois = choose_rois(pair.normal)
        ref_fig = noise_figures(pair.normal, rois, pair.pixel_spacing_mm)
        curves[REFERENCE].append(ref_fig.pop("_nps"))
        ref_rows.append({"slice": label, **ref_fig})
        outputs = {}
        for name, fn in denoisers.items():
            start = time.perf_counter()
            out = np.asarray(fn(pair.low), dtype=np.float32)
            seconds = time.perf_counter() - start
            if out.shape != pair.low.shape:
                raise ValueError(f"denoiser {name!r} returned shape {out.shape} for a {pair.low.shape} slice")
            row = {"slice": label, "denoiser": name, **score_slice(out, pair, rois), "seconds": seconds}
            curves[name].append(row.pop("_nps"))
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
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary["files"]["metrics_csv"] = str(write_metrics_csv(rows, out / "metrics.csv"))
        if figures:
            summary["files"]["figures"] = [str(p) for p in write_figures(summary, panels, curves, out / "figures")
                                           + audit_report.write_figures(summary, out / "figures")]
        summary["files"]["report"] = str(out / "report.md")
        summary["files"]["summary"] = str(out / "summary.json")
        (out / "report.md").write_text(report_markdown(summary, out))
        (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n")
    return summary


def jsonable(value):
    """Non-finite floats -> None, numpy scalars -> Python, recursively (strict JSON for summary.json and callers
    that store the summary, such as the quality benchmark)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value





def write_metrics_csv(rows: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slice", "denoiser", *METRICS])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in writer.fieldnames})
    return path


def _fmt(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


_DIGITS = {"psnr_abdomen": 2, "psnr_wide": 2, "ssim_abdomen": 3, "ssim_wide": 3, "rmse_hu": 1, "noise_sd_hu": 1,
           "cnr": 2, "nps_mean_freq": 3, "edge_sharpness": 3, "seconds": 3}


def report_markdown(summary: dict, out_dir: Path) -> str:
    """report.md: the summary tables a reader can paste into a paper or an issue."""
    names = summary["denoisers"]
    lines = [f"# Evaluation on {summary['slices']} paired slices", "",
             "Mean and 95 % confidence interval of the mean (Student t) over slices. PSNR/SSIM in the abdomen window "
             "[-160, 240] HU (data range 400) and the wide window [-1024, 1900] HU (data range 2924); RMSE in HU "
             "unclipped. Noise SD, CNR (soft tissue vs fat) and NPS mean frequency in flat ROIs chosen on the "
             "normal-dose slice; edge sharpness 1.0 = as sharp as the normal-dose slice.", ""]
    cols = list(METRICS)
    lines += ["| denoiser | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(summary["metrics"][n][m], _DIGITS[m]) for m in cols) + " |")
    ref = summary["reference"]
    lines += ["", "Normal-dose reference itself: noise SD " + _fmt(ref["noise_sd_hu"], 1) + " HU, CNR "
              + _fmt(ref["cnr"], 2) + ", NPS mean frequency " + _fmt(ref["nps_mean_freq"], 3) + " cycles/mm.", "",
              "Distance of the NPS mean frequency to the reference's (|f - f_ref|, cycles/mm; smaller = noise texture "
              "closer to normal dose):", ""]
    for n in names:
        lines.append(f"- {n}: {_fmt(summary['nps_mean_freq_distance_to_reference'][n], 3)}")
    lines += ["", f"## Wins per slice (best of the {len(names)} denoisers; ties count for each)", "",
              "| denoiser | " + " | ".join(WIN_METRICS) + " |", "|---" * (len(WIN_METRICS) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(str(summary["wins"][n][m]) for m in WIN_METRICS) + " |")
    lines += audit_report.report_lines(summary)
    figs = summary["files"].get("figures") or []
    if figs:
        lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({Path(p).relative_to(out_dir)})" for p in figs]
    lines += ["", "Per-slice figures: `metrics.csv`. " + summary["roi_rule"] + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- figures
def write_figures(summary: dict, panels, curves, folder: Path) -> list[Path]:
    """The PNG figures (``ldct_tf.evaluation_figures``); ``panels`` holds (slice name, pair, outputs, rois)."""
    from ldct_tf import evaluation_figures

    return evaluation_figures.write_figures(summary, panels, curves, folder, METRICS, REFERENCE)


# --------------------------------------------------------------------------------------------------- reader study
def write_reader_study(pairs: Sequence[Pair], denoisers: Mapping[str, SliceDenoiser], n_slices: int,
                       out_dir: str | Path, seed: int = 0) -> dict:
    """Blinded, randomised reader-study kit: ``n_slices`` slices x (every denoiser + the normal-dose reference).

    Writes ``cases/case_XXXX.png`` (liver window, no labels, random ids in random order), ``score_sheet.csv``
    (one row per case; readers fill ``reader`` and 1-5 scores: noise, sharpness, artifacts, diagnostic_confidence,
    5 = best) and ``key.csv`` (case -> slice and denoiser; keep it from the readers).  Returns the paths.
    """
    from ldct_tf.evaluation_figures import pyplot

    plt = pyplot()
    if n_slices < 1:
        raise ValueError(f"--reader-study needs at least 1 slice, got {n_slices}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), size=min(n_slices, len(pairs)), replace=False)
    cases = []
    for i in sorted(chosen):
        pair = pairs[int(i)]
        for name, fn in denoisers.items():
            cases.append((pair.name, name, np.asarray(fn(pair.low), np.float32)))
        cases.append((pair.name, REFERENCE, pair.normal))
    order = rng.permutation(len(cases))
    ids = rng.choice(np.arange(1000, 10000), size=len(cases), replace=False)
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    liver = ct.window("liver")
    key_rows, sheet_rows = [], []
    for pos, k in enumerate(order):
        slice_name, denoiser, image = cases[k]
        case = f"case_{ids[pos]:04d}"
        plt.imsave(out / "cases" / f"{case}.png", liver.to_unit(image), cmap="gray", vmin=0.0, vmax=1.0)
        key_rows.append({"case": case, "slice": slice_name, "denoiser": denoiser})
        sheet_rows.append({"case": case, "image": f"cases/{case}.png", "reader": "",
                           **{c: "" for c in READER_CRITERIA}, "comment": ""})
    with open(out / "key.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "slice", "denoiser"])
        w.writeheader()
        w.writerows(key_rows)
    with open(out / "score_sheet.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "image", "reader", *READER_CRITERIA, "comment"])
        w.writeheader()
        w.writerows(sheet_rows)
    (out / "READ_ME_FIRST.txt").write_text(
        "Reader study. Give readers the cases/ folder and a copy of score_sheet.csv each; keep key.csv away.\n"
        "Score every case 1-5 on each criterion (5 = best: least noise, sharpest, fewest artifacts, most confident),\n"
        "put your reader name or initials in the 'reader' column, return the sheet. Then run\n"
        "  python -m ldct_tf.evaluate --score-sheet sheet_reader1.csv --score-sheet sheet_reader2.csv --out DIR\n"
        "(add --key key.csv when the sheets are not beside key.csv).\n")
    return {"cases": len(cases), "key": str(out / "key.csv"), "score_sheet": str(out / "score_sheet.csv")}


def weighted_kappa(a: Sequence[int], b: Sequence[int], categories: Sequence[int] = (1, 2, 3, 4, 5)) -> float:
    """Cohen's quadratically weighted kappa of two readers' ordinal scores (1.0 = perfect, 0 = chance)."""
    idx = {c: i for i, c in enumerate(categories)}
    k = len(categories)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[idx[x], idx[y]] += 1
    n = observed.sum()
    if n == 0:
        return float("nan")
    expected = np.outer(observed.sum(1), observed.sum(0)) / n
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    denom = (weights * expected).sum()
    return float(1.0 - (weights * observed).sum() / denom) if denom > 0 else float("nan")


def summarise_scores(sheets: Sequence[str | Path], key_path: Optional[str | Path] = None) -> dict:
    """Unblind filled score sheets with the key; mean score per denoiser and criterion, inter-reader agreement.

    Agreement per criterion: mean pairwise quadratically weighted Cohen's kappa over reader pairs and the share of
    cases where two readers gave the same score.  Needs two or more readers for agreement (else ``None``).
    """
    sheets = [Path(s) for s in sheets]
    if key_path:
        key_path = Path(key_path)
        if not key_path.is_file():
            raise FileNotFoundError(f"{key_path}: the reader-study key given with --key was not found (the kit "
                                    f"writes it as OUT/reader_study/key.csv)")
    else:
        key_path = sheets[0].parent / "key.csv"
        if not key_path.is_file():
            raise FileNotFoundError(f"{key_path}: no reader-study key beside the first score sheet; pass --key "
                                    f"OUT/reader_study/key.csv")
    with open(key_path, newline="") as f:
        key = {r["case"]: r for r in csv.DictReader(f)}
    scores: dict[str, dict[str, dict[str, int]]] = {}  # reader -> case -> criterion -> score
    for sheet in sheets:
        with open(sheet, newline="") as f:
            for line, r in enumerate(csv.DictReader(f), start=2):
                if r.get("case") not in key:
                    raise ValueError(f"{sheet}:{line}: case {r.get('case')!r} is not in {key_path}")
                reader = (r.get("reader") or "").strip() or sheet.stem
                for c in READER_CRITERIA:
                    value = (r.get(c) or "").strip()
                    if not value:
                        continue
                    if value not in {"1", "2", "3", "4", "5"}:
                        raise ValueError(f"{sheet}:{line}: {c} must be an integer 1-5, got {value!r}")
                    scores.setdefault(reader, {}).setdefault(r["case"], {})[c] = int(value)
    if not scores:
        raise ValueError(f"no scores found in {[str(s) for s in sheets]}")
    readers = sorted(scores)
    denoisers = sorted({r["denoiser"] for r in key.values()})
    per_denoiser = {d: {c: interval95([scores[rd][case][c] for rd in readers for case in scores[rd]
                                       if key[case]["denoiser"] == d and c in scores[rd][case]])
                        for c in READER_CRITERIA} for d in denoisers}
    agreement = {}
    for c in READER_CRITERIA:
        kappas, exact, n_pairs = [], [], 0
        for i, ra in enumerate(readers):
            for rb in readers[i + 1:]:
                common = [k for k in scores[ra] if k in scores[rb] and c in scores[ra][k] and c in scores[rb][k]]
                if not common:
                    continue
                a = [scores[ra][k][c] for k in common]
                b = [scores[rb][k][c] for k in common]
                kappas.append(weighted_kappa(a, b))
                exact.append(float(np.mean(np.equal(a, b))))
                n_pairs += 1
        agreement[c] = {"reader_pairs": n_pairs,
                        "weighted_kappa": float(np.nanmean(kappas)) if kappas else None,
                        "exact_agreement": float(np.mean(exact)) if exact else None}
    return {"readers": len(readers), "cases_scored": len({k for r in scores.values() for k in r}),
            "scores": per_denoiser, "agreement": agreement}


def score_report_markdown(result: dict) -> str:
    lines = [f"# Reader study: {result['readers']} reader(s), {result['cases_scored']} cases", "",
             "Mean score (1-5, 5 = best) and 95 % interval per denoiser; `reference` is the normal-dose slice.", "",
             "| denoiser | " + " | ".join(READER_CRITERIA) + " |", "|---" * (len(READER_CRITERIA) + 1) + "|"]
    for d, crit in result["scores"].items():
        lines.append(f"| {d} | " + " | ".join(_fmt(crit[c], 2) for c in READER_CRITERIA) + " |")
    lines += ["", "Inter-reader agreement (mean pairwise quadratically weighted Cohen's kappa; exact agreement):", ""]
    for c, a in result["agreement"].items():
        if a["weighted_kappa"] is None:
            lines.append(f"- {c}: n/a (needs two readers scoring the same cases)")
        else:
            lines.append(f"- {c}: kappa {a['weighted_kappa']:.2f}, exact {a['exact_agreement']:.0%} "
                         f"({a['reader_pairs']} reader pair(s))")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldct_tf.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--pairs", help="CSV with header low,normal (or quarter_dose,full_dose), paths relative to it")
    src.add_argument("--low", help="folder (or file) of low-dose DICOM, matched to --normal by position")
    src.add_argument("--normal", help="folder (or file) of normal-dose DICOM")
    src.add_argument("--simulate", type=float, metavar="DOSE_FRACTION",
                     help="simulate this dose fraction from --normal (or the normal column of --pairs)")
    src.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                     help="simulator calibration JSON for --simulate (python -m ldct_tf.calibration; default: "
                          "configs/calibration_aapm_mayo.json)")
    src.add_argument("--patients", help="comma-separated patients of the pairs CSV's 'patient' column to use")
    p.add_argument("--denoiser", action="append", metavar="NAME",
                   help="none | gaussian | nlm | tv | bm3d | model:PATH; repeat for several "
                        "(default: none gaussian nlm tv)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--panels", type=int, default=3, help="slices with side-by-side panels (default %(default)s)")
    p.add_argument("--lesions", type=int, default=0, metavar="N",
                   help="lesion detectability: insert lesions into the normal-dose slices of the first N pairs and "
                        "simulate low dose (two simulations per slice, ~15 s each)")
    p.add_argument("--seed", type=int, default=0, help="seed for --simulate noise and the reader-study order")
    p.add_argument("--reader-study", type=int, metavar="N", help="also write a blinded reader-study kit of N slices")
    p.add_argument("--score-sheet", action="append", metavar="CSV",
                   help="filled reader-study sheet(s): unblind and summarise (no evaluation is run)")
    p.add_argument("--key", help="reader-study key.csv (default: beside the first score sheet)")
    p.add_argument("--tune", metavar="NAMES",
                   help="tune these baselines' strength on the given pairs (development patients only!) instead of "
                        "evaluating; writes tuning.json")
    p.add_argument("--tune-stride", type=int, default=1, help="tune on every k-th pair (e.g. 4 for bm3d)")
    return p


def _pairs_from_args(args: argparse.Namespace) -> list[Pair]:
    patients = [s.strip() for s in args.patients.split(",")] if args.patients else None
    if args.simulate is not None:
        if args.pairs:
            normals = [no for _, no, _ in read_pairs_csv(args.pairs, patients)]
        elif args.normal:
            normals = _dicom_files(Path(args.normal))
        else:
            raise SystemExit("error: --simulate needs --normal (or --pairs for its normal column)")
        from ldct_tf import calibration as calibration_lib

        try:
            calibration = calibration_lib.load(args.calibration)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        return simulated_pairs(normals, args.simulate, seed=args.seed, calibration=calibration)
    if args.pairs:
        return load_pairs_csv(args.pairs, patients)
    if args.low and args.normal:
        return load_pair_dirs(args.low, args.normal)
    raise SystemExit("error: give --pairs CSV, or --low DIR --normal DIR, or --normal DIR --simulate FRACTION")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out {args.out}: exists and is not a folder; give a folder (it is created if missing)",
              file=sys.stderr)
        return 2
    try:
        if args.score_sheet:
            result = summarise_scores(args.score_sheet, args.key)
            out = Path(args.out or Path(args.score_sheet[0]).parent)
            out.mkdir(parents=True, exist_ok=True)
            (out / "reader_scores.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
            text = score_report_markdown(result)
            (out / "reader_scores.md").write_text(text)
            print(text)
            return 0
        if not args.out:
            raise SystemExit("error: --out DIR is required")
        pairs = _pairs_from_args(args)
        print(f"{len(pairs)} paired slices")
        if args.tune:
            chosen = pairs[::max(1, args.tune_stride)]
            results = {}
            for name in [s.strip() for s in args.tune.split(",") if s.strip()]:
                results[name] = baselines.tune(name, [(p.low, p.normal) for p in chosen], progress=True)
                best = results[name]
                print(f"{name}: best {best['parameter']}={best['best']:g} on {best['slices']} slices"
                      + (" (at the grid's edge: widen it)" if best["at_grid_edge"] else ""))
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "tuning.json").write_text(json.dumps(results, indent=1) + "\n")
            return 0
        specs = args.denoiser or ["none", "gaussian", "nlm", "tv"]
        denoisers = make_denoisers(specs)
        info = {"input": {k: getattr(args, k) for k in ("pairs", "low", "normal", "simulate", "patients", "seed")
                          if getattr(args, k) is not None},
                "denoiser_params": {s: baselines.DEFAULTS.get(s, {}) for s in specs if not s.startswith("model:")}}
        print("denoisers: " + ", ".join(f"{s} {info['denoiser_params'].get(s, '')}".strip() for s in specs))
        summary = evaluate(pairs, denoisers, args.out, figures=not args.no_figures, panel_slices=args.panels,
                           info=info, lesions=args.lesions)
        print((Path(args.out) / "report.md").read_text())
        if args.reader_study:
            kit = write_reader_study(pairs, denoisers, args.reader_study, Path(args.out) / "reader_study",
                                     seed=args.seed)
            print(f"reader-study kit: {kit['cases']} blinded cases, sheet {kit['score_sheet']} (key: {kit['key']})")
        return 0 if summary else 1
    except (ValueError, OSError, ImportError, dicom.NotUsableCT) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
