"""``python -m ldct_tf.evaluate``: parse the command line, then evaluate denoisers (:func:`ldct_tf.evaluate.evaluate`),
unblind a reader study (``--score-sheet``) or tune the classical baselines (``--tune``, formerly
``python -m ldct_tf.baselines``); errors are one line (see :mod:`ldct_tf.evaluate` for inputs and outputs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import baselines, cli
from ldct_tf.evaluate import (DEFAULT_CALIBRATION, EvaluateInputError, Pair, evaluate, load_pair_dirs, load_pairs_csv,
                              make_denoisers, read_pairs_csv, simulated_pairs, write_reader_study, write_score_summary)
from ldct_tf.evaluate.pairs import dicom_files
from ldct_tf.evaluate.baseline_tuning import tune_baselines
from ldct_tf.simulate import calibration as calibration_lib


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldct_tf.evaluate", description="Score denoisers on paired "
                                "low/normal-dose CT, side by side, run reader studies, tune the classical baselines.")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--pairs", help="CSV with header low,normal (or quarter_dose,full_dose), paths relative to it")
    src.add_argument("--low", help="folder (or file) of low-dose DICOM, matched to --normal by position")
    src.add_argument("--normal", help="folder (or file) of normal-dose DICOM")
    src.add_argument("--simulate", type=float, metavar="DOSE_FRACTION",
                     help="simulate this dose fraction from --normal (or the normal column of --pairs)")
    src.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                     help="simulator calibration JSON for --simulate (python -m ldct_tf.simulate calibrate; "
                          "default: configs/calibration_aapm_mayo.json)")
    src.add_argument("--patients", help="comma-separated patients of the pairs CSV's 'patient' column to use")
    p.add_argument("--denoiser", action="append", metavar="NAME",
                   help="none | gaussian | nlm | tv | bm3d | model:PATH; repeat for several "
                        "(default: none gaussian nlm tv)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--panels", type=int, default=3, help="slices with side-by-side panels (default %(default)s)")
    p.add_argument("--lesions", type=int, default=0, metavar="N",
                   help="lesion detectability: insert lesions into the normal-dose slices of the first N pairs and "
                        "simulate low dose (two simulations per slice, ~15 s each)")
    p.add_argument("--seed", type=int, default=0, help="seed for --simulate noise and the reader-study order")
    p.add_argument("--reader-study", type=int, metavar="N", help="also write a blinded reader-study kit of N slices")
    p.add_argument("--score-sheet", action="append", metavar="CSV",
                   help="filled reader-study sheet(s): unblind and summarise (no evaluation is run)")
    p.add_argument("--key", help="reader-study key.csv (default: beside the first score sheet)")
    p.add_argument("--tune", metavar="NAMES",
                   help="tune these baselines' strength on the given pairs (development patients only!) instead of "
                        f"evaluating; writes tuning.json. Tunable: {', '.join(sorted(baselines.GRIDS))}")
    p.add_argument("--tune-stride", type=int, default=1, help="tune on every k-th pair (e.g. 4 for bm3d)")
    return p


def _pairs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Pair]:
    """The pairs the input arguments name; a missing combination is a usage error (exit 2)."""
    patients = [s.strip() for s in args.patients.split(",")] if args.patients else None
    if args.simulate is not None:
        if args.pairs:
            normals = [no for _, no, _ in read_pairs_csv(args.pairs, patients)]
        elif args.normal:
            normals = dicom_files(Path(args.normal))
        else:
            parser.error("--simulate needs --normal (or --pairs for its normal column)")
        calibration = calibration_lib.load(args.calibration)
        return simulated_pairs(normals, args.simulate, seed=args.seed, calibration=calibration)
    if args.pairs:
        return load_pairs_csv(args.pairs, patients)
    if args.low and args.normal:
        return load_pair_dirs(args.low, args.normal)
    parser.error("give --pairs CSV, or --low DIR --normal DIR, or --normal DIR --simulate FRACTION")


def _evaluate(args: argparse.Namespace, pairs: list[Pair]) -> int:
    specs = args.denoiser or ["none", "gaussian", "nlm", "tv"]
    denoisers = make_denoisers(specs)
    info = {"input": {k: getattr(args, k) for k in ("pairs", "low", "normal", "simulate", "patients", "seed")
                      if getattr(args, k) is not None},
            "denoiser_params": {s: baselines.DEFAULTS.get(s, {}) for s in specs if not s.startswith("model:")}}
    print("denoisers: " + ", ".join(f"{s} {info['denoiser_params'].get(s, '')}".strip() for s in specs))
    summary = evaluate(pairs, denoisers, args.out, figures=not args.no_figures, panel_slices=args.panels,
                       info=info, lesions=args.lesions)
    print((Path(args.out) / "report.md").read_text())
    if args.reader_study:
        kit = write_reader_study(pairs, denoisers, args.reader_study, Path(args.out) / "reader_study", seed=args.seed)
        print(f"reader-study kit: {kit['cases']} blinded cases, sheet {kit['score_sheet']} (key: {kit['key']})")
    return 0 if summary else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def work(args: argparse.Namespace) -> int:
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise EvaluateInputError(f"--out {args.out}: exists and is not a folder; give a folder (it is created if "
                                     "missing)")
        if args.score_sheet:
            print(write_score_summary(args.score_sheet, args.key, args.out)[1])
            return 0
        if not args.out:
            parser.error("--out DIR is required")
        pairs = _pairs(args, parser)
        print(f"{len(pairs)} paired slices")
        if args.tune:
            tune_baselines(pairs, args.tune, args.out, stride=args.tune_stride)
            return 0
        return _evaluate(args, pairs)

    return cli.run_main(parser, work, argv)


if __name__ == "__main__":
    sys.exit(main())
