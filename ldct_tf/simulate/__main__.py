"""``python -m ldct_tf.simulate calibrate|pairs``: the simulation stage's two commands.

    python -m ldct_tf.simulate calibrate --data SHARDS --out calibration.json [--dose-fraction 0.25]
    python -m ldct_tf.simulate pairs --data SHARDS --calibration calibration.json --realisations 8 [Beam options]

``calibrate`` fits the simulator to a site's unpaired low- and normal-dose shards
(:func:`ldct_tf.simulate.calibration.calibrate_shards`); ``pairs`` writes the simulated-pair stream beside the shards
(:func:`ldct_tf.pipeline.simulate_pairs.run`, a Beam stage: unknown options go to Beam).  Errors are one line.
Both spend seconds per slice, so both draw a progress bar on stderr when it is a terminal (``--no-progress``: none);
with output redirected to a file, ``calibrate`` writes one plain line per slice instead, and nothing carries terminal
codes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ldct_tf import cli, records
from ldct_tf.simulate import SimulationError
from ldct_tf.simulate import calibration as calibration_lib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.simulate", description="Calibrate the low-dose "
                                     "simulator on a site's shards, or write the simulated-pair stream.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{calibrate,pairs}")
    cal = commands.add_parser("calibrate", help="fit i0 and the FBP filter per kernel to unpaired shards or DICOM")
    source = cal.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="output folder of python -m ldct_tf.pipeline")
    source.add_argument("--low", nargs="+", metavar="PATH", help="low-dose DICOM files or folders (with --normal)")
    cal.add_argument("--normal", nargs="+", metavar="PATH", help="normal-dose DICOM files or folders")
    cal.add_argument("--out", required=True, help="calibration JSON to write")
    cal.add_argument("--split", default="train", help="with --data")
    cal.add_argument("--max-slices", type=int, default=None,
                     help="per kernel and dose (default: all; each costs 10-30 s at 512 x 512)")
    cal.add_argument("--dose-fraction", type=float, default=None,
                     help="low/normal dose ratio; never replaced by headers (default: the CTDIvol ratio of matched "
                          f"slices where credible, else {calibration_lib.DEFAULT_DOSE_FRACTION})")
    cal.add_argument("--bootstrap", type=int, default=calibration_lib.BOOTSTRAP_RESAMPLES,
                     help="resamples for the i0 interval")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr when it "
                                                                    "is a terminal)")
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
    pairs.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr when "
                                                                      "it is a terminal)")
    return parser


def command_line(args: argparse.Namespace) -> str:
    """The calibration's command as recorded in its JSON: options and their values, but every path replaced by a
    placeholder, since clinical folder and file names can hold patient names and IDs (and the file is meant to be
    shared with the simulator's users)."""
    words = ["python -m ldct_tf.simulate calibrate"]
    if args.data:
        words += ["--data DATA", f"--split {shlex.quote(args.split)}"]
    else:
        words += [f"--low <{len(args.low)} path(s)>", f"--normal <{len(args.normal or [])} path(s)>"]
    for option in ("max_slices", "dose_fraction", "bootstrap", "seed"):
        value = getattr(args, option)
        if value is not None:
            words.append(f"--{option.replace('_', '-')} {value}")
    return " ".join(words + ["--out OUT"])


def _calibrate(args: argparse.Namespace) -> None:
    if Path(args.out).is_dir():
        raise SimulationError(f"{args.out}: is a folder; give a file name for the calibration JSON")
    start = time.monotonic()
    bar = False if args.no_progress else None  # None: a bar when stderr is a terminal
    kwargs = {"bootstrap": args.bootstrap, "seed": args.seed, "bar": bar}
    if args.data:
        result = calibration_lib.calibrate_shards(args.data, args.split, args.max_slices, args.dose_fraction, **kwargs)
    else:
        progress = calibration_lib.print_progress
        lows = calibration_lib.slices_from_dicom(args.low, args.max_slices, progress, bar)
        normals = calibration_lib.slices_from_dicom(args.normal, args.max_slices, progress, bar)
        result = calibration_lib.calibrate_sets(lows, normals, args.dose_fraction, **kwargs)
        result["source"] = {"max_slices_per_kernel_and_dose": args.max_slices}
    result["runtime_s"] = round(time.monotonic() - start, 1)
    result["command"] = command_line(args)
    print(f"Wrote {calibration_lib.save(result, args.out)} in {result['runtime_s']:.0f} s")


def _pairs(args: argparse.Namespace, beam_args: Sequence[str]) -> dict:
    from ldct_tf.pipeline import simulate_pairs  # Apache Beam and TensorFlow: only for this subcommand

    entry = simulate_pairs.run(args.data, args.calibration, args.realisations, args.split, args.num_shards,
                               args.reference, args.textures, args.overwrite, beam_args,
                               progress=False if args.no_progress else None)
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
        if (args.low is None) != (args.normal is None):
            parser.error("--low and --normal go together")
        _calibrate(args)

    return cli.run_main(parser, work, argv, pass_unknown=True)


if __name__ == "__main__":
    sys.exit(main())
