"""ldct_tf.node when the disk is full or the process dies: nothing acknowledged is forgotten, nothing half-written keeps
holding space, and a batch that kills the node is given up after --retries attempts instead of looping forever.

In-process (spool, tracker, worker with a stand-in for the denoising call); no network, no model.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from ldct_tf.node import worker as worker_module
from ldct_tf.node.spool import Spool
from ldct_tf.node.tracker import SeriesTracker
from ldct_tf.node.worker import SeriesWorker, WorkerOptions


class Killed(BaseException):
    """Stands in for the process dying (kill -9, OOM kill): like them, no ``except Exception`` in the worker sees it."""


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def spool(tmp_path):
    opened = Spool(tmp_path / "spool").open()
    yield opened
    opened.close()


def receive(tracker: SeriesTracker, spool: Spool, series: str, n: int) -> None:
    for i in range(n):
        tracker.receive(spool.write_instance(b"instance %d" % i), series, f"inst{i}", association=1)
    tracker.association_ended(1)


def test_failed_receive_leaves_no_part_file(spool, monkeypatch):
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        spool.write_instance(b"x" * 1000)
    assert list(spool.tmp.iterdir()) == []


def test_disk_full_at_claim_keeps_the_series(spool, monkeypatch, caplog):
    """state.json cannot be written: nothing moves out of incoming/, the tracker still knows the series, and once
    there is space again it is claimed whole."""
    now = [1000.0]
    tracker = SeriesTracker(spool, quiet_s=1.0, clock=lambda: now[0])
    receive(tracker, spool, "series1", 3)
    now[0] += 5
    real_save = spool.save_state
    monkeypatch.setattr(spool, "save_state", disk_full)
    with caplog.at_level(logging.ERROR, "ldct_tf.node"):
        assert tracker.claim_ready() == []
    assert "series series1 complete but cannot be claimed" in caplog.text
    assert len(list((spool.incoming / "series1").glob("*.dcm"))) == 3 and list(spool.work.iterdir()) == []
    assert tracker.pending() == 1
    monkeypatch.setattr(spool, "save_state", real_save)  # space freed
    now[0] += 5
    [(series, batch, _)] = tracker.claim_ready()
    assert series == "series1" and len(list((spool.work / batch / "in").glob("*.dcm"))) == 3
    assert spool.load_state(batch).instances == 3


def test_failed_rename_at_claim_is_undone(spool, monkeypatch):
    tracker = SeriesTracker(spool, quiet_s=0.0)
    receive(tracker, spool, "series1", 2)
    monkeypatch.setattr(os, "rename", disk_full)
    assert tracker.claim_ready() == []
    assert list(spool.work.iterdir()) == [] and tracker.pending() == 1
    assert len(list((spool.incoming / "series1").glob("*.dcm"))) == 2


def make_worker(spool: Spool, tmp_path, max_attempts: int = 3) -> SeriesWorker:
    tracker = SeriesTracker(spool, quiet_s=0.0)
    options = WorkerOptions(ae_title="LDCT", store=tmp_path / "store", max_attempts=max_attempts,
                            retry_delay_s=0.0)
    return SeriesWorker(spool, tracker, denoiser=None, model=None, options=options)


def claimed_batch(spool: Spool) -> str:
    tracker = SeriesTracker(spool, quiet_s=0.0)
    receive(tracker, spool, "series1", 2)
    [(_, batch, _)] = tracker.claim_ready()
    return batch


def test_attempt_is_counted_before_denoising_starts(spool, tmp_path, monkeypatch):
    """What a kill -9 during denoising leaves behind: state.json already counts the attempt."""
    batch = claimed_batch(spool)
    seen = []

    def killed(*_args, **_kwargs):
        seen.append(json.loads((spool.work / batch / "state.json").read_text())["attempts"])
        raise Killed

    monkeypatch.setattr(worker_module, "run_denoise", killed)
    with pytest.raises(Killed):
        make_worker(spool, tmp_path).process(batch)
    assert seen == [1] and spool.load_state(batch).attempts == 1


def test_batch_that_keeps_killing_the_node_goes_to_failed(spool, tmp_path, monkeypatch, caplog):
    batch = claimed_batch(spool)
    calls = []

    def killed(*_args, **_kwargs):
        calls.append(1)
        raise Killed

    monkeypatch.setattr(worker_module, "run_denoise", killed)
    for _ in range(3):  # three starts, each killed during denoising
        with pytest.raises(Killed):
            make_worker(spool, tmp_path, max_attempts=3).process(batch)
    with caplog.at_level(logging.ERROR, "ldct_tf.node"):
        make_worker(spool, tmp_path, max_attempts=3).process(batch)  # the fourth start does not try again
    assert len(calls) == 3
    assert not (spool.work / batch).exists()
    state = json.loads((spool.failed / batch / "state.json").read_text())
    assert state["attempts"] == 3 and "none finished" in state["failed_reason"]
    assert len(list((spool.failed / batch / "in").glob("*.dcm"))) == 2
    assert f"batch {batch} failed for good after 3 attempt(s)" in caplog.text


def test_replaced_duplicate_instance_is_logged(spool, caplog):
    tracker = SeriesTracker(spool, quiet_s=0.0)
    with caplog.at_level(logging.WARNING, "ldct_tf.node"):
        tracker.receive(spool.write_instance(b"first"), "series1", "inst0", association=1)
        assert "replaced" not in caplog.text
        path = tracker.receive(spool.write_instance(b"second"), "series1", "inst0", association=1)
    assert path.read_bytes() == b"second"
    assert "series series1: an instance was received again and replaced the earlier copy" in caplog.text
    tracker.association_ended(1)
    [(_, _, activity)] = tracker.claim_ready()
    assert activity.instances == 1
