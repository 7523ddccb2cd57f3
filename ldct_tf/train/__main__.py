"""``python -m ldct_tf.train``: parse the command line, train with :func:`ldct_tf.train.run`, report errors as one
line (see :mod:`ldct_tf.train` for what a run does and writes)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ldct_tf import cli
from ldct_tf.train import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.train",
                                     description="Train the CycleGAN on the pipeline's shards under tf.distribute.")
    cli.add_config_arguments(parser, "YAML config (configs/smoke.yaml, cpu_small.yaml, paper.yaml)", "train.steps=100")
    cli.add_run_arguments(parser)
    parser.add_argument("--model-dir", required=True, help="checkpoints, logs and the trained generator go here")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    return parser


def _train(args: argparse.Namespace) -> dict:
    cfg = cli.load_config(args)
    return run(cfg, args.data, args.model_dir, resume=not args.no_resume, cpu_replicas=args.cpu_replicas,
               verbose=cli.progress_level(args))


def train(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` and train; returns the training summary.  Errors propagate (tests and notebooks see them)."""
    return _train(build_parser().parse_args(argv))


def _work(args: argparse.Namespace) -> None:
    _train(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _work, argv)


if __name__ == "__main__":
    sys.exit(main())
