"""Ablation of the physics noise prior, and the choice of model v2: ``python -m experiments.ablation``.

    python -m experiments.ablation [--cpu-minutes 40] [--work DIR] [--ship saved_models/ldct_denoiser/2]

On the development split of ``benchmarks.harness`` (real low stream L143, normal stream and simulation source L096,
each patient on one side only; validation = unseen slices of those two; test = L286), in one run:

1. calibrates the simulator from the unpaired train split (``ldct_tf.simulate.calibration``), writes
   ``configs/calibration_aapm_mayo.json``, and checks it against the pair-based ``simulate.compare_with_real`` on the
   training-side pairs (L096, L143; their pairs are used only for this check, never for training);
2. writes the simulated-pair stream (``ldct_tf.pipeline.simulate_pairs``: noise inserted into the normal-dose slices
   themselves, half the realisations with the fitted texture and half with the other calibrated FBP filters) and
   records its cost per slice;
3. trains the recipes of ``configs/experiments/ablation.yaml`` with EQUAL CPU budgets (process CPU time, so that
   other work on the machine does not tilt it): ``cyclegan_v1_recipe`` (configs/pretrained.yaml, the critics now
   really without normalisation), ``simulated_only`` (configs/v2_simulated.yaml on the default stream),
   ``simulated_projected`` (the same on the first stream design), single-stage arms (a loss, a stream or the target
   changed, one at a time; Noisier2Noise targets are ``loss.noisier2noise_i0``), and two hybrids warm-started from
   ``simulated_only`` at half its budget, then half a budget of CycleGAN + simulated term: ``hybrid``
   (configs/v2_hybrid.yaml) and ``hybrid_light`` (configs/v2_hybrid_light.yaml, unpaired terms 5-10x lighter);
4. exports each as a SavedModel and scores it beside BM3D, NLM and the input on the validation slices (per kernel)
   and on the test patient;
5. chooses the recipe on VALIDATION only with ``ldct_tf.evaluate.selection.choose_recipe`` (then, in
   ``experiments.blend_choice``, the share of the input its export mixes back, by the same rule): among the recipes
   that beat BM3D in mean validation abdomen PSNR and SSIM, the one with the highest validation edge sharpness (the
   highest validation PSNR if none beats BM3D).  The test figures are reported, never used to choose.

Writes ``benchmarks/results/ablation.json`` (where the shipped model's card points); ``--ship`` exports the chosen
recipe's generator there (model v2).
Finished stages are kept in ``--work`` and not redone, so an interrupted run continues; ``--only`` trains some arms
and stops, so that arms can train in parallel processes (the hybrids need ``simulated_only``'s first half).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import harness
from experiments import arms as arms_lib
from experiments import blend_choice
from experiments.arms import CALIBRATION_FILE, CONFIGS, RESULTS, ExperimentError, arm_record, train_recipe
from ldct_tf.evaluate import selection

PLAN = arms_lib.load_arms("ablation", ("baselines", "streams", "arms"))
#: name -> its entry of configs/experiments/ablation.yaml (config, stream, overrides, schedule, from), in order.
ARM_SPECS: dict = PLAN["arms"]
ARMS = tuple(ARM_SPECS)
STREAMS: dict = PLAN["streams"]
BASELINES = tuple(PLAN["baselines"])
SCHEDULES = ("whole", "halves", "warm_half")


def stream(shards: Path, work: Path, name: str) -> Path:
    """A copy of the low and normal shards with the simulated stream ``STREAMS[name]``, made once."""
    from ldct_tf import data as data_lib
    from ldct_tf.pipeline import simulate_pairs
    from ldct_tf.simulate import __main__ as simulate_cli

    spec = STREAMS[name]
    out = work / spec["folder"]
    if (out / "manifest.json").exists() and data_lib.simulated_pair_count(data_lib.read_manifest(str(out))):
        return out
    if out.exists():
        shutil.rmtree(out)  # this experiment's own unfinished copy
    shutil.copytree(shards, out, ignore=shutil.ignore_patterns(f"{simulate_pairs.SIMULATED}-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop(simulate_pairs.SIMULATED, None)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    realisations = data_lib.read_manifest(str(shards))[simulate_pairs.SIMULATED]["train"]["realisations"]
    simulate_cli.pairs(["--data", str(out), "--calibration", str(CALIBRATION_FILE), "--realisations",
                        str(realisations), "--reference", spec["reference"], "--textures", spec["textures"]])
    return out


def arm_shards(arm: str, shards: Path, work: Path) -> Path:
    """The shard folder (with its simulated stream) that ``arm`` trained on."""
    name = ARM_SPECS.get(arm, {}).get("stream")
    return stream(shards, work, name) if name else shards


def arm_overrides(arm: str) -> list[str]:
    """The arm's config overrides, ``{normal_i0}`` and ``{fit_i0}`` filled from the calibration this run uses."""
    overrides = ARM_SPECS[arm].get("overrides", [])
    if not any("{" in o for o in overrides):
        return list(overrides)
    from ldct_tf.simulate import calibration as calibration_lib

    calibration = calibration_lib.load(CALIBRATION_FILE)
    values = {"normal_i0": calibration_lib.normal_dose_i0(calibration),
              "fit_i0": calibration_lib.simulation_parameters(calibration)["i0"]}
    return [o.format(**values) for o in overrides]


