"""``python -m ldct_tf.simulate calibrate|pairs``: the simulation stage's two commands.

    python -m ldct_tf.simulate calibrate --data SHARDS --out calibration.json [--dose-fraction 0.25]
    python -m ldct_tf.simulate pairs --data SHARDS --calibration calibration.json --realisations 8 [Beam options]

``calibrate`` fits the simulator to a site's unpaired low- and normal-dose shards
(:func:`ldct_tf.simulate.calibration.calibrate_shards`); ``pairs`` writes the simulated-pair stream beside the shards
(:func:`ldct_tf.pipeline.simulate_pairs.run`, a Beam stage: unknown options go to Beam).  Errors are one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import cli, records
from ldct_tf.simulate import SimulationError
from ldct_tf.simulate import calibration as calibration_lib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.simulate", description="Calibrate the low-dose "
                                     "simulator on a site's shards, or write the simulated-pair stream.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{calibrate,pairs}")
    cal = commands.add_parser("calibrate", help="fit i0 and the FBP filter per kernel to unpaired shards")
    cal.add_argument("--data", required=True, help="output folder of python -m ldct_tf.pipeline")
    cal.add_argument("--out", required=True, help="calibration JSON to write")
    cal.add_argument("--split", default="train")
    cal.add_argument("--max-slices", type=int, default=6, help="per kernel and dose (each costs ~15 s)")
    cal.add_argument("--dose-fraction", type=float, default=0.25,
                     help="low/normal dose ratio where the headers do not tell it (default %(default)s)")
    pairs = commands.add_parser("pairs", help="write calibrated simulated pairs beside the shards (Beam)")
    pairs.add_argument("--data", required=True, help="output folder of python -m ldct_tf.pipeline")
    pairs.add_argument("--calibration", required=True, help="JSON written by python -m ldct_tf.simulate calibrate")
    pairs.add_argument("--realisations", type=int, default=4, help="noise realisations per slice (default 4)")
    pairs.add_argument("--split", default="train", choices=records.SPLITS)
    pairs.add_argument("--num-shards", type=int, default=1)
    pairs.add_argument("--reference", default="original", choices=("projected", "original"),
                       help="what the noise is added to (default: the slice itself, see ldct_tf.simulate.REFERENCES)")
    pairs.add_argument("--textures", default="mixed", choices=("fitted", "mixed"),
                       help="noise textures: the fitted FBP filter only, or (default) half fitted and half the other "
                            "calibrated filters (ldct_tf.simulate.calibration.texture_variants)")
    pairs.add_argument("--overwrite", action="store_true", help="replace this split's simulated shards")
    return parser


def _calibrate(args: argparse.Namespace) -> None:
    if Path(args.out).is_dir():
        raise SimulationError(f"{args.out}: is a folder; give a file name for the calibration JSON")
    result = calibration_lib.calibrate_shards(args.data, args.split, args.max_slices, args.dose_fraction)
    print(f"Wrote {calibration_lib.save(result, args.out)}")


def _pairs(args: argparse.Namespace, beam_args: Sequence[str]) -> dict:
    from ldct_tf.pipeline import simulate_pairs  # Apache Beam and TensorFlow: only for this subcommand

    entry = simulate_pairs.run(args.data, args.calibration, args.realisations, args.split, args.num_shards,
                               args.reference, args.textures, args.overwrite, beam_args)
    print(f"Wrote {entry['pairs']} simulated pairs from {entry['source_slices']} normal-dose slices in "
          f"{entry['seconds']:.0f} s ({entry['seconds_per_source_slice']:.1f} s per slice)")
    return entry


def pairs(argv: Sequence[str]) -> dict:
    """``pairs ARGS`` without the error mapping: returns the manifest's new entry (tests and benchmarks call it)."""
    args, beam_args = build_parser().parse_known_args(["pairs", *argv])
    return _pairs(args, beam_args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def work(args: argparse.Namespace) -> None:
        if args.command == "pairs":
            _pairs(args, args.unknown)
            return
        if args.unknown:  # only the Beam stage takes options of its own
            parser.error(f"unrecognized arguments: {' '.join(args.unknown)}")
        _calibrate(args)

    return cli.run_main(parser, work, argv, pass_unknown=True)


if __name__ == "__main__":
    sys.exit(main())
