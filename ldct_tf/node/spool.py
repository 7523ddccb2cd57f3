"""The node's on-disk spool: every received instance is here, fsync'ed, before its C-STORE is acknowledged.

Layout (everything below SPOOL is the node's own; nothing else is touched)::

    SPOOL/.ldct_node_spool           marker + the salt of the series keys (a folder without it is refused)
    SPOOL/.lock                      flock'ed while a node runs: two nodes on one spool would claim the same series
    SPOOL/tmp/                       instances being received (not yet acknowledged; emptied on start)
    SPOOL/incoming/<series>/<instance>.dcm    acknowledged instances of series that are still arriving
    SPOOL/work/<batch>/in/           a claimed series (a "batch"): moved here in one rename
    SPOOL/work/<batch>/out/          its derived series, complete (written as out.partial/, then renamed)
    SPOOL/work/<batch>/state.json    attempts, errors, which steps are done (denoised, stored, forwarded)
    SPOOL/failed/<batch>/            a batch given up on, with state.json saying why (nothing is deleted)
    SPOOL/done/<batch>/              finished batches, only with --keep-done (otherwise they are deleted)

Why renames: a rename inside one file system is atomic, so after a crash every instance is either wholly in
``incoming`` or ``work`` or not acknowledged at all, and every batch's ``out`` is either complete or absent.
Names are salted SHA-256 prefixes of the UIDs, so that neither file names nor logs carry identifiers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ldct_tf.errors import LdctError

MARKER = ".ldct_node_spool"
SUBFOLDERS = ("tmp", "incoming", "work", "failed", "done")


class SpoolError(LdctError):
    """The spool folder cannot be used (not a node spool, in use, not writable)."""


@dataclass
class BatchState:
    """What is known about one batch; saved as ``state.json`` after every change."""

    series: str
    instances: int
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    denoised: bool = False
    stored: bool = False
    forwarded: bool = False
    slices: int = 0
    skipped: list[str] = field(default_factory=list)  # "<file>: <reason>" of instances denoise could not use
    failed_reason: str = ""
    # timing (Unix seconds / seconds): what the benchmark reads from done/<batch>/state.json
    first_received: float = 0.0
    last_received: float = 0.0
    claimed: float = 0.0
    denoise_s: float = 0.0
    forward_s: float = 0.0
    finished: float = 0.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool folder: atomic receive, claim, state and recovery.  Thread-safe (receives come from many
    association threads, claims from the worker)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._lock_file = None
        self.salt = ""

    # ------------------------------------------------------------------------------------------ opening
    def open(self) -> "Spool":
        """Create or reopen the spool and lock it; raises :class:`SpoolError` with one clear line."""
        marker = self.root / MARKER
        if self.root.exists() and not self.root.is_dir():
            raise SpoolError(f"{self.root}: spool exists and is not a folder")
        if self.root.is_dir() and not marker.exists() and any(self.root.iterdir()):
            raise SpoolError(f"{self.root}: not empty and not a node spool (no {MARKER}); choose a new or empty "
                             f"folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                marker.write_text(json.dumps({"salt": secrets.token_hex(16)}) + "\n")
            self.salt = json.loads(marker.read_text())["salt"]
            for name in SUBFOLDERS:
                (self.root / name).mkdir(exist_ok=True)
            self._lock_file = open(self.root / ".lock", "a+")
        except (OSError, ValueError, KeyError) as exc:
            raise SpoolError(f"{self.root}: cannot use as spool: {exc}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise SpoolError(f"{self.root}: spool in use by another running node") from None
        return self

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def key(self, uid: str, length: int = 16) -> str:
        """A salted pseudonym of a UID: the series key in logs and folder names, the instance's file name."""
        return hashlib.sha256(f"{self.salt}:{uid}".encode()).hexdigest()[:length]

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def done(self) -> Path:
        return self.root / "done"

    # ------------------------------------------------------------------------------------------ receiving
    def write_instance(self, data: bytes) -> Path:
        """Write one received instance to ``tmp`` and fsync it; :meth:`commit` then moves it into its series."""
        path = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:  # a full disk: the half-written part must not keep holding the space
            path.unlink(missing_ok=True)
            raise
        return path

    def commit(self, tmp_path: Path, series: str, instance: str) -> tuple[Path, bool]:
        """Move a written instance into ``incoming/<series>/``; returns (its path, whether it replaced an earlier
        copy of the same instance, as a PACS replaces a re-sent instance)."""
        with self._lock:
            folder = self.incoming / series
            created = not folder.exists()
            folder.mkdir(exist_ok=True)
            target = folder / f"{instance}.dcm"
            replaced = target.exists()
            os.replace(tmp_path, target)
            _fsync_dir(folder)
            if created:
                _fsync_dir(self.incoming)
        return target, replaced

    def discard(self, tmp_path: Path) -> None:
        tmp_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ batches
    def claim(self, series: str, first_received: float, last_received: float) -> Optional[str]:
        """Move ``incoming/<series>`` to a new batch ``work/<batch>/in`` in one rename; None if nothing is there."""
        with self._lock:
            source = self.incoming / series
            if not source.is_dir():
                return None
            count = sum(1 for _ in source.glob("*.dcm"))
            batch = f"{series}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
            folder = self.work / batch
            # state.json first, the rename last: a full disk fails before anything moved, and the series stays in
            # incoming/ for the caller to claim again once there is space
            try:
                folder.mkdir()
                self.save_state(batch, BatchState(series=series, instances=count, first_received=first_received,
                                                  last_received=last_received, claimed=time.time()))
                os.rename(source, folder / "in")
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            try:
                _fsync_dir(self.incoming)
            except OSError:  # the rename happened; the batch exists and must be processed
                pass
        return batch

    def batch_dir(self, batch: str) -> Path:
        return self.work / batch

    def load_state(self, batch: str) -> BatchState:
        path = self.work / batch / "state.json"
        try:
            data = json.loads(path.read_text())
            return BatchState(**data)
        except (OSError, ValueError, TypeError):  # a crash between mkdir and the first save: rebuild it
            count = sum(1 for _ in (self.work / batch / "in").glob("*.dcm"))
            return BatchState(series=batch.split("-", 1)[0], instances=count)

    def save_state(self, batch: str, state: BatchState, where: Optional[Path] = None) -> None:
        folder = where or (self.work / batch)
        tmp = folder / "state.json.tmp"
        try:
            tmp.write_text(json.dumps(asdict(state), indent=1) + "\n")
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, folder / "state.json")

    def finish(self, batch: str, keep: bool) -> None:
        """A batch delivered: moved to ``done/`` with ``keep``, else deleted (the node created every file in it)."""
        folder = self.work / batch
        if keep:
            os.rename(folder, self.done / batch)
        else:
            shutil.rmtree(folder)

    def fail(self, batch: str, state: BatchState) -> Path:
        """Give up on a batch: it moves to ``failed/`` whole (inputs, any outputs, state.json with the reason)."""
        self.save_state(batch, state)
        target = self.failed / batch
        os.rename(self.work / batch, target)
        return target

    def keep_unused(self, batch: str, files: list[Path], state: BatchState) -> Path:
        """Instances denoise could not use (a scout in a series, an undecodable file) are copied to
        ``failed/<batch>-unused/`` with the reasons, so that finishing the batch does not delete them."""
        target = self.failed / f"{batch}-unused"
        (target / "in").mkdir(parents=True, exist_ok=True)
        for path in files:
            if path.exists():
                shutil.copy2(path, target / "in" / path.name)
        self.save_state(batch, state, where=target)
        return target

    # ------------------------------------------------------------------------------------------ recovery
    def recover(self) -> tuple[list[str], list[str]]:
        """After a start (or a crash): drop unacknowledged partial files and half-written outputs; return
        (series still in ``incoming``, batches in ``work``) for the caller to schedule."""
        for path in self.tmp.iterdir():
            if path.is_file():
                path.unlink()
        batches = []
        for folder in sorted(self.work.iterdir()):
            if not folder.is_dir():
                continue
            partial = folder / "out.partial"
            if partial.exists():
                shutil.rmtree(partial)
            if not (folder / "in").is_dir():  # crashed between mkdir and the rename: nothing was moved yet
                shutil.rmtree(folder)
                continue
            batches.append(folder.name)
        series = sorted(p.name for p in self.incoming.iterdir() if p.is_dir() and any(p.glob("*.dcm")))
        return series, batches

    def requeue_failed(self) -> list[str]:
        """``--retry-failed``: move failed batches back into ``work`` with their attempts reset."""
        moved = []
        for folder in sorted(self.failed.iterdir()):
            if not folder.is_dir() or folder.name.endswith("-unused") or not (folder / "in").is_dir():
                continue
            os.rename(folder, self.work / folder.name)
            state = self.load_state(folder.name)
            state.attempts, state.failed_reason = 0, ""
            self.save_state(folder.name, state)
            moved.append(folder.name)
        return moved
