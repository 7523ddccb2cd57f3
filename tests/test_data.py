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
