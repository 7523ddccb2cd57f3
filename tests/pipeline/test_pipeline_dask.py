"""The pipeline on a second real engine: Beam's DaskRunner on a local dask.distributed cluster.

Same inputs, same salt and splits as a DirectRunner run: the same slices (exact HU), the same pseudonyms and split
assignment, the same rejects.  Needs the ``dask`` extra (``pip install -e ".[dask]"``); skipped without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("distributed")
pytest.importorskip("apache_beam.runners.dask.dask_runner")

from ldct_tf.pipeline.__main__ import run  # noqa: E402
from tests.pipeline.test_pipeline import _all_records  # noqa: E402


def _run(sample, bad: Path, out: Path, *extra: str) -> dict:
    return run(["--input", str(sample.root), "--input", str(bad), "--dose-manifest", str(sample.dose_manifest),
                "--output", str(out), "--salt", "dask-salt", "--splits", "train=0.5,val=0.25,test=0.25",
                "--num-shards", "2", *extra])


def _content(out: Path) -> tuple:
    records = sorted((r["dose"], r["split"], r["patient"], r["series"], r["instance"], r["image"].tobytes())
                     for r in _all_records(out))
    def lines(pattern, folder=out):
        return [json.loads(line) for f in folder.glob(pattern) for line in f.read_text().splitlines()]

    # The shareable list names each input by a salted hash; the operator's site-local list (beside the output, never
    # inside it) maps it to its path.
    path_of = {line["input"]: line["path"]
               for line in lines("rejected_paths-*.jsonl", Path(f"{out}-site_local_DO_NOT_SHARE"))}
    rejected = sorted((Path(path_of[line["input"]]).name, line["reason"]) for line in lines("rejected/*.jsonl"))
    return records, rejected


def test_dask_runner_writes_what_the_direct_runner_writes(sample, tmp_path):
    from distributed import LocalCluster

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not a DICOM file\n")
    direct = _run(sample, bad, tmp_path / "direct")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = _run(sample, bad, tmp_path / "dask", "--runner", "apache_beam.runners.dask.dask_runner.DaskRunner",
                    "--dask_client_address", cluster.scheduler_address)
    assert dask["slices"] == direct["slices"] == 24
    assert dask["counts"] == direct["counts"] and dask["rejected"] == direct["rejected"] >= 2
    records, rejected = _content(tmp_path / "dask")
    assert (records, rejected) == _content(tmp_path / "direct")
    assert len(records) == 24 and ("notes.txt", "not_dicom") in rejected
