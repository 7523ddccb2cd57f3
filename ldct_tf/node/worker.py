"""The series worker: claims complete series, denoises them through ``ldct_tf.denoise``, stores and forwards them.

One thread does the denoising, so the model (local SavedModel or TF Serving client) is called from one place at a
time; receiving goes on in the association threads meanwhile.  Each batch goes through three steps, each recorded
in its ``state.json`` once done, so that a retry (or a restart after a crash) redoes only what is missing:

1. denoise ``in/`` into ``out.partial/``, renamed to ``out/`` when complete (the derived series keeps its new UIDs
   across retries, so a destination that already got part of it does not end up with two series);
2. ``--store``: copy ``out/`` to ``STORE/<batch>/`` (via a hidden partial folder, then a rename);
3. ``--forward``: C-STORE every derived instance to the destination.

Step 1 also logs each derived series' audit flags and adds the audit as a Secondary Capture summary
(``ldct_tf.audit.dicom_object``, in ``out/.../audit/``), which steps 2 and 3 store and forward with the series.

An attempt is counted (and saved) *before* its first step starts, so an attempt that kills the process (an OOM
kill during denoising, kill -9) counts too: a batch that crashes the node cannot loop forever across restarts.
After ``max_attempts`` failed or unfinished attempts (or at once for a series with nothing to denoise) the batch
moves to ``failed/`` with its reasons.  Retries wait ``retry_delay_s * 2**(attempt-1)`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldct_tf import denoise
from ldct_tf.audit import dicom_object
from ldct_tf.node.forward import Destination, send_series
from ldct_tf.node.spool import BatchState, Spool
from ldct_tf.node.tracker import SeriesTracker
from ldct_tf.errors import LdctError

log = logging.getLogger("ldct_tf.node")


class PermanentFailure(LdctError):
    """Retrying cannot help (nothing in the series is usable CT)."""


@dataclass
class WorkerOptions:
    ae_title: str
    forward: Optional[Destination] = None
    store: Optional[Path] = None
    batch_size: int = denoise.DEFAULT_BATCH_SIZE
    max_attempts: int = 5
    retry_delay_s: float = 30.0
    keep_done: bool = False
    forward_timeout_s: float = 60.0
    forward_tls: Optional[ssl.SSLContext] = None


def run_denoise(input_dir: Path, output_dir: Path, denoiser: denoise.Denoiser, model: denoise.ModelInfo,
                batch_size: int) -> denoise.DenoiseSummary:
    """The node's only call into the DICOM-in/DICOM-out path (the same code as ``python -m ldct_tf.denoise``)."""
    return denoise.denoise(input_dir, output_dir, denoiser, model, batch_size=batch_size, overwrite=True,
                           progress=False)


def derived_files(out: Path) -> list[Path]:
    """The derived DICOM instances in ``out`` (denoise names them after their inputs, ``<key>.dcm``), the CT images
    first, then the audit object; any other file denoise writes beside them (a sidecar) is stored but never sent."""
    files = (p for p in out.rglob("*.dcm") if p.is_file())
    return sorted(files, key=lambda p: (p.name == dicom_object.OBJECT_NAME, p))


