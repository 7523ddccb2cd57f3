"""Calibrate the change audit's thresholds and write them into ``configs/audit.yaml``.

    LDCT_DATA_DIR=../shared/data python -m experiments.audit_thresholds [--budget 0.1] [--lesions-per-slice 3]

On the development patients of the AAPM-Mayo pairs only (L096 and L143, never the test patient L286), on the same
lesion cases as ``python -m benchmarks.audit`` (lesion-like discs inserted into the full-dose slice, quarter dose
simulated; cached in ``--cache``), the null denoiser (``oracle``: the noise-free simulated slice) is audited and
``ldct_tf.audit.calibration.calibrate`` sets ``frc_min``, ``blob_z_max`` and ``anatomy_corr_max`` so that the oracle
has at most ``--budget`` false flags per slice per criterion.  The thresholds and their provenance are written into
``--config`` (default ``configs/audit.yaml``; its other keys and header are kept), and the calibration is printed.
Run ``python -m benchmarks.audit`` afterwards to measure the audit with them.  Needs no model: the oracle is the null.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import audit as audit_benchmark
from benchmarks import harness
from ldct_tf.audit import calibration

COMMAND = "python -m experiments.audit_thresholds"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(audit_benchmark.CONFIG), help="audit config to calibrate "
                                                                          "(default %(default)s)")
    p.add_argument("--budget", type=float, default=0.1, help="oracle false flags per slice per criterion")
    p.add_argument("--lesions-per-slice", type=int, default=3)
    p.add_argument("--cache", default=str(audit_benchmark.DEFAULT_CACHE))
    return p


def calibrate(config_path: Path, budget: float, per_slice: int, cache: Path) -> dict:
    """Audit the oracle on the development patients' cases and apply the calibration rule; returns its result."""
    from ldct_tf.audit import scores as audit_scores

    config, floors = audit_scores.load_config(config_path), audit_scores.load_thresholds(config_path)
    rows = harness.pair_rows(harness.data_root())
    cases = audit_benchmark.build_cases(rows, per_slice, cache, config, patients=audit_benchmark.DEV_PATIENTS)
    records, _, _ = audit_benchmark.audit_records(cases, floors, audited=("oracle",))
    return calibration.calibrate(records, floors, budget)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget < 0:
        print(f"{COMMAND}: error: --budget must be >= 0, got {args.budget}", file=sys.stderr)
        return 2
    root = harness.data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"{COMMAND}: error: {root}/mayo_pairs/pairs.csv not found (set LDCT_DATA_DIR)", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ldct_tf.audit.scores import AuditConfigError

    try:
        calibrated = calibrate(Path(args.config), args.budget, args.lesions_per_slice, Path(args.cache))
        calibration.write_thresholds(Path(args.config), calibrated, calibration.provenance(
            args.budget, calibrated["null_slices"], audit_benchmark.DEV_PATIENTS, audit_benchmark.TEST_PATIENT,
            COMMAND + (f" --budget {args.budget}" if args.budget != 0.1 else "")))
    except (AuditConfigError, ValueError) as exc:
        print(f"{COMMAND}: error: {exc}", file=sys.stderr)
        return 1
    print(f"calibrated on {', '.join(audit_benchmark.DEV_PATIENTS)}: {json.dumps(calibrated)}")
    print(f"wrote {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
