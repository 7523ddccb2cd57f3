"""``python -m ldct_tf.denoise INPUT OUTPUT [--model PATH | --server URL]``: parse the command line, denoise with
:func:`ldct_tf.denoise.denoise`, report errors as one line (see :mod:`ldct_tf.denoise` for what is written where)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from ldct_tf import cli
from ldct_tf import denoise
from ldct_tf.dicom import ai_marking
from ldct_tf.denoise import DEFAULT_BATCH_SIZE, DEFAULT_SERVER_MODEL, DenoiseError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ldct_tf.denoise",
        description="Denoise low-dose CT: each CT series under INPUT becomes a derived DICOM series under OUTPUT.")
    parser.add_argument("input", help="a CT DICOM file, a series folder, or a folder of studies")
    parser.add_argument("output", help="output folder (created; must not be inside INPUT)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"SavedModel folder (newest version) or one version's folder "
                                        f"(default: {denoise.DEFAULT_MODEL})")
    source.add_argument("--server", help="TF Serving URL instead of a local model: http://host:8501 (REST) or "
                                         "host:8500 / grpc://host:8500 (gRPC)")
    parser.add_argument("--server-model", default=DEFAULT_SERVER_MODEL, help="model name on the server "
                                                                           "(default %(default)s)")
    parser.add_argument("--server-version", type=int, help="model version on the server (default: its newest)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per server request (default 60)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="slices per model call (default %(default)s)")
    parser.add_argument("--strength", type=float,
                        help="denoising strength in [0, 1]: 0 returns the input, 1 the full network output "
                             "(default: the model's default_strength, recorded in each derived file)")
    parser.add_argument("--overwrite", action="store_true", help="replace files left in OUTPUT by an earlier run")
    parser.add_argument("--force", action="store_true",
                        help="denoise series that fail an input check (look normal-dose, show a head or another "
                             "kernel, or are smaller than the model's minimum); default: skip them with one line each")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-audit", action="store_true",
                        help="skip the per-slice change audit (default: SERIES/audit/audit.json and a PNG per "
                             "flagged slice)")
    parser.add_argument("--audit-config", help="audit thresholds (default configs/audit.yaml)")
    parser.add_argument("--deidentify", action="store_true",
                        help="write the derived series under the DICOM PS3.15 Basic Application Level "
                             "Confidentiality Profile (pseudonyms, new UIDs, anonymous file names)")
    parser.add_argument("--max-pixels", type=int, default=denoise.MAX_PIXELS,
                        help="refuse slices of more pixels than this (rows x columns; default %(default)s, 4096x4096)")
    parser.add_argument("--pseudonym-salt", default=os.environ.get("LDCT_PSEUDONYM_SALT"),
                        help="key for --deidentify's pseudonyms (default $LDCT_PSEUDONYM_SALT, else random per run: "
                             "the same salt gives the same pseudonym for the same patient across runs)")
    return parser


def _denoise(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.batch_size < 1:
        raise DenoiseError(f"--batch-size must be >= 1, got {args.batch_size}")
    denoise.check_paths(Path(args.input), Path(args.output))  # before loading a model: fail fast on wrong paths
    if args.server:
        denoiser, model = denoise.connect_server(args.server, args.server_model, args.server_version, args.timeout,
                                                  args.batch_size, args.strength)
    else:
        denoiser, model = denoise.load_saved_model(args.model or denoise.DEFAULT_MODEL, args.batch_size,
                                                   args.strength)
    print(f"model: {model.name} version {model.version} ({model.where}), {ai_marking.strength_text(model.strength)}",
          flush=True)
    with logging_redirect_tqdm():
        summary = denoise.denoise(args.input, args.output, denoiser, model, batch_size=args.batch_size,
                                  overwrite=args.overwrite, progress=False if args.no_progress else None,
                                  audit_series=not args.no_audit, audit_config=args.audit_config,
                                  deidentify=args.deidentify, pseudonym_salt=args.pseudonym_salt,
                                  max_pixels=args.max_pixels, check_inputs=True, force=args.force)
    print(summary.line())
    for number, folder in enumerate(summary.folders, start=1):
        print(f"  wrote series {number}: {folder}")
    if summary.overview:
        print(summary.overview, end="")
    for refused in summary.refused:  # a refused series is written nowhere; the others are complete
        print(f"{build_parser().prog}: error: {refused.line()}", file=sys.stderr)
    if summary.slices == 0 and summary.input_checks and not args.force:
        raise DenoiseError("nothing denoised: every series failed an input check (above); pass --force to denoise "
                           "them anyway")
    if summary.slices == 0 and not summary.refused:
        raise DenoiseError(f"no usable CT slices found in {args.input}")
    return 1 if summary.refused else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _denoise, argv)


if __name__ == "__main__":
    sys.exit(main())
