"""tf.data input from the pipeline's shards.

``slice_dataset`` reads one split (and optionally one dose) back as ``(hu, metadata)`` pairs exactly as the pipeline
wrote them: HU float32 ``[height, width, 1]`` and the record's other features.  Training streams (patches,
augmentation, unpaired low/normal batches) are built on top of it.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import tensorflow as tf

from ldct_tf import records

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".tfrecord.gz"


def read_manifest(data_dir: str) -> dict:
    """The pipeline's ``manifest.json``; a missing one or another schema version raises with the folder named."""
    path = f"{data_dir.rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; is this the output folder of pipelines.dicom_to_tfrecord?")
    with tf.io.gfile.GFile(path, "r") as handle:
        manifest = json.load(handle)
    version = manifest.get("schema_version")
    if version != records.SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version}, this ldct_tf reads {records.SCHEMA_VERSION}; "
                         "re-run the pipeline with this version")
    return manifest


def shard_files(data_dir: str, split: str, dose: Optional[str] = None) -> list[str]:
    """Shard paths of one split (all doses, or one), sorted."""
    if split not in records.SPLITS:
        raise ValueError(f"split must be one of {records.SPLITS}, got {split!r}")
    doses: Sequence[str] = records.DOSES if dose is None else (dose,)
    if dose is not None and dose not in records.DOSES:
        raise ValueError(f"dose must be one of {records.DOSES}, got {dose!r}")
    files: list[str] = []
    for d in doses:
        files.extend(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{split}/{d}-*{SHARD_SUFFIX}"))
    return sorted(files)


def slice_count(manifest: dict, split: str, dose: Optional[str] = None) -> int:
    counts = manifest["counts"].get(split, {})
    return int(sum(counts.values()) if dose is None else counts.get(dose, 0))


def slice_dataset(
    data_dir: str,
    split: str,
    dose: Optional[str] = None,
    shuffle_files: bool = False,
    seed: Optional[int] = None,
) -> tf.data.Dataset:
    """Dataset of ``(hu float32 [H, W, 1], metadata dict)`` for one split and dose (or both doses).

    Raises ``ValueError`` naming the folder when the manifest says the split/dose holds no slices, so that training
    on an empty stream fails at once instead of hanging on ``repeat()``.
    """
    manifest = read_manifest(data_dir)
    files = shard_files(data_dir, split, dose)
    if slice_count(manifest, split, dose) == 0 or not files:
        what = f"{dose}-dose " if dose else ""
        raise ValueError(f"{data_dir}: split {split!r} has no {what}slices (manifest counts: {manifest['counts']})")
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
        file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = file_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle_files,
    )
    return dataset.map(records.parse, num_parallel_calls=tf.data.AUTOTUNE)
