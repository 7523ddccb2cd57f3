"""``python -m ldct_tf.demo`` (``make demo``): parse the command line, run :func:`ldct_tf.demo.run_demo`, report errors
as one line (see :mod:`ldct_tf.demo` for what the three steps do)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import cli
from ldct_tf.demo import DEFAULT_MODEL, run_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.demo", description="The shipped model on real CT, "
                                     "DICOM in, DICOM out, scored.")
    parser.add_argument("--out", default="demo_output", help="work folder (default %(default)s); must be new, empty "
                                                             "or an earlier demo's output, whose files it replaces")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="SavedModel folder (default: the shipped model)")
    parser.add_argument("--input", help="a folder of your own low-dose CT DICOM instead of the sample")
    parser.add_argument("--reference", help="with --input: normal-dose DICOM of the same slices, matched by position, "
                                            "to score against (without it, only denoising runs)")
    parser.add_argument("--baseline", default=None, help="classical denoiser to compare (default bm3d, or nlm "
                                                         "when bm3d is not installed)")
    parser.add_argument("--max-slices", type=int, help="use only the first N packaged sample slices")
    return parser


def _demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    done = run_demo(Path(args.out).resolve(), args.model, args.input, args.reference, args.baseline, args.max_slices)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    print(f"  low-dose input DICOM:  {done['low_dir']}")
    print(f"  denoised DICOM series: {done['denoised_dir']}")
    if done["report"]:
        print(f"  report and figures:    {done['report']}  ({Path(args.out).resolve() / 'evaluation' / 'figures'})")
    print("Research use only: not a medical device.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _demo, argv)


if __name__ == "__main__":
    sys.exit(main())
