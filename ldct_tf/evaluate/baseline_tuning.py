"""``python -m ldct_tf.baselines``: tune the classical baselines' strength on paired slices (development patients only).

    python -m ldct_tf.baselines --pairs pairs.csv --patients L096,L143 --tune gaussian,tv --out tuning
    python -m ldct_tf.baselines --pairs pairs.csv --patients L096,L143 --tune bm3d --tune-stride 4 --out tuning

Why a module of its own: tuning is a different question from evaluating (which strength is best, asked on
development patients, never on the test patient L286), and ``ldct_tf.baselines`` stays the denoisers themselves.
Writes ``OUT/tuning.json`` (per baseline: the grid's mean PSNR/SSIM and the best value, :func:`ldct_tf.baselines.tune`).
``python -m ldct_tf.evaluate --tune`` is an alias that calls :func:`tune_baselines` too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import baselines, dicom
from ldct_tf.evaluate.pairs import Pair, load_pair_dirs, load_pairs_csv


def tune_baselines(pairs: Sequence[Pair], names: str | Sequence[str], out_dir: str | Path,
                   stride: int = 1) -> dict:
    """Tune each named baseline on every ``stride``-th pair; writes ``out_dir/tuning.json`` and returns its content."""
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    chosen = pairs[::max(1, stride)]
    results = {}
    for name in names:
        results[name] = baselines.tune(name, [(p.low, p.normal) for p in chosen], progress=True)
        best = results[name]
        print(f"{name}: best {best['parameter']}={best['best']:g} on {best['slices']} slices"
              + (" (at the grid's edge: widen it)" if best["at_grid_edge"] else ""))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "tuning.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldct_tf.baselines", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", help="CSV with header low,normal (or quarter_dose,full_dose), paths relative to it")
    p.add_argument("--low", help="folder (or file) of low-dose DICOM, matched to --normal by position")
    p.add_argument("--normal", help="folder (or file) of normal-dose DICOM")
    p.add_argument("--patients", help="comma-separated patients of the pairs CSV's 'patient' column to use")
    p.add_argument("--tune", metavar="NAMES", required=True,
                   help=f"comma-separated baselines to tune: {', '.join(sorted(baselines.GRIDS))}")
    p.add_argument("--tune-stride", type=int, default=1, help="tune on every k-th pair (e.g. 4 for bm3d)")
    p.add_argument("--out", required=True, help="output folder (tuning.json)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    try:
        if args.pairs:
            patients = [s.strip() for s in args.patients.split(",")] if args.patients else None
            pairs = load_pairs_csv(args.pairs, patients)
        elif args.low and args.normal:
            pairs = load_pair_dirs(args.low, args.normal)
        else:
            print("error: give --pairs CSV, or --low DIR --normal DIR", file=sys.stderr)
            return 2
        print(f"{len(pairs)} paired slices")
        tune_baselines(pairs, args.tune, args.out, stride=args.tune_stride)
        return 0
    except (ValueError, OSError, ImportError, dicom.NotUsableCT) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
