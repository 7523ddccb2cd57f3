"""The audit and detectability sections of ``python -m ldct_tf.evaluate``'s report (tables, figures).

Why a module of its own: ``evaluate`` scores fidelity (PSNR, SSIM) against a normal-dose reference; this adds the two
questions a reader asks first, "did the denoiser change anatomy?" (the per-slice change audit of every denoiser's
output against its low-dose input, ``ldct_tf.audit.scores``) and "do small low-contrast lesions stay visible?"
(lesions inserted into the normal-dose slices of the first ``--lesions N`` pairs, simulated at low dose,
``ldct_tf.evaluate.detectability``).  ``evaluate`` only calls :func:`audit_row`, :func:`extras`, :func:`write_figures` and
:func:`report_lines`.
"""

from __future__ import annotations

import sys

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ldct_tf.audit import scores as audit_scores

SliceDenoiser = Callable[[np.ndarray], np.ndarray]


def audit_row(label: str, name: str, low: np.ndarray, out: np.ndarray, spacing: Sequence[float],
              thresholds: Optional[audit_scores.AuditThresholds] = None) -> dict:
    """One slice x denoiser: the audit's slice summary (flagged patches, worst scores, residual SD)."""
    result = audit_scores.audit_slice(low, out, spacing, thresholds or audit_scores.load_thresholds())
    return {"slice": label, "denoiser": name, **result.summary()}


def summarise_audit(rows: Sequence[dict], names: Sequence[str]) -> dict:
    out = {}
    for n in names:
        mine = [r for r in rows if r["denoiser"] == n]
        if not mine:
            continue
        out[n] = {"slices": len(mine),
                  "flagged_slice_share": float(np.mean([r["flagged_patches"] > 0 for r in mine])),
                  "flagged_patches_per_slice": float(np.mean([r["flagged_patches"] for r in mine])),
                  "by_criterion_per_slice": {c: float(np.mean([r["flagged_by"][c] for r in mine]))
                                             for c in ("frc", "blob", "anatomy")},
                  "residual_sd_hu": float(np.mean([r["residual_sd_hu"] for r in mine]))}
    return out


def lesion_study(pairs: Sequence, denoisers: Mapping[str, SliceDenoiser], n_slices: int, seed: int = 0,
                 per_slice: int = 3) -> dict:
    """Insert up to ``per_slice`` lesions into the normal-dose slice of the first ``n_slices`` pairs, simulate low
    dose (default kernel settings of configs/audit.yaml), score every denoiser (``ldct_tf.evaluate.detectability``)."""
    from ldct_tf import metrics
    from ldct_tf.evaluate import detectability
    from ldct_tf.evaluate import lesions

    config = audit_scores.load_config()
    rows: dict[str, list[dict]] = {}
    psnr: dict[str, list[float]] = {}
    used = 0
    for index, pair in enumerate(pairs[:n_slices]):
        if pair.normal.shape[0] != pair.normal.shape[1]:
            continue  # the simulation needs square slices
        spacing = float(np.mean(pair.pixel_spacing_mm))
        found = lesions.place_lesions(pair.normal, spacing, per_slice, np.random.default_rng(seed + index))
        if not found:
            continue
        case = lesions.simulate_case(pair.name, pair.normal, spacing, found, "default", seed=seed + index,
                                     dose_fraction=float(config.get("simulation", {}).get("dose_fraction", 0.25)),
                                     config=config)
        for name, items in detectability.run_case(case, denoisers, pair.normal, seed=seed + index).items():
            rows.setdefault(name, []).extend(items)
        psnr.setdefault("input", []).append(metrics.psnr(case.low_with, case.ref_with, "abdomen"))
        for name, fn in denoisers.items():
            psnr.setdefault(name, []).append(metrics.psnr(fn(case.low_with), case.ref_with, "abdomen"))
        used += 1
    summary = detectability.summarise(rows)
    for name, values in psnr.items():
        summary.setdefault(name, {})["psnr_abdomen_lesion_slices"] = float(np.mean(values))
    return {"slices": used, "per_denoiser": summary, "rows": rows}


