"""Does adversarial adaptation on the real streams add to the physics prior?  ``python -m benchmarks.adaptation``

    python -m benchmarks.adaptation --work DIR [--cpu-minutes 36] [--only ARMS] [--ship saved_models/ldct_denoiser/2]

Run after ``benchmarks.ablation`` on the same ``--work`` folder: it reads the recipe W that the ablation chose on
validation (``benchmarks/results/ablation.json``) and continues W's own run for HALF a budget in three ways, each with
the same CPU time and a fresh optimizer, warm-started from W's generator (``train.init_from``):

- ``continued``: W's config unchanged (simulated pairs only): the control, what more training alone gives;
- ``adapted_light`` and ``adapted``: W's simulated term plus a light LSGAN adversarial term (``ADVERSARIAL``) on the
  real low-dose stream against the real normal-dose stream, with the streams kernel-matched (``data.kernel_matched``)
  and no cycle or identity term.  Why this shape: in the ablation both hybrids (cycle, identity and adversarial terms)
  pulled the denoiser back towards its input, and their critic compared denoised B30f and D45f low-dose slices with
  D45f normal-dose ones, so it could learn the kernel instead of the noise.

It then scores W and the three continuations beside BM3D, NLM and the input on the validation slices and the test
patient (``ablation.score``) and applies the ablation's rule (``ablation.choose``) to VALIDATION only.  Writes
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

from benchmarks import ablation, mayo_data

#: LSGAN adversarial weights of the adapted continuations; W's simulated loss is about 3e-4 at the end of its run and
#: the generator's LSGAN loss about 0.5, so these make the adversarial term roughly 0.5x and 5x the simulated one.
ADVERSARIAL = {"adapted_light": 3e-4, "adapted": 3e-3}
CONTINUATIONS = ("continued", *ADVERSARIAL)


def continuation_overrides(name: str, base_run: Path) -> list[str]:
    """Config overrides of one continuation of the run in ``base_run``."""
    overrides = [f"train.init_from={base_run}"]
    if name in ADVERSARIAL:
        overrides += [f"loss.adversarial={ADVERSARIAL[name]}", "loss.cycle=0", "loss.identity=0", "loss.perceptual=0",
                      "data.kernel_matched=true", "train.discriminator_lr=2e-4"]
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
        if ablation.arm_record(model_dir):
            continue
        stage = ablation.train_recipe(base / "config.yaml", data, model_dir, cpu_minutes / 2,
                                continuation_overrides(name, base))
        (model_dir / "arm_done.json").write_text(json.dumps({"stages": [stage]}))
    out = {}
    for name in CONTINUATIONS:
        done = ablation.arm_record(work / arm_name(chosen, name))
        if done:
            stage = done["stages"][-1]
            out[name] = {"cpu_seconds": round(stage["cpu_seconds"], 1), "steps": stage["steps"],
                         "overrides": continuation_overrides(name, Path(chosen)),
                         "final_train_losses": stage["final_metrics"].get("train")}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptation", description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="the benchmarks.ablation --work folder")
    parser.add_argument("--cpu-minutes", type=float, default=36.0,
                        help="the ablation's per-recipe budget; each continuation gets half of it")
    parser.add_argument("--ablation", default=str(ablation.RESULTS / "ablation.json"))
    parser.add_argument("--only", help="comma-separated continuations to train, then stop without scoring")
    parser.add_argument("--ship", help="export the chosen generator here when it is not the ablation's own choice")
    parser.add_argument("--out", default=str(ablation.RESULTS / "adaptation.json"))
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else list(CONTINUATIONS)
    if set(only) - set(CONTINUATIONS):
        print(f"error: --only: unknown {sorted(set(only) - set(CONTINUATIONS))}; known: {list(CONTINUATIONS)}",
              file=sys.stderr)
        return 2
    root = mayo_data.data_root()
    work = Path(args.work)
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"SKIPPED: no Mayo pairs under {root} (set LDCT_DATA_DIR to the shared data folder)")
        return 0
    try:
        chosen = json.loads(Path(args.ablation).read_text())["choice"]["chosen"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.ablation}: no ablation choice to continue ({exc})", file=sys.stderr)
        return 2
    if not (work / chosen / "generator.keras").exists() or not (work / "shards" / "manifest.json").exists():
        print(f"error: {work}: not the ablation's work folder (no {chosen}/generator.keras or shards/)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    training = train_continuations(chosen, work / "shards", work, args.cpu_minutes, only)
    if args.only:
        print(f"Trained {only} in {work}; run again without --only to score and choose")
        return 0
    arms = [chosen, *(arm_name(chosen, n) for n in CONTINUATIONS)]
    scored = ablation.score(arms, root, work)
    choice = ablation.choose(scored["val"], arms)
    keys = ("psnr_abdomen", "ssim_abdomen", "edge_sharpness", "noise_sd_hu")

    def change_vs_continued(split: str) -> dict:
        mean, control = scored[split]["all"]["mean"], scored[split]["all"]["mean"][arm_name(chosen, "continued")]
        return {n: {k: mean[arm_name(chosen, n)][k] - control[k] for k in keys} for n in ADVERSARIAL}

    result = {"benchmark": "adaptation", "base_recipe": chosen, "cpu_minutes_per_continuation": args.cpu_minutes / 2,
              "training": training,
              "validation_change_vs_continued": change_vs_continued("val"),
              "test_change_vs_continued": change_vs_continued("test"),
              "validation": scored["val"], "test": scored["test"], "choice": choice,
              "test_targets_of_chosen": ablation.test_targets(scored["test"], choice["chosen"]),
              "seconds": round(time.perf_counter() - started, 1)}
    if args.ship and choice["chosen"] != chosen:
        ablation.ship(work / choice["chosen"], Path(args.ship), {
            "recipe": choice["chosen"], "choice": choice, "training": training,
            "benchmark": "python -m benchmarks.ablation, then python -m benchmarks.adaptation"})
        result["shipped"] = args.ship
    from ldct_tf.evaluate.report import jsonable

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(jsonable(result), indent=1) + "\n")
    print(json.dumps({"choice": choice, "test_targets": result["test_targets_of_chosen"]}, indent=1, default=str))
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
