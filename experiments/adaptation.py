"""Does adversarial adaptation on the real streams add to the physics prior?  ``python -m experiments.adaptation``

    python -m experiments.adaptation --work DIR [--cpu-minutes 36] [--only ARMS] [--ship saved_models/ldct_denoiser/2]

Run after ``experiments.ablation`` on the same ``--work`` folder: it reads the recipe W that the ablation chose on
validation (``benchmarks/results/ablation.json``) and continues W's own run for HALF a budget in the three ways of
``configs/experiments/adaptation.yaml``, each with the same CPU time and a fresh optimizer, warm-started from W's
generator (``train.init_from``):

- ``continued``: W's config unchanged (simulated pairs only): the control, what more training alone gives;
- ``adapted_light`` and ``adapted``: W's simulated term plus a light LSGAN adversarial term (``ADVERSARIAL``) on the
  real low-dose stream against the real normal-dose stream, with the streams kernel-matched (``data.kernel_matched``)
  and no cycle or identity term.  Why this shape: in the ablation both hybrids (cycle, identity and adversarial terms)
  pulled the denoiser back towards its input, and their critic compared denoised B30f and D45f low-dose slices with
  D45f normal-dose ones, so it could learn the kernel instead of the noise.

It then scores W and the three continuations beside BM3D, NLM and the input on the validation slices and the test
patient (``experiments.arms.score``) and applies the ablation's rule
(``ldct_tf.evaluate.selection.choose_recipe``) to VALIDATION only.  Writes
``benchmarks/results/adaptation.json``; ``--ship`` exports the chosen generator there unless W itself is chosen (the
ablation's ``--ship`` already did).  ``--only`` trains some continuations and stops, for parallel processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import harness
from experiments import ablation
from experiments import arms as arms_lib
from experiments.arms import RESULTS, ExperimentError, arm_record, train_recipe
from ldct_tf.evaluate import selection

PLAN = arms_lib.load_arms("adaptation", ("control", "adversarial", "adapted_overrides"))
#: LSGAN adversarial weights of the adapted continuations (configs/experiments/adaptation.yaml says why these).
ADVERSARIAL: dict = {name: float(weight) for name, weight in PLAN["adversarial"].items()}
CONTROL: str = PLAN["control"]
CONTINUATIONS = (CONTROL, *ADVERSARIAL)
KEYS = ("psnr_abdomen", "ssim_abdomen", "edge_sharpness", "noise_sd_hu")


def continuation_overrides(name: str, base_run: Path) -> list[str]:
    """Config overrides of one continuation of the run in ``base_run``."""
    overrides = [f"train.init_from={base_run}"]
    if name in ADVERSARIAL:
        overrides += [f"loss.adversarial={ADVERSARIAL[name]}", *PLAN["adapted_overrides"]]
    return overrides


def arm_name(chosen: str, name: str) -> str:
    return f"{chosen}+{name}"


def train_continuations(chosen: str, shards: Path, work: Path, cpu_minutes: float,
                        only: Sequence[str] = CONTINUATIONS) -> dict:
    """Train the continuations in ``only`` (those done are kept); returns every finished one's record."""
    base = work / chosen
    data = ablation.arm_shards(chosen, shards, work)
    for name in only:
        model_dir = work / arm_name(chosen, name)
        if arm_record(model_dir):
            continue
        stage = train_recipe(base / "config.yaml", data, model_dir, cpu_minutes / 2,
                             continuation_overrides(name, base))
        (model_dir / "arm_done.json").write_text(json.dumps({"stages": [stage]}))
    out = {}
    for name in CONTINUATIONS:
        done = arm_record(work / arm_name(chosen, name))
        if done:
            stage = done["stages"][-1]
            out[name] = {"cpu_seconds": round(stage["cpu_seconds"], 1), "steps": stage["steps"],
                         "overrides": continuation_overrides(name, Path(chosen)),
                         "final_train_losses": stage["final_metrics"].get("train")}
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.adaptation", description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="the experiments.ablation --work folder")
    parser.add_argument("--cpu-minutes", type=float, default=36.0,
                        help="the ablation's per-recipe budget; each continuation gets half of it")
    parser.add_argument("--ablation", default=str(RESULTS / "ablation.json"))
    parser.add_argument("--only", help="comma-separated continuations to train, then stop without scoring")
    parser.add_argument("--ship", help="export the chosen generator here when it is not the ablation's own choice")
    parser.add_argument("--out", default=str(RESULTS / "adaptation.json"))
    return parser


def ablation_choice(results: Path, work: Path) -> str:
    """The recipe the ablation chose (its results file), checked to be trained in ``work``."""
    try:
        chosen = json.loads(results.read_text())["choice"]["chosen"]
    except (OSError, ValueError, KeyError) as exc:
        raise ExperimentError(f"{results}: no ablation choice to continue ({exc})") from exc
    if not (work / chosen / "generator.keras").exists() or not (work / "shards" / "manifest.json").exists():
        raise ExperimentError(f"{work}: not the ablation's work folder (no {chosen}/generator.keras or shards/)")
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    only = args.only.split(",") if args.only else list(CONTINUATIONS)
    if set(only) - set(CONTINUATIONS):
        print(f"experiments.adaptation: error: --only: unknown {sorted(set(only) - set(CONTINUATIONS))}; known: "
              f"{list(CONTINUATIONS)}", file=sys.stderr)
        return 2
    root, work = harness.data_root(), Path(args.work)
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"SKIPPED: no Mayo pairs under {root} (set LDCT_DATA_DIR to the shared data folder)")
        return 0
    try:
        chosen = ablation_choice(Path(args.ablation), work)
    except ExperimentError as exc:
        print(f"experiments.adaptation: error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    training = train_continuations(chosen, work / "shards", work, args.cpu_minutes, only)
    if args.only:
        print(f"Trained {only} in {work}; run again without --only to score and choose")
        return 0
    arms = [chosen, *(arm_name(chosen, n) for n in CONTINUATIONS)]
    scored = arms_lib.score(arms, ablation.BASELINES, root, work)
    choice = selection.choose_recipe(scored["val"], arms)
    result = {"benchmark": "adaptation", "base_recipe": chosen, "cpu_minutes_per_continuation": args.cpu_minutes / 2,
              "training": training,
              "validation_change_vs_continued": change_vs_control(scored, chosen, "val"),
              "test_change_vs_continued": change_vs_control(scored, chosen, "test"),
              "validation": scored["val"], "test": scored["test"], "choice": choice,
              "test_targets_of_chosen": selection.targets_on_test(scored["test"], choice["chosen"]),
              "seconds": round(time.perf_counter() - started, 1)}
    if args.ship and choice["chosen"] != chosen:
        arms_lib.ship(work / choice["chosen"], Path(args.ship), {
            "recipe": choice["chosen"], "choice": choice, "training": training,
            "benchmark": "python -m experiments.ablation, then python -m experiments.adaptation"})
        result["shipped"] = args.ship
    harness.write_result(result, Path(args.out), indent=1)
    print(json.dumps({"choice": choice, "test_targets": result["test_targets_of_chosen"]}, indent=1, default=str))
    print(f"Wrote {args.out}")
    return 0


def change_vs_control(scored: dict, chosen: str, split: str) -> dict:
    """Each adapted continuation's mean figures minus the control continuation's, on ``split``."""
    mean = scored[split]["all"]["mean"]
    control = mean[arm_name(chosen, CONTROL)]
    return {n: {k: mean[arm_name(chosen, n)][k] - control[k] for k in KEYS} for n in ADVERSARIAL}


if __name__ == "__main__":
    sys.exit(main())
