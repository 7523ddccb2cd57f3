"""``python -m ldct_tf.pipeline``: parse the command line, run the DICOM -> TFRecord pipeline
(:func:`ldct_tf.pipeline.dicom_to_tfrecord.run_with_output`), print its summary; errors are one line.  Every option
the parser does not know goes to Apache Beam (see :mod:`ldct_tf.pipeline.dicom_to_tfrecord` for examples)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ldct_tf import cli
from ldct_tf.pipeline import dicom_to_tfrecord


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ldct_tf.pipeline",
        description="Convert folders of clinical CT DICOM into de-identified gzip TFRecord shards of HU slices. "
        "Unknown options go to Apache Beam (--runner, --direct_num_workers, Dataflow options, ...).",
    )
    parser.add_argument("--input", action="append", required=True,
                        help="a DICOM file, a folder (searched recursively) or a glob; local or gs://; repeatable")
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    parser.add_argument("--dose-manifest", help="CSV with header 'path,dose' (path = file, folder or "
                        "SeriesInstanceUID; dose = low|normal); relative paths are relative to the CSV")
    rules = parser.add_argument_group("dose rules on DICOM tags (used where the manifest is silent)")
    rules.add_argument("--low-dose-description", help="regex on SeriesDescription meaning low dose")
    rules.add_argument("--normal-dose-description", help="regex on SeriesDescription meaning normal dose")
    rules.add_argument("--low-dose-max-ctdivol", type=float, help="CTDIvol (mGy) at or below this: low dose")
    rules.add_argument("--normal-dose-min-ctdivol", type=float, help="CTDIvol (mGy) at or above this: normal dose")
    rules.add_argument("--low-dose-max-mas", type=float, help="exposure (mAs) at or below this: low dose")
    rules.add_argument("--normal-dose-min-mas", type=float, help="exposure (mAs) at or above this: normal dose")
    parser.add_argument("--splits", default="train=0.8,val=0.1,test=0.1",
                        help="fractions of PATIENTS per split (default %(default)s)")
    parser.add_argument("--salt", default=os.environ.get("LDCT_SALT"),
                        help="secret salt for the patient/series pseudonyms (default: $LDCT_SALT; keep it private)")
    parser.add_argument("--num-shards", type=int, default=4,
                        help="shards per split and dose (default %(default)s)")
    parser.add_argument("--site-local", help="folder for the operator-only files (input paths); default: "
                        "OUTPUT-site_local_DO_NOT_SHARE beside the output, never inside it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards, rejected list and manifest of an earlier run in --output")
    return parser


def run(argv: Sequence[str]) -> dict:
    """Parse ``argv`` and run the pipeline without the error mapping; returns the manifest (tests and benchmarks call
    it with a command line)."""
    args, beam_args = build_parser().parse_known_args(argv)
    return dicom_to_tfrecord.run(args, beam_args)


def _convert(args: argparse.Namespace) -> None:
    beam_args = args.unknown
    del args.unknown  # the manifest records the parser's own options only
    manifest, output = dicom_to_tfrecord.run_with_output(args, beam_args)
    dicom_to_tfrecord.print_summary(manifest, output, local=args.site_local)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _convert, argv, pass_unknown=True)


if __name__ == "__main__":
    sys.exit(main())
