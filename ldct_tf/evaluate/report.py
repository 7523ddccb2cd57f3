"""Writing an evaluation: ``metrics.csv``, ``summary.json``, ``report.md`` and the figures.

Why a module of its own: :mod:`ldct_tf.evaluate.scoring` computes, this only writes what it computed, so a change
to a table or a file name touches one file.  The figures themselves are drawn by ``ldct_tf.evaluate.figures`` and
the audit's by ``ldct_tf.audit.report``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from ldct_tf.audit import report as audit_report
from ldct_tf.evaluate.scoring import METRICS, REFERENCE, WIN_METRICS, Scores
from ldct_tf.jsonio import jsonable


def write_metrics_csv(rows: Sequence[dict], path: Path) -> Path:
    """metrics.csv: one row per slice and denoiser, floats to six significant digits."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slice", "denoiser", *METRICS])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in writer.fieldnames})
    return path


def fmt(stat: dict, digits: int) -> str:
    """``mean [low, high]`` of an :func:`~ldct_tf.evaluate.scoring.interval95` result (``n/a`` when empty)."""
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
        lines.append(f"| {n} | " + " | ".join(fmt(summary["metrics"][n][m], _DIGITS[m]) for m in cols) + " |")
    ref = summary["reference"]
    lines += ["", "Normal-dose reference itself: noise SD " + fmt(ref["noise_sd_hu"], 1) + " HU, CNR "
              + fmt(ref["cnr"], 2) + ", NPS mean frequency " + fmt(ref["nps_mean_freq"], 3) + " cycles/mm.", "",
              "Distance of the NPS mean frequency to the reference's (|f - f_ref|, cycles/mm; smaller = noise texture "
              "closer to normal dose):", ""]
    for n in names:
        lines.append(f"- {n}: {fmt(summary['nps_mean_freq_distance_to_reference'][n], 3)}")
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


def write_figures(summary: dict, panels, curves, folder: Path) -> list[Path]:
    """The PNG figures (``ldct_tf.evaluate.figures``); ``panels`` holds (slice name, pair, outputs, rois)."""
    from ldct_tf.evaluate import figures as evaluation_figures

    return evaluation_figures.write_figures(summary, panels, curves, folder, METRICS, REFERENCE)


def write(scores: Scores, out_dir: str | Path, *, figures: bool = True) -> dict:
    """Write the evaluation's files into ``out_dir`` (created if missing); fills and returns ``summary["files"]``."""
    summary = scores.summary
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary["files"]["metrics_csv"] = str(write_metrics_csv(summary["rows"], out / "metrics.csv"))
    if figures:
        summary["files"]["figures"] = [str(p) for p in write_figures(summary, scores.panels, scores.curves,
                                                                     out / "figures")
                                       + audit_report.write_figures(summary, out / "figures")]
    summary["files"]["report"] = str(out / "report.md")
    summary["files"]["summary"] = str(out / "summary.json")
    (out / "report.md").write_text(report_markdown(summary, out))
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n")
    return summary["files"]
