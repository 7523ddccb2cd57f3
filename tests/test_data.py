import json

import pytest

from ldct_tf import data, records


def test_missing_manifest_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        data.read_manifest(str(tmp_path))


def test_other_schema_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": records.SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="schema_version"):
        data.read_manifest(str(tmp_path))


def test_bad_split_and_dose_names(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        data.shard_files(str(tmp_path), "holdout")
    with pytest.raises(ValueError, match="dose must be one of"):
        data.shard_files(str(tmp_path), "train", "quarter")


def test_shuffled_files_read_every_slice(sample_run):
    out, manifest = sample_run
    split = next(s for s in records.SPLITS if manifest["counts"][s]["low"])
    ordered = sorted(int(m["instance"]) for _, m in data.slice_dataset(str(out), split, "low"))
    shuffled = sorted(int(m["instance"]) for _, m in data.slice_dataset(str(out), split, "low", shuffle_files=True,
                                                                         seed=3))
    assert ordered == shuffled and len(ordered) == manifest["counts"][split]["low"]


def _write_kernel_shards(root, slices):
    """A shard folder with train slices ``(dose, kernel, hu value)``: flat 32x32 images whose value tells them apart."""
    import numpy as np
    import tensorflow as tf

    counts = {s: {"low": 0, "normal": 0} for s in records.SPLITS}
    (root / "train").mkdir(parents=True)
    for dose in records.DOSES:
        with tf.io.TFRecordWriter(str(root / "train" / f"{dose}-00000-of-00001{data.SHARD_SUFFIX}"), "GZIP") as w:
            for i, (d, kernel, value) in enumerate(slices):
                if d != dose:
                    continue
                counts["train"][dose] += 1
                w.write(records.encode(records.SliceRecord(
                    image=np.full((32, 32), value, np.int16), dose=dose, split="train", patient=f"p{dose}",
                    series=f"s{kernel}", instance=i, z_mm=float(i), pixel_spacing_mm=(0.7, 0.7),
                    slice_thickness_mm=3.0, kvp=120.0, exposure_mas=50.0, ctdivol=3.0, kernel=kernel,
                    manufacturer="m")))
    (root / "manifest.json").write_text(json.dumps({"schema_version": records.SCHEMA_VERSION, "counts": counts}))


def test_kernel_matched_streams_keep_only_the_kernels_both_doses_hold(tmp_path):
    from ldct_tf import ct

    _write_kernel_shards(tmp_path, [("low", "D45f", 100), ("low", "B30f", -100), ("normal", "D45f", 50)])
    assert data.stream_kernels(str(tmp_path), "train", "low") == {"D45f", "B30f"}
    assert data.matched_kernels(str(tmp_path)) == ["D45f"]
    for matched in (True, False):
        batches = data.unpaired_training_dataset(str(tmp_path), 16, 4, seed=0, kernel_matched=matched, cache=False)
        low_values = {round(float(ct.from_model(v))) for low, _ in batches.take(10) for v in low.numpy().ravel()}
        assert low_values == ({100} if matched else {100, -100})


def test_kernel_matching_without_a_shared_kernel_names_the_folder(tmp_path):
    _write_kernel_shards(tmp_path, [("low", "B30f", -100), ("normal", "D45f", 50)])
    with pytest.raises(ValueError, match=r"kernel_matched.*\['B30f'\].*\['D45f'\] have none in common"):
        data.matched_kernels(str(tmp_path))