def _train_halves(arm: str, shards: Path, work: Path, cpu_minutes: float) -> list[dict]:
    """Two halves in one run folder, keeping the first half's generator (``ARM_half``) for the warm starts."""
    config, data = CONFIGS / ARM_SPECS[arm]["config"], arm_shards(arm, shards, work)
    run, half = work / arm, work / f"{arm}_half"
    first = (json.loads((half / "training_summary.json").read_text()) if (half / "generator.keras").exists()
             else train_recipe(config, data, run, cpu_minutes / 2, arm_overrides(arm)))
    if not (half / "generator.keras").exists():
        half.mkdir(parents=True, exist_ok=True)
        for name in ("generator.keras", "config.yaml", "training_summary.json"):
            shutil.copy(run / name, half / name)
    return [first, train_recipe(config, data, run, cpu_minutes / 2, arm_overrides(arm))]


def train_arm(arm: str, shards: Path, work: Path, cpu_minutes: float) -> None:
    """Train one recipe at the CPU budget by its schedule unless it is done (its ``arm_done.json`` exists)."""
    spec, model_dir = ARM_SPECS[arm], work / arm
    if arm_record(model_dir):
        return
    schedule = spec.get("schedule", "whole")
    if schedule == "halves":
        stages = _train_halves(arm, shards, work, cpu_minutes)
    elif schedule == "warm_half":
        half = work / f"{spec['from']}_half"
        if not (half / "generator.keras").exists():
            train_arm(spec["from"], shards, work, cpu_minutes)
        first = json.loads((half / "training_summary.json").read_text())
        stages = [first, train_recipe(CONFIGS / spec["config"], arm_shards(arm, shards, work), model_dir,
                                      cpu_minutes / 2, [*arm_overrides(arm), f"train.init_from={half}"])]
    else:
        stages = [train_recipe(CONFIGS / spec["config"], arm_shards(arm, shards, work), model_dir, cpu_minutes,
                               arm_overrides(arm))]
    (model_dir / "arm_done.json").write_text(json.dumps({"stages": stages}))


def train_arms(shards: Path, work: Path, cpu_minutes: float, only: Sequence[str] = ARMS) -> dict:
    """The recipes at equal CPU budgets (``only`` of them; the rest must be done); returns each arm's record."""
    for arm in only:
        train_arm(arm, shards, work, cpu_minutes)
    out = {}
    for arm in ARMS:
        done = arm_record(work / arm)
        if done is None:
            continue
        stages = done["stages"]
        out[arm] = {"cpu_seconds": round(sum(s["cpu_seconds"] for s in stages), 1),
                    "wall_seconds": round(sum(s["seconds"] for s in stages), 1),
                    "steps_per_stage": [s["steps"] - s["resumed_from_step"] for s in stages],
                    "final_validation": stages[-1]["final_metrics"].get("validation")}
    return out