def extras(audit_rows: Sequence[dict], names: Sequence[str], pairs: Sequence,
           denoisers: Mapping[str, SliceDenoiser], lesions: int, seed: int = 0) -> dict:
    """What ``evaluate`` adds to its summary: ``audit`` (+ rows) and, with ``lesions`` > 0, ``detectability``."""
    out = {"audit": summarise_audit(audit_rows, names), "audit_rows": list(audit_rows),
           "audit_provenance": audit_scores.load_config().get("provenance", {})}
    if lesions > 0:
        out["detectability"] = lesion_study(pairs, denoisers, lesions, seed)
    return out


def report_lines(summary: dict) -> list[str]:
    lines = []
    audit = summary.get("audit") or {}
    if audit:
        status = (summary.get("audit_provenance") or {}).get("status", "unknown")
        lines += ["", "## Change audit (reference-free: each output against its own low-dose input)", "",
                  f"Patches flagged by `ldct_tf.audit` (thresholds: configs/audit.yaml, {status}): anatomy-band FRC "
                  "breakdown (frc), a lesion-sized blob in the removed residual (blob), residual following the "
                  "anatomy's edges (anatomy). How to read it: docs/audit.md.", "",
                  "| denoiser | slices flagged | patches / slice | frc | blob | anatomy | residual SD HU |",
                  "|---|---|---|---|---|---|---|"]
        for n, a in audit.items():
            c = a["by_criterion_per_slice"]
            lines.append(f"| {n} | {a['flagged_slice_share']:.0%} | {a['flagged_patches_per_slice']:.2f} | "
                         f"{c['frc']:.2f} | {c['blob']:.2f} | {c['anatomy']:.2f} | {a['residual_sd_hu']:.1f} |")
    det = summary.get("detectability")
    if det and det.get("slices"):
        lines += ["", f"## Low-contrast detectability ({det['slices']} slices with inserted 5-15 mm, 10-40 HU "
                      "lesions, simulated quarter dose)", "",
                  "NPW matched-filter d' (template: the noise-free lesion), lesion CNR, share of the lesion "
                  "contrast that passes the denoiser, and abdomen PSNR of the same slices against their noise-free "
                  "version: a denoiser that wins PSNR by blurring lesions away loses d' here.", "",
                  "| denoiser | lesions | d' mean | d' vs input | d' >= 2 | CNR | contrast kept | PSNR abd |",
                  "|---|---|---|---|---|---|---|---|"]

        def f(v, spec):
            return "n/a" if v is None else format(v, spec)

        for n, d in det["per_denoiser"].items():
            lines.append(f"| {n} | {d.get('lesions', 0)} | {f(d.get('dprime_mean'), '.2f')} | "
                         f"{f(d.get('dprime_vs_input'), '.2f')} | {f(d.get('detectable_share'), '.0%')} | "
                         f"{f(d.get('cnr_mean'), '.2f')} | {f(d.get('contrast_kept_mean'), '.2f')} | "
                         f"{f(d.get('psnr_abdomen_lesion_slices'), '.2f')} |")
    return lines


def write_figures(summary: dict, folder: Path) -> list[Path]:
    """``audit_flags.png`` (flagged patches per slice by criterion) and, with lesions, ``detectability.png``
    (d' against PSNR per denoiser)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a notebook's inline backend is kept
        matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    audit = summary.get("audit") or {}
    if audit:
        names = list(audit)
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 3.6))
        bottom = np.zeros(len(names))
        for criterion in ("frc", "blob", "anatomy"):
            values = np.array([audit[n]["by_criterion_per_slice"][criterion] for n in names])
            ax.bar(range(len(names)), values, bottom=bottom, label=criterion)
            bottom += values
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("flagged patches per slice (lower is better)")
        ax.set_title("Change audit: what each denoiser changed beyond noise", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "audit_flags.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    det = summary.get("detectability")
    if det and det.get("slices"):
        fig, ax = plt.subplots(figsize=(5.0, 3.8))
        for n, d in det["per_denoiser"].items():
            if d.get("dprime_mean") is None or d.get("psnr_abdomen_lesion_slices") is None:
                continue
            ax.scatter(d["psnr_abdomen_lesion_slices"], d["dprime_mean"])
            ax.annotate(n, (d["psnr_abdomen_lesion_slices"], d["dprime_mean"]), fontsize=7)
        ax.set_xlabel("abdomen PSNR vs noise-free (dB, higher is better)")
        ax.set_ylabel("NPW d' of inserted lesions (higher is better)")
        ax.set_title("Fidelity vs lesion detectability", fontsize=9)
        fig.tight_layout()
        written.append(folder / "detectability.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
