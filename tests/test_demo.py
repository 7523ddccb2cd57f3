"""``make demo`` (python -m ldct_tf.demo): sample archive -> pipeline -> shards read back."""

import json

from ldct_tf import demo


def test_demo_on_sample_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LDCT_DATA_DIR", raising=False)
    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Converted 24 slices" in out and "reading the shards back" in out
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sum(sum(d.values()) for d in manifest["counts"].values()) == 24


def test_demo_on_real_mayo_pairs(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDCT_DATA_DIR", str(shared_data))
    assert demo.main(["--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["slices"] == 50 and manifest["rejected"] == 0
    # The manifest's patient column keeps each Mayo patient (PatientID "Anonymous" for all) in one split.
    assert sum(manifest["patients"][s]["low"] for s in manifest["patients"]) == 3
