"""Quality benchmark: ldct_tf trained unpaired on real CT, scored on a held-out patient against classical denoisers.

``python -m benchmarks.quality [--config configs/pretrained.yaml] [--model-dir RUN] [--steps N]``

1. Data (``../shared/data`` or ``$LDCT_DATA_DIR``): the 25 Mayo quarter/full-dose pairs and the real normal-dose
   Training is unpaired by construction: the low-dose stream is patient L143's quarter-dose slices (4 sharp D45f, 7
   smooth B30f kernel), the normal-dose stream is L096's full-dose slices (10, D45f); no pair is ever used.  The
   normal-dose side is all D45f on purpose: a GAN learns to make its output look like the normal-dose domain, kernel
   included.  A first run whose normal-dose side mixed in smooth-kernel images (L143's B30f, the abdomen series)
   removed edges along with the noise (visible in its "removed" images) and after 500 steps scored below the
   input on the sharp-kernel test slices (abdomen PSNR 23.39 vs 23.77 dB, SSIM 0.680 vs 0.790).  Patient L286 (4 pairs) is held out: the validation split that training only reports on, and
   the test set scored here.  The split is fixed by the dose manifest's ``split`` column.
2. Training (skipped when ``--model-dir`` already holds a trained run): ``python -m ldct_tf.train`` with the config.
3. The trained generator is exported with ``ldct_tf.export`` and scored through the SavedModel, i.e. exactly what is
   shipped, beside BM3D, non-local means and the low-dose input (``none``), in the same run, with ``ldct_tf.evaluate``.

Writes ``benchmarks/results/quality.json`` (machine, versions, training run, every denoiser's figures, the targets
and whether each was met) and the evaluation report with figures in ``benchmarks/results/quality/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TEST_PATIENT = "L286"
LOW_PATIENT = "L143"
NORMAL_PATIENT = "L096"
BASELINES = ("bm3d", "nlm", "none")


def data_root() -> Path:
    return Path(os.environ.get("LDCT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def write_training_manifest(root: Path, out_csv: Path) -> Path:
    """Dose manifest for unpaired training: low = L143 quarter dose, normal = L096 full dose, L286 both doses in
    ``val`` (held out).  The other dose of L096 and L143 is left out on purpose."""
    mayo = root / "mayo_pairs"
    with open(mayo / "pairs.csv", newline="") as handle, open(out_csv, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "dose", "patient", "split"])
        for row in csv.DictReader(handle):
            patient = row["patient"]
            if patient == LOW_PATIENT:
                writer.writerow([mayo / row["quarter_dose"], "low", patient, "train"])
            elif patient == NORMAL_PATIENT:
                writer.writerow([mayo / row["full_dose"], "normal", patient, "train"])
            elif patient == TEST_PATIENT:
                writer.writerow([mayo / row["quarter_dose"], "low", patient, "val"])
                writer.writerow([mayo / row["full_dose"], "normal", patient, "val"])
    return out_csv


def make_shards(root: Path, work: Path) -> Path:
    from pipelines import dicom_to_tfrecord

    manifest = write_training_manifest(root, work / "doses.csv")
    shards = work / "shards"
    code = dicom_to_tfrecord.main([
        "--input", str(root / "mayo_pairs"),
        "--dose-manifest", str(manifest), "--output", str(shards), "--salt", "quality-benchmark", "--num-shards", "1"])
    if code:
        raise SystemExit(f"the pipeline failed with exit status {code}")
    return shards


def train_if_needed(config: str, model_dir: Path, root: Path, work: Path, overrides: Sequence[str]) -> dict:
    summary_path = model_dir / "training_summary.json"
    if summary_path.exists() and (model_dir / "generator.keras").exists():
        print(f"Using the trained run in {model_dir}", flush=True)
    else:
        from ldct_tf.train import train

        shards = make_shards(root, work)
        train(["--config", config, "--data", str(shards), "--model-dir", str(model_dir), "--verbose", "2",
               *overrides])
    return json.loads(summary_path.read_text())


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
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrained.yaml"))
    parser.add_argument("--model-dir", help="training run folder; trained here first unless it holds a finished run")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated, from ldct_tf.baselines")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for training, section.key=value")
    args = parser.parse_args(argv)

    root = data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"SKIPPED: no Mayo pairs under {root} (set LDCT_DATA_DIR to the shared data folder)")
        return 0
    from benchmarks.pipeline import machine_info, versions
    from ldct_tf import evaluate
    from ldct_tf.export import SavedModelDenoiser, export_generator, load_generator
    from ldct_tf import config as config_lib

    work = Path(tempfile.mkdtemp(prefix="ldct_quality_"))
    model_dir = Path(args.model_dir) if args.model_dir else work / "run"
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    training = train_if_needed(args.config, model_dir, root, work, overrides)
    cfg = config_lib.load(model_dir / "config.yaml")
    version_dir = export_generator(load_generator(model_dir, cfg), work / "export" / "ldct_denoiser",
                                   metadata={"benchmark": "quality", "training_summary": training})
    model_name = "ldct_tf"
    model = SavedModelDenoiser(version_dir)
    denoisers = {model_name: lambda hu: model(hu)}
    denoisers.update(evaluate.make_denoisers([b for b in args.baselines.split(",") if b]))

    pairs = evaluate.load_pairs_csv(root / "mayo_pairs" / "pairs.csv", patients=[TEST_PATIENT])
    report_dir = Path(args.out).with_suffix("")
    started = time.perf_counter()
    summary = evaluate.evaluate(pairs, denoisers, report_dir, info={
        "test_patient": TEST_PATIENT, "model_dir": str(model_dir), "config": args.config})
    result = {
        "benchmark": "quality",
        "machine": machine_info(),
        "versions": versions(),
        "data": {"train_low": f"{LOW_PATIENT} quarter dose", "train_normal": f"{NORMAL_PATIENT} full dose",
                 "test": f"{TEST_PATIENT} ({len(pairs)} real quarter/full-dose pairs, never seen in training)",
                 "pairs_used_for_training": 0},
        "training": {k: training.get(k) for k in ("steps", "steps_requested", "seconds", "steps_per_second",
                                                   "stopped_by_time_limit", "strategy", "replicas", "final_metrics")},
        "config": cfg.to_dict(),
        "evaluation_seconds": round(time.perf_counter() - started, 1),
        "metrics": summary["metrics"],
        "wins": summary["wins"],
        "nps_mean_freq_distance_to_reference": summary["nps_mean_freq_distance_to_reference"],
        "reference": summary["reference"],
        "targets": targets(summary, model_name),
        "report": str(report_dir / "report.md"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(evaluate.jsonable(result), indent=1) + "\n")
    print(json.dumps({"metrics_mean": {n: {m: round(v["mean"], 4) for m, v in f.items() if v["mean"] is not None}
                                       for n, f in summary["metrics"].items()},
                      "targets": {k: v["met"] for k, v in result["targets"].items()}}, indent=1))
    print(f"Wrote {args.out} and {report_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