def calibration_check(root: Path, calibration: dict) -> dict:
    """Pair-based check of the unpaired calibration: simulated vs real ADDED noise on each training-side pair of a
    calibrated kernel (``simulate.compare_with_real``)."""
    import numpy as np

    from ldct_tf import evaluate, simulate
    from ldct_tf.simulate import calibration as calibration_lib

    rows = []
    for row in harness.pair_rows(root):
        if row["patient"] == harness.TEST_PATIENT or row["kernel"] not in calibration["kernels"]:
            continue
        pair = evaluate.load_pair(root / "mayo_pairs" / row["quarter_dose"], root / "mayo_pairs" / row["full_dose"])
        params = calibration_lib.simulation_parameters(calibration, row["kernel"])
        params.pop("i0_range")
        check = simulate.compare_with_real(pair.normal, pair.low, pixel_spacing_mm=pair.pixel_spacing_mm, **params)
        rows.append({"patient": row["patient"], "kernel": row["kernel"], "sd_ratio": check["sd_ratio"],
                     "nps_mean_freq_sim": check["nps_mean_freq_sim"],
                     "nps_mean_freq_real": check["nps_mean_freq_real"]})
    ratios = np.array([r["sd_ratio"] for r in rows])
    return {"pairs": rows, "sd_ratio_median": float(np.median(ratios)),
            "sd_ratio_range": [float(ratios.min()), float(ratios.max())],
            "median_abs_log_sd_error": float(np.median(np.abs(np.log(ratios))))}


def check_arms() -> None:
    """Every arm names a config that exists, a known stream and schedule, and a ``from`` arm listed before it."""
    for arm, spec in ARM_SPECS.items():
        where = f"{arms_lib.ARMS_DIR / 'ablation.yaml'}: arm {arm!r}"
        if not (CONFIGS / str(spec.get("config"))).is_file():
            raise ExperimentError(f"{where}: config {spec.get('config')!r} not found under {CONFIGS}")
        if spec.get("stream") is not None and spec["stream"] not in STREAMS:
            raise ExperimentError(f"{where}: unknown stream {spec['stream']!r}; known: {list(STREAMS)}")
        if spec.get("schedule", "whole") not in SCHEDULES:
            raise ExperimentError(f"{where}: unknown schedule {spec['schedule']!r}; known: {list(SCHEDULES)}")
        if spec.get("schedule") == "warm_half" and ARM_SPECS.get(spec.get("from"), {}).get("schedule") != "halves":
            raise ExperimentError(f"{where}: warm_half needs `from`, an arm with schedule halves")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-minutes", type=float, default=40.0, help="CPU budget per recipe (process CPU time)")
    parser.add_argument("--work", default="/tmp/ldct_ablation", help="stages are kept here and not redone")
    parser.add_argument("--realisations", type=int, default=8)
    parser.add_argument("--ship", help="export the chosen recipe here (e.g. saved_models/ldct_denoiser/2)")
    parser.add_argument("--out", default=str(RESULTS / "ablation.json"))
    parser.add_argument("--only", help="comma-separated arms to train, then stop without scoring: several such runs "
                                       "on one --work folder train arms in parallel (one core each); a final run "
                                       "without --only scores them all")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    only = args.only.split(",") if args.only else list(ARMS)
    unknown = sorted(set(only) - set(ARMS))
    if unknown:
        print(f"experiments.ablation: error: --only: unknown arms {unknown}; known: {list(ARMS)}", file=sys.stderr)
        return 2
    root = harness.data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"SKIPPED: no Mayo pairs under {root} (set LDCT_DATA_DIR to the shared data folder)")
        return 0
    try:
        check_arms()
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        shards, calibration, manifest = prepare_data(root, work, args.realisations)
        training = train_arms(shards, work, args.cpu_minutes, only)
    except (ExperimentError, harness.BenchmarkError) as exc:
        print(f"experiments.ablation: error: {exc}", file=sys.stderr)
        return 1
    if args.only:
        print(f"Trained {only} in {work}; run again without --only to score and choose")
        return 0
    scored = arms_lib.score(ARMS, BASELINES, root, work)
    choice = selection.choose_recipe(scored["val"], ARMS)
    blend = blend_choice.run(choice["chosen"], root, work, scored)
    result = build_result(args, root, work, calibration, manifest, training, scored, choice, blend)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.ship:
        arms_lib.ship(work / choice["chosen"], Path(args.ship), {
            "recipe": choice["chosen"], "choice": choice, "calibration": result["calibration"], "data": result["data"],
            "training": training[choice["chosen"]], "benchmark": "python -m experiments.ablation",
            "input_blend_choice": blend["choice"]}, input_blend=blend["choice"]["input_blend"])
        result["shipped"] = args.ship
    harness.write_result(result, Path(args.out), indent=1)
    print(json.dumps({"choice": choice, "input_blend": blend["choice"]["input_blend"],
                      "test_targets": blend["test_targets"]}, indent=1, default=str))
    print(f"Wrote {args.out}")
    return 0


