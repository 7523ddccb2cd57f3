"""``python -m ldct_tf.tune``: parse the command line, search with :func:`ldct_tf.tune.run`, report errors as one
line (see :mod:`ldct_tf.tune` for the search space, objectives, resuming and distributed searches)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ldct_tf import cli
from ldct_tf.tune import TUNERS, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.tune",
                                     description="Keras Tuner search over the denoiser's hyperparameters "
                                                 "(configs/tuning_example.yaml: the shipped recipe).")
    cli.add_config_arguments(parser, "YAML config with an optional tuning: section (configs/tuning_example.yaml)",
                             "tuning.epochs=1")
    cli.add_run_arguments(parser)
    parser.add_argument("--dir", required=True, help="search folder: Keras Tuner state, results, best.yaml")
    parser.add_argument("--tuner", choices=TUNERS, default="random", help="search algorithm (default random)")
    parser.add_argument("--max-trials", type=int, help="trials in all, finished ones included (random, bayesian; "
                                                       "default tuning.max_trials)")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier search in --dir")
    return parser


def _tune(args: argparse.Namespace) -> dict:
    cfg = cli.load_config(args)
    return run(cfg, args.data, args.dir, algorithm=args.tuner, max_trials=args.max_trials,
               overwrite=args.overwrite, cpu_replicas=args.cpu_replicas, verbose=cli.progress_level(args))


def tune(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` and search; returns the search summary.  Errors propagate (tests see them)."""
    return _tune(build_parser().parse_args(argv))


def _work(args: argparse.Namespace) -> None:
    _tune(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _work, argv)


if __name__ == "__main__":
    sys.exit(main())
