"""ldct_tf.node as a service that must not lose data: SIGKILL mid-series, a destination that is down, bounded retries.

Each test runs its own node (the shipped model) and sends CT_small series with dcmtk's storescu; storescp is the
forward destination, started only when the test wants it up.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pydicom
import pytest

from tests.node.test_node_support import (Node, free_port, needs_dcmtk, storescp, storescu, wait_for, wait_for_derived,
                                     write_abdomen_series, write_ct_small_series)

pytestmark = needs_dcmtk


def states(folder: Path) -> list[dict]:
    out = []
    for path in folder.glob("*/state.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # being replaced right now
            continue
    return out


@pytest.mark.slow
def test_sigkill_mid_series_then_restart_processes_every_instance(tmp_path):
    """6 of 10 slices arrive, the node is SIGKILLed before the series is complete; after a restart the sender sends
    the other 4 and the destination gets one derived series of all 10: nothing acknowledged was lost."""
    sent = write_ct_small_series(tmp_path / "in", n=10)
    dest_port = free_port()
    args = ("--forward", f"DEST@127.0.0.1:{dest_port}")
    with storescp(tmp_path / "destination", dest_port) as destination:
        node = Node(tmp_path, free_port(), *args, "--quiet-time", "600").start()
        done = storescu(node.port, sent[:6])
        assert done.returncode == 0, done.stdout + done.stderr
        assert node.stop(signal.SIGKILL) == -signal.SIGKILL
        [incoming] = list((node.spool / "incoming").iterdir())
        assert len(list(incoming.glob("*.dcm"))) == 6

        node = Node(tmp_path, node.port, *args, "--quiet-time", "2").start()
        done = storescu(node.port, sent[6:])
        assert done.returncode == 0, done.stdout + done.stderr
        derived = wait_for_derived(destination, sent, 120, node)
        assert len(derived) == 10 and len({str(ds.SeriesInstanceUID) for ds in derived}) == 1
        assert "1 series still arriving" in node.text()
        assert node.stop() == 0


@pytest.mark.slow
def test_sigkill_while_denoising_then_restart_delivers(tmp_path, shared_data):
    """Killed after the real 20-slice series was claimed (while it is being denoised): on restart the half-written
    output is dropped and the batch is done again, all 20 delivered."""
    sent = write_abdomen_series(shared_data, tmp_path / "in")
    dest_port = free_port()
    args = ("--forward", f"DEST@127.0.0.1:{dest_port}", "--quiet-time", "0.5")
    node = Node(tmp_path, free_port(), *args).start()
    done = storescu(node.port, sent)
    assert done.returncode == 0, done.stdout + done.stderr
    # denoise writes out.partial/ (staging each series in a hidden folder inside it, 8 slices at a time) and the node
    # renames it to out/ when complete
    wait_for(lambda: any((node.spool / "work").glob("*/out.partial/**/*.dcm")), 300, "denoising to be under way",
             node.proc, node.log)
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    [batch] = list((node.spool / "work").iterdir())
    assert len(list((batch / "in").glob("*.dcm"))) == 20
    assert not (batch / "out").exists()  # killed before the derived series was complete
    with storescp(tmp_path / "destination", dest_port) as destination:  # down at first: only up after the restart
        node = Node(tmp_path, node.port, *args).start()
        derived = wait_for_derived(destination, sent, 300, node)
        assert len(derived) == 20
        assert "1 batch(es) to process" in node.text()
        assert node.stop() == 0


def test_destination_down_then_up(tmp_path):
    """The destination refuses connections: the series waits in the spool with the reason and is retried; once the
    destination is up the next retry delivers it."""
    sent = write_ct_small_series(tmp_path / "in", n=3)
    dest_port = free_port()
    node = Node(tmp_path, free_port(), "--forward", f"DEST@127.0.0.1:{dest_port}", "--quiet-time", "0.5",
                "--retry-delay", "1", "--retries", "8").start()
    try:
        done = storescu(node.port, sent)
        assert done.returncode == 0, done.stdout + done.stderr
        # An attempt is counted when it STARTS (a crash mid-denoise must count), so wait for its recorded failure.
        wait_for(lambda: any(s["attempts"] >= 1 and s["denoised"] and s["errors"] for s in states(node.spool / "work")),
                 120, "a failed forward attempt", node.proc, node.log)
        [state] = states(node.spool / "work")
        assert state["denoised"] and not state["forwarded"]
        assert f"DEST@127.0.0.1:{dest_port} could not be reached" in state["errors"][0]
        with storescp(tmp_path / "destination", dest_port) as destination:
            derived = wait_for_derived(destination, sent, 120, node)
        assert len(derived) == 3 and "retrying in" in node.text()
        wait_for(lambda: not any((node.spool / "work").iterdir()), 240, "the spool to be emptied")  # backoff under load
    finally:
        assert node.stop() == 0


@pytest.mark.slow
def test_bounded_retries_keep_the_series_with_its_reason(tmp_path):
    """With --retries 2 and the destination down for good, the batch ends in failed/ with every received instance
    and the reason; --retry-failed on the next start delivers it once the destination is up."""
    sent = write_ct_small_series(tmp_path / "in", n=3)
    dest_port = free_port()
    args = ("--forward", f"DEST@127.0.0.1:{dest_port}", "--quiet-time", "0.5", "--retry-delay", "0.2",
            "--retries", "2")
    node = Node(tmp_path, free_port(), *args).start()
    done = storescu(node.port, sent)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: states(node.spool / "failed"), 120, "the batch to be given up", node.proc, node.log)
    [state] = states(node.spool / "failed")
    assert state["attempts"] == 2 and len(state["errors"]) == 2
    assert "could not be reached" in state["failed_reason"]
    [batch] = list((node.spool / "failed").iterdir())
    assert len(list((batch / "in").glob("*.dcm"))) == 3 and len(list((batch / "out").glob("*.dcm"))) == 3
    assert "failed for good after 2 attempt(s)" in node.text()
    made_before = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in (batch / "out").glob("*.dcm")}
    assert node.stop() == 0

    with storescp(tmp_path / "destination", dest_port) as destination:
        node = Node(tmp_path, node.port, *args, "--retry-failed").start()
        derived = wait_for_derived(destination, sent, 120, node)
        assert len(derived) == 3
        # denoised once, before the failures: the very instances kept in failed/ arrive, not a second series
        assert {str(ds.SOPInstanceUID) for ds in derived} == made_before
        assert not any((node.spool / "failed").iterdir())
        assert node.stop() == 0
