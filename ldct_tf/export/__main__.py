"""``python -m ldct_tf.export``: parse the command line, export a training run's generator with
:func:`ldct_tf.export.export_generator`, report errors as one line (see :mod:`ldct_tf.export` for the layout written
and the signatures).

Where it writes: ``--output DIR`` when given, else ``MODEL_DIR/export/<export.name>`` (inside the run folder, which
training made).  The shipped ``saved_models/`` folder is what ``denoise``, the demo and the node load by default, so a
new version there silently replaces the shipped model: only ``--replace-default-model`` writes there, and an
``--output`` inside it without that flag is refused."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import cli
from ldct_tf import config as config_lib
from ldct_tf.export import paths as export_paths
from ldct_tf.export import (BATCHING_FILE, DEFAULT_STRENGTH, MODELS_CONFIG, export_generator, load_generator,
                            training_metadata)
from ldct_tf.models.generator import size_multiple


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.export", description="The trained generator as a "
                                     "SavedModel that TF Serving (or Python) runs on HU slices.")
    parser.add_argument("--model-dir", required=True, help="a training run folder (python -m ldct_tf.train)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", help="model folder to write versions into (default: MODEL_DIR/export/"
                        "<export.name>); a folder inside the shipped saved_models/ needs --replace-default-model")
    target.add_argument("--replace-default-model", action="store_true",
                        help="write into this checkout's saved_models/<export.name>: the new version becomes the "
                             "model that denoise, the demo and the node use by default")
    parser.add_argument("--version", type=int, help="version number (default: the next free integer)")
    parser.add_argument("--float16-weights", action="store_true",
                        help="store the weights as float16 (half the size; computed in float32)")
    parser.add_argument("--compute-dtype", default="float32",
                        help="dtype the network computes in: float32 (default) or float16 (GPUs; the output head "
                             "stays float32); bfloat16 is refused (too coarse at this model's scale)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="TF Serving's max_batch_size in the batching file; the warm-up covers every allowed "
                             "batch size (1, half, max)")
    parser.add_argument("--config", help="config YAML (default: MODEL_DIR/config.yaml)")
    parser.add_argument("--serving-base", default="/models",
                        help="where TF Serving sees the models root, written into models.config (default /models, "
                             "the Docker image's; give the absolute path for a local tensorflow_model_server)")
    parser.add_argument("--warmup-size", type=int, default=512, help="slice size of the warm-up requests (0: none)")
    parser.add_argument("--default-strength", type=float, default=DEFAULT_STRENGTH,
                        help="strength of the signatures without a strength input, in [0, 1]: 0 returns the input, "
                             "1 the network output (default 1; replaces --input-blend B, which is 1 - B)")
    cli.add_verbose_argument(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. export.name=my_model")
    return parser


def _config(args: argparse.Namespace) -> config_lib.Config:
    """``--config``, else the run's own ``config.yaml``, with the overrides; printed as resolved with ``--verbose``."""
    model_dir = Path(args.model_dir)
    config_path = args.config or (model_dir / "config.yaml" if (model_dir / "config.yaml").exists() else None)
    cfg = config_lib.load(config_path, args.overrides)
    if args.float16_weights:
        cfg.export.float16_weights = True
    cli.print_config(cfg, args)
    return cfg


def _export(args: argparse.Namespace) -> None:
    cfg = _config(args)
    model_dir = Path(args.model_dir)
    output = export_paths.output_folder(model_dir, cfg.export.name, args.output, args.replace_default_model)
    version_dir = export_generator(
        load_generator(model_dir, cfg), output, version=args.version, metadata=training_metadata(model_dir, cfg),
        float16_weights=cfg.export.float16_weights, size_multiple=size_multiple(cfg.model.depth),
        warmup_size=args.warmup_size, serving_base=args.serving_base, default_strength=args.default_strength,
        compute_dtype=args.compute_dtype, max_batch_size=args.max_batch_size)
    print(f"Exported {output.name} version {version_dir.name} to {version_dir}")
    print(f"Models config: {output.parent / MODELS_CONFIG}; batching parameters: {output.parent / BATCHING_FILE}")
    print(f"Inspect: saved_model_cli show --all --dir {version_dir}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _export, argv)


if __name__ == "__main__":
    sys.exit(main())
