"""Quality benchmark of the SHIPPED models: ``python -m benchmarks.quality [--model saved_models/ldct_denoiser]``.

Scores every version of the shipped SavedModel (v1, the pure CycleGAN; v2, chosen by ``experiments.ablation``) beside
BM3D, non-local means and the low-dose input, in the same run, on the test patient L286 of the AAPM-Mayo development
pairs (``../shared/data`` or ``$LDCT_DATA_DIR``; 4 real quarter/full-dose pairs, D45f).  Nothing is trained or chosen
here: training and the choice of the recipe happen in ``experiments.ablation`` (on validation slices of the training
patients), so this benchmark only re-measures what ships, in minutes, through the exported SavedModel exactly as a
user would call it (``ldct_tf.evaluate``).

Writes ``benchmarks/results/quality.json`` (machine, versions, every denoiser's figures, the issue's targets for the
newest version and whether each was met) and the evaluation report with figures in ``benchmarks/results/quality/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import harness

REPO = harness.REPO
RESULTS = harness.RESULTS
TEST_PATIENT = harness.TEST_PATIENT
BASELINES = ("bm3d", "nlm", "none")


def targets(summary: dict, model: str) -> dict:
    """The issue's targets, each with the figures it was decided on (means over the test slices)."""
    mean = {name: {m: v["mean"] for m, v in figures.items()} for name, figures in summary["metrics"].items()}
    model_m, input_m, bm3d_m = mean[model], mean["none"], mean.get("bm3d")
    higher = ("psnr_abdomen", "ssim_abdomen", "psnr_wide", "ssim_wide")
    lower = ("rmse_hu", "noise_sd_hu")
    beats_input = {m: model_m[m] > input_m[m] for m in higher} | {m: model_m[m] < input_m[m] for m in lower}
    out = {"beats_low_dose_input_on_every_metric": {"met": all(beats_input.values()), "per_metric": beats_input}}
    if bm3d_m is not None:
        beats_bm3d = {m: model_m[m] > bm3d_m[m] for m in higher}
        distance = summary["nps_mean_freq_distance_to_reference"]
        nps_closer = distance[model]["mean"] < distance["bm3d"]["mean"]
        out["beats_bm3d_on_psnr_and_ssim_both_windows"] = {"met": all(beats_bm3d.values()), "per_metric": beats_bm3d}
        out["nps_mean_frequency_closer_to_normal_dose_than_bm3d"] = {
            "met": nps_closer, "model_distance": distance[model]["mean"], "bm3d_distance": distance["bm3d"]["mean"]}
        out["edge_sharpness_at_least_0.95"] = {"met": model_m["edge_sharpness"] >= 0.95,
                                               "value": model_m["edge_sharpness"],
                                               "bm3d": bm3d_m["edge_sharpness"]}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "saved_models" / "ldct_denoiser"),
                        help="a SavedModel folder NAME/ with numbered versions")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated, from ldct_tf.baselines")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = parser.parse_args(argv)

    root = harness.data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"SKIPPED: no Mayo pairs under {root} (set LDCT_DATA_DIR to the shared data folder)")
        return 0
    model_root = Path(args.model)
    numbered = sorted((p for p in model_root.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists()),
                      key=lambda p: int(p.name)) if model_root.is_dir() else []
    if not numbered:
        print(f"benchmarks.quality: error: {model_root}: no numbered SavedModel version", file=sys.stderr)
        return 1
    started = time.perf_counter()
    report_dir = Path(args.out).with_suffix("")
    denoisers = make_denoisers(numbered, [b for b in args.baselines.split(",") if b])
    summary, per_kernel, n_pairs = score(root, denoisers, report_dir, str(model_root))
    metadata = {name: json.loads((d / "metadata.json").read_text()) for name, d in
                ((f"ldct_tf_v{d.name}", d) for d in numbered) if (d / "metadata.json").exists()}
    result = {
        "benchmark": "quality",
        "machine": harness.machine_info(),
        "versions": harness.versions("scikit-image", "bm3d"),
        "data": {"test": f"{TEST_PATIENT} ({n_pairs} real quarter/full-dose pairs, never seen in training or "
                         "used for any choice)", "pairs_used_for_training": 0},
        "models": {name: {k: m.get(k) for k in ("recipe", "input_blend", "benchmark", "data", "calibration")}
                   for name, m in metadata.items()},
        "evaluation_seconds": round(time.perf_counter() - started, 1),
        "metrics": summary["metrics"],
        "per_kernel": per_kernel,
        "wins": summary["wins"],
        "nps_mean_freq_distance_to_reference": summary["nps_mean_freq_distance_to_reference"],
        "reference": summary["reference"],
        "targets": {name: targets(summary, name) for name in denoisers if name.startswith("ldct_tf_v")},
        "newest": f"ldct_tf_v{numbered[-1].name}",
        "report": str(report_dir / "report.md"),
    }
    harness.write_result(result, Path(args.out), indent=1)
    print(json.dumps({"metrics_mean": {n: {m: round(v["mean"], 4) for m, v in f.items() if v["mean"] is not None}
                                       for n, f in summary["metrics"].items()},
                      "targets": {n: {k: v["met"] for k, v in t.items()} for n, t in result["targets"].items()}},
                     indent=1))
    print(f"Wrote {args.out} and {report_dir / 'report.md'}")
    return 0


def make_denoisers(versions: Sequence[Path], baselines: Sequence[str]) -> dict:
    """``ldct_tf_vN`` for every shipped version, then the baselines: name -> HU slice function."""
    from ldct_tf import evaluate
    from ldct_tf.export import SavedModelDenoiser

    denoisers = {}
    for version_dir in versions:
        model = SavedModelDenoiser(version_dir)
        denoisers[f"ldct_tf_v{version_dir.name}"] = (lambda m: lambda hu: m(hu))(model)
    denoisers.update(evaluate.make_denoisers(list(baselines)))
    return denoisers


def score(root: Path, denoisers: dict, report_dir: Path, model: str) -> tuple[dict, dict, int]:
    """Every denoiser on the test patient's pairs (report in ``report_dir``), and per kernel; returns (the summary,
    the per-kernel means, the number of pairs)."""
    from ldct_tf import evaluate

    rows = harness.pairs_of(root, "test")
    pairs = [evaluate.load_pair(root / "mayo_pairs" / r["quarter_dose"], root / "mayo_pairs" / r["full_dose"],
                                name=Path(r["full_dose"]).stem) for r in rows]
    summary = evaluate.evaluate(pairs, denoisers, report_dir, info={"test_patient": TEST_PATIENT, "model": model})
    per_kernel = {}
    for kernel in sorted({r["kernel"] for r in rows}):
        members = [p for p, r in zip(pairs, rows) if r["kernel"] == kernel]
        k_summary = summary if len(members) == len(pairs) else evaluate.evaluate(members, denoisers, None)
        per_kernel[kernel] = {"slices": len(members), "mean": {n: {m: v["mean"] for m, v in f.items()}
                                                               for n, f in k_summary["metrics"].items()}}
    return summary, per_kernel, len(pairs)


if __name__ == "__main__":
    sys.exit(main())
