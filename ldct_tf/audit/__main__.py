"""``python -m ldct_tf.audit LOW_SERIES DENOISED_SERIES --out DIR``: parse the command line, audit with
:func:`ldct_tf.audit.audit_series_folders`, report errors as one line (see :mod:`ldct_tf.audit` for what is written)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import cli
from ldct_tf.audit import audit_series_folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldct_tf.audit", description="Per-slice change audit of a denoised "
                                "series: what did the denoiser change, and where should a reader look?")
    p.add_argument("low", help="the low-dose input series (folder or file)")
    p.add_argument("denoised", help="the denoised series made from it")
    p.add_argument("--out", required=True, help="output folder for audit.json and the flagged slices' PNGs")
    p.add_argument("--config", help="audit config (default configs/audit.yaml)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    return p


def _audit(args: argparse.Namespace) -> None:
    path, report = audit_series_folders(Path(args.low), Path(args.denoised), Path(args.out), args.config,
                                        figures=not args.no_figures)
    print(f"audited {report['slices']} slices: {report['flagged_slices']} flagged "
          f"({report['flagged_patches']} patches); wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(build_parser(), _audit, argv)


if __name__ == "__main__":
    sys.exit(main())
