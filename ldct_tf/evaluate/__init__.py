"""``python -m ldct_tf.evaluate``: score denoisers on paired low/normal-dose CT, side by side, and run reader studies.

    python -m ldct_tf.evaluate --pairs pairs.csv --denoiser none --denoiser bm3d --denoiser model:saved_models/ldct_denoiser --out eval
    python -m ldct_tf.evaluate --low LOW_DIR --normal NORMAL_DIR --out eval
    python -m ldct_tf.evaluate --normal NORMAL_DIR --simulate 0.25 --out eval         # simulated quarter dose
    python -m ldct_tf.evaluate --pairs pairs.csv --reader-study 10 --out study         # + blinded reader-study kit
    python -m ldct_tf.evaluate --score-sheet reader1.csv --score-sheet reader2.csv --out study   # unblind, summarise
    python -m ldct_tf.evaluate --pairs pairs.csv --patients L096,L143 --tune gaussian,tv --out tuning  # = ldct_tf.baselines

Pairs CSV: header ``low,normal`` (``quarter_dose,full_dose`` is accepted too, so the Mayo ``pairs.csv`` works as is),
paths absolute or relative to the CSV's folder, an optional ``patient`` column for ``--patients``.  Denoisers:
``none`` (the low-dose input), ``gaussian``, ``nlm``, ``tv``, ``bm3d`` (tuned defaults, ``ldct_tf.baselines``) and
``model:PATH`` (a SavedModel version folder, or a model folder meaning its newest version).

Output folder: ``metrics.csv`` (one row per slice and denoiser), ``summary.json`` and ``report.md`` (mean and 95 %
interval per denoiser and metric, wins per slice, the normal-dose reference's own noise figures), ``figures/``
(liver-window panels with zoomed crops and difference maps, metric bars, NPS curves).  Slices are named after the
files you gave (never after DICOM header fields, which may identify the patient).

The core is :func:`evaluate` (pairs x denoisers -> summary dict), which the quality benchmark and the demo call
directly; :func:`load_pairs_csv`, :func:`load_pair_dirs`, :func:`simulated_pairs` and :func:`make_denoisers` build its
inputs.  The work is done in the ``ldct_tf.evaluate`` package (pairs, denoisers, scoring, report, reader_study);
this module is the command line and keeps the names other code imports from here.  ``--tune`` is an alias of
``python -m ldct_tf.baselines`` (``ldct_tf.evaluate.baseline_tuning``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ldct_tf import baselines, dicom
from ldct_tf.evaluate import report, scoring
from ldct_tf.evaluate.denoisers import SliceDenoiser, make_denoisers, model_denoiser
from ldct_tf.evaluate.pairs import (DEFAULT_CALIBRATION, Pair, dicom_files, load_pair, load_pair_dirs,
                                      load_pairs_csv, read_pairs_csv, simulated_pairs)
from ldct_tf.evaluate.reader_study import (READER_CRITERIA, score_report_markdown, summarise_scores,
                                             weighted_kappa, write_reader_study)
from ldct_tf.evaluate.report import jsonable, report_markdown, write_metrics_csv
from ldct_tf.evaluate.scoring import (METRICS, REFERENCE, WIN_METRICS, SliceRois, choose_rois, count_wins,
                                        interval95, noise_figures, score_slice)

__all__ = [
    "DEFAULT_CALIBRATION", "METRICS", "READER_CRITERIA", "REFERENCE", "WIN_METRICS", "Pair", "SliceDenoiser",
    "SliceRois", "build_parser", "choose_rois", "count_wins", "evaluate", "interval95", "jsonable", "load_pair",
    "load_pair_dirs", "load_pairs_csv", "main", "make_denoisers", "model_denoiser", "noise_figures",
    "read_pairs_csv", "report_markdown", "score_report_markdown", "score_slice", "simulated_pairs",
    "summarise_scores", "weighted_kappa", "write_metrics_csv", "write_reader_study",
]


def evaluate(pairs: Sequence[Pair], denoisers: Mapping[str, SliceDenoiser], out_dir: Optional[str | Path] = None,
             *, figures: bool = True, progress: bool = True, panel_slices: int = 3,
             info: Optional[dict] = None, lesions: int = 0) -> dict:
    """Run every denoiser on every pair and score it; returns the summary dict (also written to ``out_dir``).

    Summary keys: ``slices``, ``denoisers`` (names in order), ``metrics`` (``{denoiser: {metric: interval95}}``),
    ``wins`` (:func:`count_wins`), ``reference`` (the normal-dose slices' own noise SD, CNR and NPS mean frequency),
    ``nps_mean_freq_distance_to_reference`` (per denoiser: mean |f_denoiser - f_reference| over slices), ``rows``
    (per slice and denoiser), ``info`` (``info`` as given: e.g. the input and the denoisers' parameters) and
    ``files`` (what was written).  ``out_dir=None`` computes without writing.
    """
    scores = scoring.score(pairs, denoisers, progress=progress, panel_slices=panel_slices, info=info,
                           lesions=lesions)
    if out_dir is not None:
        report.write(scores, out_dir, figures=figures)
    return scores.summary


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldct_tf.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--pairs", help="CSV with header low,normal (or quarter_dose,full_dose), paths relative to it")
    src.add_argument("--low", help="folder (or file) of low-dose DICOM, matched to --normal by position")
    src.add_argument("--normal", help="folder (or file) of normal-dose DICOM")
    src.add_argument("--simulate", type=float, metavar="DOSE_FRACTION",
                     help="simulate this dose fraction from --normal (or the normal column of --pairs)")
    src.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                     help="simulator calibration JSON for --simulate (python -m ldct_tf.simulate.calibration; default: "
                          "configs/calibration_aapm_mayo.json)")
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
                        "evaluating; writes tuning.json (the same as python -m ldct_tf.baselines)")
    p.add_argument("--tune-stride", type=int, default=1, help="tune on every k-th pair (e.g. 4 for bm3d)")
    return p


def _pairs_from_args(args: argparse.Namespace) -> list[Pair]:
    patients = [s.strip() for s in args.patients.split(",")] if args.patients else None
    if args.simulate is not None:
        if args.pairs:
            normals = [no for _, no, _ in read_pairs_csv(args.pairs, patients)]
        elif args.normal:
            normals = dicom_files(Path(args.normal))
        else:
            raise SystemExit("error: --simulate needs --normal (or --pairs for its normal column)")
        from ldct_tf.simulate import calibration as calibration_lib

        try:
            calibration = calibration_lib.load(args.calibration)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        return simulated_pairs(normals, args.simulate, seed=args.seed, calibration=calibration)
    if args.pairs:
        return load_pairs_csv(args.pairs, patients)
    if args.low and args.normal:
        return load_pair_dirs(args.low, args.normal)
    raise SystemExit("error: give --pairs CSV, or --low DIR --normal DIR, or --normal DIR --simulate FRACTION")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out {args.out}: exists and is not a folder; give a folder (it is created if missing)",
              file=sys.stderr)
        return 2
    try:
        if args.score_sheet:
            result = summarise_scores(args.score_sheet, args.key)
            out = Path(args.out or Path(args.score_sheet[0]).parent)
            out.mkdir(parents=True, exist_ok=True)
            (out / "reader_scores.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
            text = score_report_markdown(result)
            (out / "reader_scores.md").write_text(text)
            print(text)
            return 0
        if not args.out:
            raise SystemExit("error: --out DIR is required")
        pairs = _pairs_from_args(args)
        print(f"{len(pairs)} paired slices")
        if args.tune:  # alias of python -m ldct_tf.baselines
            from ldct_tf.evaluate.baseline_tuning import tune_baselines

            tune_baselines(pairs, args.tune, args.out, stride=args.tune_stride)
            return 0
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
            kit = write_reader_study(pairs, denoisers, args.reader_study, Path(args.out) / "reader_study",
                                     seed=args.seed)
            print(f"reader-study kit: {kit['cases']} blinded cases, sheet {kit['score_sheet']} (key: {kit['key']})")
        return 0 if summary else 1
    except (ValueError, OSError, ImportError, dicom.NotUsableCT) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
