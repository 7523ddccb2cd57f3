"""The development data split of the quality and ablation benchmarks (AAPM-Mayo pairs in ``../shared/data``).

Each patient feeds ONE side of the unpaired training, as a clinic's data would: the real low-dose stream is patient
L143 (quarter dose), the normal-dose stream and the source of the simulated pairs are patient L096 (full dose).  No
pair is ever used as a pair.  Recipes and checkpoints are chosen on the validation split, which holds slices of the
same two training-side patients that training never reads (L096 slices 07-09: D45f; L143 slices 22-24: B30f), both
doses, so it can be scored as pairs.  L286 is the test patient: its slices are in the ``test`` split, which training
never reads and nothing is chosen on.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_PATIENT = "L286"
LOW_PATIENT = "L143"
NORMAL_PATIENT = "L096"
VALIDATION_SLICES = {"L096": ("07", "08", "09"), "L143": ("22", "23", "24")}


def data_root() -> Path:
    return Path(os.environ.get("LDCT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def pair_rows(root: Path) -> list[dict]:
    with open(root / "mayo_pairs" / "pairs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def slice_number(row: dict) -> str:
    return Path(row["full_dose"]).stem.rsplit("_", 1)[-1]


def split_of(row: dict) -> str:
    patient = row["patient"]
    if patient == TEST_PATIENT:
        return "test"
    return "val" if slice_number(row) in VALIDATION_SLICES.get(patient, ()) else "train"


def write_dose_manifest(root: Path, out_csv: Path) -> Path:
    """Dose manifest of the split above: per file, its dose, patient and split."""
    mayo = root / "mayo_pairs"
    with open(out_csv, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "dose", "patient", "split"])
        for row in pair_rows(root):
            patient, split = row["patient"], split_of(row)
            if split == "train":
                if patient == LOW_PATIENT:
                    writer.writerow([mayo / row["quarter_dose"], "low", patient, split])
                elif patient == NORMAL_PATIENT:
                    writer.writerow([mayo / row["full_dose"], "normal", patient, split])
            else:
                writer.writerow([mayo / row["quarter_dose"], "low", patient, split])
                writer.writerow([mayo / row["full_dose"], "normal", patient, split])
    return out_csv


def make_shards(root: Path, work: Path, salt: str = "quality-benchmark") -> Path:
    """Run the Beam pipeline over the Mayo pairs with the manifest above; returns the shard folder."""
    from ldct_tf.pipeline import __main__ as dicom_to_tfrecord

    manifest = write_dose_manifest(root, work / "doses.csv")
    shards = work / "shards"
    code = dicom_to_tfrecord.main(["--input", str(root / "mayo_pairs"), "--dose-manifest", str(manifest),
                                   "--output", str(shards), "--salt", salt, "--num-shards", "1"])
    if code:
        raise SystemExit(f"the pipeline failed with exit status {code}")
    return shards


def pairs_of(root: Path, split: str) -> list[dict]:
    """pairs.csv rows of one split (for scoring with ldct_tf.evaluate)."""
    return [row for row in pair_rows(root) if split_of(row) == split]
