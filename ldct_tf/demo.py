"""``python -m ldct_tf.demo`` (``make demo``): the data path end to end on CT that every machine has.

Until a trained model ships, the demo shows the first stage: it writes a small multi-patient DICOM archive from
pydicom's bundled real CT slice (or uses real low/normal-dose pairs when ``LDCT_DATA_DIR`` or ``--input`` points at
them), runs the Beam pipeline on it, and reads the shards back through ``ldct_tf.data``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def choose_input(args: argparse.Namespace, work: Path) -> tuple[list[str], str, str]:
    """(inputs, dose manifest, description) from --input, LDCT_DATA_DIR, or sample data written now."""
    if args.input:
        if not args.dose_manifest:
            raise SystemExit("error: --input needs --dose-manifest (CSV with header path,dose)")
        return [args.input], args.dose_manifest, f"your data in {args.input}"
    data_dir = os.environ.get("LDCT_DATA_DIR")
    if data_dir and (Path(data_dir) / "mayo_pairs" / "pairs.csv").exists():
        mayo = Path(data_dir).resolve() / "mayo_pairs"
        from ldct_tf.sample_data import write_mayo_dose_manifest

        manifest = write_mayo_dose_manifest(mayo, work / "mayo_doses.csv")
        return [str(mayo / "quarter_dose"), str(mayo / "full_dose")], str(manifest), \
            "real AAPM-Mayo quarter/full-dose pairs from $LDCT_DATA_DIR/mayo_pairs"
    from ldct_tf import sample_data

    print("Writing a sample archive: 4 patients x (normal-dose, low-dose) series from pydicom's bundled CT_small.dcm")
    sample = sample_data.write_sample_dataset(work / "sample_dicom", n_patients=4, slices_per_series=3)
    return [str(sample.root)], str(sample.dose_manifest), \
        "sample DICOM written from pydicom's CT_small.dcm (image-domain noise stands in for low dose)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldct_tf.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="work folder (default %(default)s; replaced each run)")
    parser.add_argument("--input", help="a folder of your own DICOM (needs --dose-manifest)")
    parser.add_argument("--dose-manifest", help="path,dose[,patient] CSV for --input")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    inputs, manifest_csv, description = choose_input(args, work)
    print(f"Input: {description}")

    from pipelines import dicom_to_tfrecord

    shards = work / "shards"
    print(f"Step 1/2: Beam pipeline (DirectRunner) -> {shards}")
    pipeline_args = [a for i in inputs for a in ("--input", i)]
    pipeline_args += ["--dose-manifest", manifest_csv, "--output", str(shards), "--salt", "ldct-demo",
                      "--splits", "train=0.5,val=0.25,test=0.25", "--num-shards", "1", "--overwrite"]
    try:
        manifest = dicom_to_tfrecord.run(pipeline_args)
    except dicom_to_tfrecord.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dicom_to_tfrecord.print_summary(manifest, str(shards))

    from ldct_tf import data, records

    print("\nStep 2/2: reading the shards back with ldct_tf.data")
    print(f"{'split':<6} {'dose':<7} {'slices':>6}  {'shape':<12} {'HU min':>7} {'HU max':>7} {'HU mean':>8}")
    for split in records.SPLITS:
        for dose in records.DOSES:
            if not manifest["counts"][split][dose]:
                continue
            images = [hu.numpy() for hu, _ in data.slice_dataset(str(shards), split, dose)]
            shape = "x".join(str(s) for s in images[0].shape[:2])
            lo = min(float(i.min()) for i in images)
            hi = max(float(i.max()) for i in images)
            mean = sum(float(i.mean()) for i in images) / len(images)
            print(f"{split:<6} {dose:<7} {len(images):>6}  {shape:<12} {lo:>7.0f} {hi:>7.0f} {mean:>8.1f}")
    print(f"\nDone in {time.perf_counter() - start:.1f} s. Shards and manifest.json: {shards}")
    print("Next: train on these shards, e.g. python -m ldct_tf.train --config configs/smoke.yaml "
          f"--data {shards} --model-dir {work / 'run'}  (export, denoising and evaluation come next, see README)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