class SeriesWorker(threading.Thread):
    def __init__(self, spool: Spool, tracker: SeriesTracker, denoiser: denoise.Denoiser, model: denoise.ModelInfo,
                 options: WorkerOptions):
        super().__init__(name="series-worker", daemon=True)
        self.spool, self.tracker = spool, tracker
        self.denoiser, self.model, self.options = denoiser, model, options
        self.stopping = threading.Event()
        self._due: dict[str, float] = {}  # batch -> when it may be tried (Unix seconds)

    # ---------------------------------------------------------------------------------------- scheduling
    def schedule(self, batch: str, when: float = 0.0) -> None:
        self._due[batch] = when

    def stop(self) -> None:
        self.stopping.set()
        self.tracker.wake.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                for series, batch, activity in self.tracker.claim_ready():
                    log.info("series %s complete: %d instance(s) received, batch %s", series, activity.instances,
                             batch)
                    self.schedule(batch)
            except OSError as exc:  # the spool cannot be written: the instances stay where they are; try again
                log.error("cannot claim a complete series: %s", exc)
                self.stopping.wait(5.0)
                continue
            now = time.time()
            ready = sorted((when, batch) for batch, when in self._due.items() if when <= now)
            if ready:
                batch = ready[0][1]
                del self._due[batch]
                try:
                    self.process(batch)
                except Exception as exc:  # never let one batch stop the node; it stays in work/ for a restart
                    log.error("batch %s: unexpected %s: %s (kept in the spool)", batch, type(exc).__name__, exc)
                continue
            waits = [w for w in (self.tracker.next_due_in(), *(when - now for when in self._due.values()))
                     if w is not None]
            self.tracker.wake.wait(min([1.0, *waits]) if waits else 1.0)
            self.tracker.wake.clear()

    # ---------------------------------------------------------------------------------------- one batch
    def process(self, batch: str) -> None:
        folder = self.spool.batch_dir(batch)
        state = self.spool.load_state(batch)
        if state.attempts >= self.options.max_attempts:  # every earlier attempt ended without a result: a crash
            self._give_up(batch, state, f"{state.attempts} attempt(s) started and none finished (the node was "
                                        f"stopped or killed during them, e.g. out of memory)")
            return
        state.attempts += 1
        try:
            self.spool.save_state(batch, state)
        except OSError as exc:  # cannot even record the attempt: wait and try again, nothing has started
            state.attempts -= 1
            self._retry_later(batch, state, exc)
            return
        try:
            if not state.denoised:
                self._denoise(batch, folder, state)
            files = derived_files(folder / "out")
            if self.options.store is not None and not state.stored:
                self._store(batch, folder / "out")
                state.stored = True
                self.spool.save_state(batch, state)
            if self.options.forward is not None and not state.forwarded:
                started = time.time()
                send_series(files, self.options.forward, self.options.ae_title, self.options.forward_timeout_s,
                            self.options.forward_tls)
                state.forward_s = time.time() - started
                state.forwarded = True
                self.spool.save_state(batch, state)
                log.info("batch %s: forwarded %d instance(s) to %s in %.1f s", batch, len(files),
                         self.options.forward, state.forward_s)
        except Exception as exc:  # any failure of a step counts as an attempt (DenoiseError, ForwardError, OSError...)
            self._failed_attempt(batch, state, exc)
            return
        state.finished = time.time()
        self.spool.save_state(batch, state)
        self.spool.finish(batch, keep=self.options.keep_done)
        log.info("batch %s done: %d slice(s), %.1f s from first instance received to delivered", batch,
                 state.slices, state.finished - state.first_received if state.first_received else float("nan"))

    def _denoise(self, batch: str, folder: Path, state: BatchState) -> None:
        partial, out = folder / "out.partial", folder / "out"
        if partial.exists():
            shutil.rmtree(partial)
        started = time.time()
        summary = run_denoise(folder / "in", partial, self.denoiser, self.model, self.options.batch_size)
        state.skipped = [f"{Path(s.path).name}: {s.reason}" for s in summary.skipped]
        if summary.slices == 0:
            shutil.rmtree(partial, ignore_errors=True)
            reasons = "; ".join(state.skipped[:3]) or "no files"
            raise PermanentFailure(f"no usable CT slices in the series ({reasons})")
        self._audit(batch, summary)
        os.rename(partial, out)
        state.denoise_s, state.slices, state.denoised = time.time() - started, summary.slices, True
        self.spool.save_state(batch, state)
        log.info("batch %s: denoised %d slice(s) in %.1f s (%s v%s via %s)", batch, summary.slices,
                 state.denoise_s, self.model.name, self.model.version, self.model.where)
        if summary.skipped:
            unused = [folder / "in" / Path(s.path).name for s in summary.skipped]
            target = self.spool.keep_unused(batch, unused, BatchState(
                series=state.series, instances=len(unused), skipped=state.skipped,
                failed_reason="not denoised (see skipped)"))
            log.warning("batch %s: %d instance(s) not usable CT, kept in %s", batch, len(unused), target)

    def _audit(self, batch: str, summary: denoise.DenoiseSummary) -> None:
        """Log each derived series' audit flags (counts and instance numbers only) and add the audit as a DICOM
        object to the series (``ldct_tf.audit.dicom_object``), so that it is stored and forwarded with it."""
        for sidecar in summary.audits:
            try:
                report = json.loads(sidecar.read_text())
            except (OSError, ValueError) as exc:
                log.error("batch %s: cannot read the audit: %s", batch, exc)
                continue
            counts = dicom_object.flag_counts(report)
            by = counts["by"]
            level = logging.WARNING if counts["flagged_slices"] else logging.INFO
            log.log(level, "batch %s: audit flagged %d of %d slice(s), %d patch(es) (FRC %d, blob %d, anatomy %d)%s",
                    batch, counts["flagged_slices"], counts["slices"], counts["flagged_patches"], by["frc"],
                    by["blob"], by["anatomy"], "; flagged instance number(s) " + ", ".join(
                        map(str, counts["instances"])) if counts["instances"] else "")
            try:
                dicom_object.write_audit_object(sidecar.parent.parent)
            except (dicom_object.AuditObjectError, ValueError, OSError) as exc:
                log.error("batch %s: the audit object was not made (%s: %s); the series goes without it", batch,
                          type(exc).__name__, exc)

    def _store(self, batch: str, out: Path) -> None:
        store = self.options.store
        assert store is not None
        target = store / batch
        if target.exists():  # stored by an attempt that crashed before it could record it
            return
        partial = store / f".{batch}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        shutil.copytree(out, partial)
        os.rename(partial, target)
        log.info("batch %s: stored in %s", batch, target)

    def _failed_attempt(self, batch: str, state: BatchState, exc: Exception) -> None:
        """The attempt (already counted by :meth:`process`) failed: retry later, or give up."""
        reason = f"{type(exc).__name__}: {exc}"
        state.errors.append(reason)
        if isinstance(exc, PermanentFailure) or state.attempts >= self.options.max_attempts:
            self._give_up(batch, state, reason)
            return
        self.spool.save_state(batch, state)
        self._retry_later(batch, state, exc)

    def _retry_later(self, batch: str, state: BatchState, exc: Exception) -> None:
        delay = self.options.retry_delay_s * 2 ** max(0, state.attempts - 1)
        self.schedule(batch, time.time() + delay)
        log.warning("batch %s attempt %d of %d failed: %s: %s; retrying in %.0f s", batch, state.attempts,
                    self.options.max_attempts, type(exc).__name__, exc, delay)

    def _give_up(self, batch: str, state: BatchState, reason: str) -> None:
        state.failed_reason = reason
        target = self.spool.fail(batch, state)
        log.error("batch %s failed for good after %d attempt(s): %s; kept in %s", batch, state.attempts, reason,
                  target)
