"""``python -m experiments.v3_strength --work DIR``: how v3's strength control trades noise for fidelity, per dose and
kernel, on the held-out development patient L143 (never trained on).  It chooses nothing: it measures the guide
that ``docs/denoise.md`` gives for ``denoise --strength``.

Why it exists: v3 at strength 1 removes nearly all the noise, including the noise a normal-dose scan of the same
kernel still carries.  Scored against a normal-dose slice, that costs fidelity where the input is only a little
noisier than the reference (a half-dose scan): there a partial strength scores higher.  The strength is the user's
(as vendors' low/medium/high); this run says, with the figures, which strength comes closest to the normal dose at
each dose and kernel, for every seed of the shipped recipe.

Reads ``DIR/original_from_seed*/generator.keras`` (written by ``python -m experiments.v3 train``) and the shared data
(``LDCT_DATA_DIR``); writes ``experiments/results/v3_strength.json`` and ``v3_strength.md``.  L286 is not read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from experiments import v3_data, v3_steps

STRENGTHS = tuple(round(0.1 * k, 1) for k in range(11))
RECIPE = "original_from_seed*"  # the shipped recipe (experiments/results/v3_validation.json)
JSON_OUT = v3_steps.RESULTS / "v3_strength.json"
MD_OUT = v3_steps.RESULTS / "v3_strength.md"


def _slice_scores(low: np.ndarray, network: np.ndarray, ref: np.ndarray) -> dict[str, list[float]]:
    """Abdomen PSNR and SSIM of ``low + s (network - low)`` against ``ref`` at every strength ``s``."""
    from ldct_tf import metrics

    mixed = [low + s * (network - low) for s in STRENGTHS]
    return {"psnr": [float(metrics.psnr(m, ref, "abdomen")) for m in mixed],
            "ssim": [float(metrics.ssim(m, ref, "abdomen")) for m in mixed]}


def measure(work: Path) -> dict:
    """Per seed, condition and kernel: mean PSNR/SSIM over L143's slices at each strength."""
    from ldct_tf import noise

    pairs, conds, runs = v3_steps.validation_runs(work, RECIPE)
    record: dict = {"patient": v3_data.VALIDATION_PATIENT, "slices": len(pairs), "strengths": list(STRENGTHS),
                    "seeds": [r.parent.name for r in runs], "conditions": {}}
    for name, cases in conds.items():
        kernels = sorted({k for _, _, k in cases})
        levels = {k: [noise.noise_index(low) for low, _, kk in cases if kk == k] for k in kernels}
        entry = record["conditions"][name] = {
            "input_noise_index_hu": {k: float(np.mean(levels[k])) for k in kernels},
            "reference_noise_index_hu": {k: float(np.mean([noise.noise_index(ref) for _, ref, kk in cases
                                                           if kk == k])) for k in kernels},
            "input_noise_index_hu_range": {k: [float(f(levels[k])) for f in (np.min, np.max)] for k in kernels},
            "slices": {k: sum(1 for *_, kk in cases if kk == k) for k in kernels}, "by_seed": {}}
    for run in runs:
        denoiser = v3_steps.keras_denoiser(run)
        for name, cases in conds.items():
            per_kernel: dict[str, list[dict]] = {}
            for low, ref, kernel in cases:
                per_kernel.setdefault(kernel, []).append(_slice_scores(low, denoiser(low), ref))
            record["conditions"][name]["by_seed"][run.parent.name] = {
                k: {m: np.mean([s[m] for s in scores], axis=0).round(4).tolist() for m in ("psnr", "ssim")}
                for k, scores in per_kernel.items()}
            print(f"v3_strength: {run.parent.name} {name} done", flush=True)
    _add_best(record)
    return record


def _add_best(record: dict) -> None:
    """The strength with the highest seed-mean PSNR, and SSIM, per condition and kernel."""
    for entry in record["conditions"].values():
        entry["seed_mean"], entry["best_strength"] = {}, {}
        for kernel in entry["slices"]:
            mean = {m: np.mean([seed[kernel][m] for seed in entry["by_seed"].values()], axis=0)
                    for m in ("psnr", "ssim")}
            entry["seed_mean"][kernel] = {m: v.round(4).tolist() for m, v in mean.items()}
            entry["best_strength"][kernel] = {m: STRENGTHS[int(np.argmax(v))] for m, v in mean.items()}


LABELS = {"real_25": "real 25 % dose (Mayo noise insertion)", "sim_10": "10 % dose, simulated",
          "sim_25": "25 % dose, simulated", "sim_50": "50 % dose, simulated"}


def markdown(record: dict) -> str:
    shown = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)
    idx = [record["strengths"].index(s) for s in shown]
    lines = ["# v3's strength control on the held-out development patient (written by "
             "`python -m experiments.v3_strength`)", "",
             f"Patient {record['patient']} ({record['slices']} slices, never trained on); the shipped recipe's seeds "
             f"({', '.join(record['seeds'])}), their mean. Abdomen-window PSNR (dB) / SSIM against the full-dose "
             "slice at each strength (0 = the low-dose input, 1 = the network output). Noise index: "
             "`ldct_tf.noise.noise_index` of the input and of the full-dose slice (HU).", "",
             "| condition | kernel | slices | noise index in / full dose | "
             + " | ".join(f"strength {s:g}" for s in shown) + " | best strength (PSNR, SSIM) |",
             "|---|---|---|---|" + "---|" * len(shown) + "---|"]
    for name, entry in record["conditions"].items():
        for kernel, n in entry["slices"].items():
            mean = entry["seed_mean"][kernel]
            cells = [f"{mean['psnr'][i]:.2f} / {mean['ssim'][i]:.3f}" for i in idx]
            best = entry["best_strength"][kernel]
            lines.append(f"| {LABELS.get(name, name)} | {kernel} | {n} | "
                         f"{entry['input_noise_index_hu'][kernel]:.0f} / {entry['reference_noise_index_hu'][kernel]:.0f}"
                         f" | " + " | ".join(cells) + f" | {best['psnr']:g}, {best['ssim']:g} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return v3_steps.run_guide(argv, "python -m experiments.v3_strength", __doc__.split("\n\n")[0], measure,
                              markdown, JSON_OUT, MD_OUT)


if __name__ == "__main__":
    sys.exit(main())
