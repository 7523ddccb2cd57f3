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


@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_a_zero_byte_or_truncated_shard_is_one_error_naming_it(tmp_path, damage):
    """Such a shard (an interrupted copy) was a DataLossError traceback inside fit, naming no file (issue 27)."""
    from ldct_tf.errors import LdctError

    _write_kernel_shards(tmp_path, [("low", "B30f", 100 + i) for i in range(40)] + [("normal", "B30f", 50)])
    shard = tmp_path / "train" / f"low-00000-of-00001{data.SHARD_SUFFIX}"
    whole = shard.read_bytes()
    shard.write_bytes(b"" if damage == "zero-byte" else whole[: len(whole) - 12])
    reason = "zero bytes" if damage == "zero-byte" else "truncated"
    for read in (lambda: data.slice_dataset(str(tmp_path), "train", "low"),
                 lambda: data.stream_kernels(str(tmp_path), "train", "low"),
                 lambda: data.unpaired_training_dataset(str(tmp_path), 16, 4)):
        with pytest.raises(LdctError, match=rf"^{shard}: unreadable shard: .*{reason}"):
            read()
    assert len(list(data.slice_dataset(str(tmp_path), "train", "normal"))) == 1  # the intact shard still reads


def test_a_patch_larger_than_the_slices_is_refused_instead_of_hanging(tmp_path):
    """data.patch_size=1024 on smaller slices padded every crop with air, so the tissue filter waited forever."""
    from ldct_tf.errors import LdctError

    _write_kernel_shards(tmp_path, [("low", "B30f", 100), ("normal", "B30f", 50)])  # 32x32 slices
    with pytest.raises(LdctError, match="data.patch_size 64 is larger than .* at most 32 pixels"):
        data.unpaired_training_dataset(str(tmp_path), 64, 4)
    low, normal = next(iter(data.unpaired_training_dataset(str(tmp_path), 32, 1, min_tissue_fraction=0.0)))
    assert low.shape == (1, 32, 32, 1)
