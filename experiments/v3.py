"""``python -m experiments.v3 STEP --work DIR``: how the v3 denoiser was made, validated, shipped and tested.

    python -m experiments.v3 all --work /tmp/v3          # every step below, in order (CPU budget: see the README)
    python -m experiments.v3 simulate --work /tmp/v3     # simulated pairs from every training source (v3_data)
    python -m experiments.v3 train --work /tmp/v3 --seed 0   # one seed (run 0, 1, 2)
    python -m experiments.v3 bm3d --work /tmp/v3         # BM3D's noise factor tuned per dose on L143 (no model)
    python -m experiments.v3 validate --work /tmp/v3     # L143 (held out): seeds, BM3D tuned per dose; picks the seed
    python -m experiments.v3 ship --work /tmp/v3         # exports the picked seed as saved_models/ldct_denoiser/3
    python -m experiments.v3 test --work /tmp/v3         # L286, read once: v3 seeds vs BM3D (dev-tuned) vs v2
    python -m experiments.v3 report --work /tmp/v3       # cost JSON and the markdown tables of the results files

Nothing is chosen on L286: ``test`` only reads what ``validate`` decided (``work/validation.json``) and reports.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from experiments import v3_data, v3_steps


def _simulate(args) -> None:
    v3_steps.simulate(Path(args.work), args.realisations, args.processes)


def _train(args) -> None:
    v3_steps.train(Path(args.work), args.seed, args.steps, args.threads, args.train_target, args.init,
                   args.learning_rate, args.noise_rescale, args.name,
                   args.coarse_noise)


def _bm3d(args) -> None:
    v3_steps.bm3d_tuning(Path(args.work))


def _validate(args) -> None:
    v3_steps.validate(Path(args.work), args.version)


def _ship(args) -> None:
    v3_steps.ship(Path(args.work), Path(args.target or _default_target(args.version)), args.version)


def _test(args) -> None:
    v3_steps.test(Path(args.work), args.version)


def _report(args) -> None:
    v3_steps.cost(Path(args.work), args.version)
    v3_steps.report(args.version)


def _all(args) -> None:
    work = Path(args.work)
    v3_steps.simulate(work, args.realisations, args.processes)
    for seed in range(args.seeds):
        v3_steps.train(work, seed, args.steps)
    for seed in range(args.seeds):  # the second recipe: continued on the normal-dose target (v3_data.TARGETS)
        v3_steps.train(work, seed, v3_steps.FINETUNE_STEPS, target="original", init=f"seed{seed}",
                       learning_rate=v3_steps.FINETUNE_LEARNING_RATE)
    v3_steps.bm3d_tuning(work)
    v3_steps.validate(work)
    v3_steps.ship(work, Path(args.target or _default_target(3)))
    v3_steps.test(work)
    v3_steps.cost(work)
    v3_steps.report()


def _default_target(version: int) -> Path:
    return v3_data.REPO / "saved_models" / "ldct_denoiser" / str(version)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.v3", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name, fn in (("simulate", _simulate), ("train", _train), ("bm3d", _bm3d), ("validate", _validate), ("ship", _ship),
                     ("test", _test), ("report", _report), ("all", _all)):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True, help="working folder (created; holds pairs, seeds, results)")
        p.add_argument("--realisations", type=int, default=6, help="simulated pairs per source slice")
        p.add_argument("--processes", type=int, default=2)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--seeds", type=int, default=3)
        p.add_argument("--threads", type=int, default=0, help="TF threads per training process (0: TF's default)")
        p.add_argument("--train-target", dest="train_target", default="projected", choices=v3_data.TARGETS,
                       help="what the denoiser is trained to output (v3_data.TARGETS)")
        p.add_argument("--init", help="continue from this run folder's weights (e.g. seed0)")
        p.add_argument("--noise-rescale", dest="noise_rescale", type=float, default=0.0,
                       help="probability that a patch's inserted noise is scaled down (a higher dose; v3_steps)")
        p.add_argument("--coarse-noise", dest="coarse_noise", action="store_true",
                       help="the network also sees the coarse (2x2-averaged) noise level (ldct_tf.noise)")
        p.add_argument("--name", help="run folder name (default: seedN, or TARGET_from_INIT)")
        p.add_argument("--learning-rate", type=float, default=v3_steps.LEARNING_RATE)
        p.add_argument("--steps", type=int, default=v3_steps.STEPS)
        p.add_argument("--target", help="SavedModel version folder to ship to (default: saved_models/ldct_denoiser/VERSION)")
        p.add_argument("--version", type=int, default=3,
                       help="model version: names the results files (vN_validation.json, ...) and the shipped folder")
        p.set_defaults(fn=fn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (OSError, ValueError) as exc:  # a missing work folder, run or results file: one line, not a traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