def prepare_data(root: Path, work: Path, realisations: int) -> tuple[Path, dict, dict]:
    """Shards of the development split, the unpaired calibration (made once) and the default simulated stream;
    returns (the shard folder, the calibration, the shards' manifest)."""
    from ldct_tf import data as data_lib
    from ldct_tf.pipeline import simulate_pairs
    from ldct_tf.simulate import __main__ as simulate_cli
    from ldct_tf.simulate import calibration as calibration_lib

    shards = work / "shards" if (work / "shards" / "manifest.json").exists() else harness.make_shards(root, work)
    if not CALIBRATION_FILE.exists():
        calibration_lib.save({**calibration_lib.calibrate_shards(str(shards), "train", max_slices=7),
                              "provenance": "python -m experiments.ablation: L143 quarter dose (low) vs L096 full "
                                            "dose (normal), train split of benchmarks.harness"}, CALIBRATION_FILE)
    if not data_lib.simulated_pair_count(data_lib.read_manifest(str(shards))):
        simulate_cli.pairs(["--data", str(shards), "--calibration", str(CALIBRATION_FILE),
                            "--realisations", str(realisations)])
    return shards, calibration_lib.load(CALIBRATION_FILE), data_lib.read_manifest(str(shards))


def build_result(args: argparse.Namespace, root: Path, work: Path, calibration: dict, manifest: dict, training: dict,
                 scored: dict, choice: dict, blend: dict) -> dict:
    """The results file: data, calibration and its pair check, simulation cost, training, scores, the choices."""
    from ldct_tf import data as data_lib

    return {
        "benchmark": "ablation", "machine": harness.machine_info(), "versions": harness.versions(),
        "data": {"low_stream": f"{harness.LOW_PATIENT} quarter dose", "normal_stream_and_simulation_source":
                 f"{harness.NORMAL_PATIENT} full dose", "each_patient_on_one_side_only": True,
                 "validation": "L096 slices 07-09 (D45f) and L143 slices 22-24 (B30f), both doses, never trained on",
                 "test": f"{harness.TEST_PATIENT} (4 D45f pairs)", "pairs_used_as_pairs_in_training": 0,
                 "counts": manifest["counts"]},
        "calibration": {k: {key: v[key] for key in ("i0", "i0_range", "filter_name", "dose_fraction")}
                        for k, v in calibration["kernels"].items()},
        "calibration_not_done": calibration.get("not_calibrated"),
        "calibration_check_against_pairs": calibration_check(root, calibration),
        "simulation_cost": manifest["simulated"]["train"],
        "simulation_cost_other_streams": {
            n: data_lib.read_manifest(str(work / s["folder"]))["simulated"]["train"]
            for n, s in STREAMS.items() if (work / s["folder"] / "manifest.json").exists()},
        "cpu_minutes_per_recipe": args.cpu_minutes,
        "training": training,
        "validation": scored["val"], "test": scored["test"],
        "choice": choice,
        "test_targets_of_chosen": selection.targets_on_test(scored["test"], choice["chosen"]),
        "input_blend": blend,
    }


if __name__ == "__main__":
    sys.exit(main())
