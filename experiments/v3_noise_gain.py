"""``python -m experiments.v3_noise_gain --work DIR``: does v3 use the noise level it is fed, and would a different
level help where it loses?  A diagnostic on the held-out development patient L143; it chooses nothing.

Why it exists: v3 measures its input's noise index inside the graph (``ldct_tf.models.blocks.NoiseLevelMap``) and
loses to BM3D on L143's smooth-kernel (B30f) slices at the simulated 10 % dose, where the noise index, a local
standard deviation, under-reports the low-frequency noise of a smooth kernel.  Multiplying the level the network sees
by a gain (0.5-3) shows (a) whether the network responds to it at all (FFDNet's premise: the level is a control), and
(b) how much of the B30f loss a kernel-aware level could recover.  Every seed of the shipped recipe, the mean.

Reads ``DIR/original_from_seed*/generator.keras`` and the shared data (``LDCT_DATA_DIR``); writes
``experiments/results/v3_noise_gain.json`` and ``.md``.  L286 is not read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from experiments import v3_data, v3_steps

GAINS = (0.5, 1.0, 1.5, 2.0, 3.0)
RECIPE = "original_from_seed*"  # the shipped recipe (experiments/results/v3_validation.json)
JSON_OUT = v3_steps.RESULTS / "v3_noise_gain.json"
MD_OUT = v3_steps.RESULTS / "v3_noise_gain.md"


def set_noise_gain(model, gain: float, base_scale_hu: float) -> None:
    """Make ``model``'s noise-level channel ``gain`` x the measured level (its NoiseLevelMap divides by a scale)."""
    from ldct_tf.models import blocks

    layers = [layer for layer in model.layers if isinstance(layer, blocks.NoiseLevelMap)]
    if len(layers) != 1:
        raise ValueError(f"expected one NoiseLevelMap layer, found {len(layers)}")
    layers[0].scale_hu = base_scale_hu / gain


def measure(work: Path) -> dict:
    """Per seed, condition and kernel: mean abdomen PSNR/SSIM over L143's slices at each gain."""
    import keras

    from ldct_tf import ct
    from ldct_tf.models import blocks

    pairs, conds, runs = v3_steps.validation_runs(work, RECIPE)
    record: dict = {"patient": v3_data.VALIDATION_PATIENT, "slices": len(pairs), "gains": list(GAINS),
                    "seeds": [r.parent.name for r in runs], "by_seed": {}}
    for run in runs:
        model = keras.saving.load_model(run, compile=False)
        base = next(layer.scale_hu for layer in model.layers if isinstance(layer, blocks.NoiseLevelMap))
        per_gain = record["by_seed"][run.parent.name] = {}
        for gain in GAINS:
            set_noise_gain(model, gain, base)
            per_gain[str(gain)] = {}
            for name, cases in conds.items():
                outputs = [ct.from_model(np.asarray(model(ct.to_model(low)[None, ..., None], training=False))[0, ..., 0])
                           for low, _, _ in cases]
                s = v3_steps._scores(outputs, cases)
                kernels = np.array(s["kernels"])
                per_gain[str(gain)][name] = {k: [float(np.mean(np.array(s[m])[kernels == k])) for m in ("psnr", "ssim")]
                                             for k in sorted(set(s["kernels"]))}
            print(f"v3_noise_gain: {run.parent.name} gain {gain} done", flush=True)
    record["seed_mean"] = {g: {c: {k: np.mean([record["by_seed"][s][g][c][k] for s in record["seeds"]], axis=0)
                                   .round(4).tolist() for k in kernel_scores}
                               for c, kernel_scores in conds_scores.items()}
                           for g, conds_scores in record["by_seed"][record["seeds"][0]].items()}
    return record


def _bm3d_per_kernel() -> dict:
    """BM3D at its PSNR-optimal factor per condition and kernel, from v3's validation results (same slices)."""
    validation = v3_steps.RESULTS / "v3_validation.json"
    if not validation.exists():
        return {}
    out = {}
    for name, r in json.loads(validation.read_text())["results"].items():
        kernels = np.array(r["input"]["kernels"])
        b = r["bm3d_psnr_optimal"]
        out[name] = {k: [float(np.mean(np.array(b[m])[kernels == k])) for m in ("psnr", "ssim")]
                     for k in sorted(set(kernels))}
    return out


def markdown(record: dict, bm3d: dict) -> str:
    lines = ["# Does v3 use its noise level? (written by `python -m experiments.v3_noise_gain`)", "",
             f"Patient {record['patient']} ({record['slices']} slices, never trained on); the shipped recipe's seeds "
             f"({', '.join(record['seeds'])}), their mean. Abdomen-window PSNR (dB) / SSIM against the full-dose slice "
             "when the noise level fed to the network is multiplied by a gain (1 = as shipped). BM3D: its "
             "PSNR-optimal factor per condition (`experiments/results/v3_validation.json`).", "",
             "| condition | kernel | " + " | ".join(f"gain {g:g}" for g in record["gains"]) + " | BM3D |",
             "|---|---|" + "---|" * len(record["gains"]) + "---|"]
    first = record["seed_mean"][str(record["gains"][0])]
    for name, kernels in first.items():
        for kernel in kernels:
            cells = [record["seed_mean"][str(g)][name][kernel] for g in record["gains"]]
            ref = bm3d.get(name, {}).get(kernel)
            lines.append(f"| {v3_steps.CONDITION_TEXT.get(name, name)} | {kernel} | "
                         + " | ".join(f"{p:.2f} / {s:.3f}" for p, s in cells)
                         + (f" | {ref[0]:.2f} / {ref[1]:.3f} |" if ref else " | - |"))
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return v3_steps.run_guide(argv, "python -m experiments.v3_noise_gain", __doc__.split("\n\n")[0], measure,
                              lambda record: markdown(record, _bm3d_per_kernel()), JSON_OUT, MD_OUT)


if __name__ == "__main__":
    sys.exit(main())
