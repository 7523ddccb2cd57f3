"""When is a series complete?  DICOM does not say, so the node uses the usual router rule: every association that
sent instances of the series has ended (released, aborted or dropped) and no new instance has arrived for
``quiet_s`` seconds.

Receiving and claiming go through the same lock, so an instance arriving while its series is being claimed either
makes it into the claimed batch or starts a new series folder: it is never left behind in a folder nobody will look
at again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ldct_tf.node.spool import Spool

log = logging.getLogger("ldct_tf.node")


@dataclass
class Activity:
    first: float
    last: float
    open_associations: set[int] = field(default_factory=set)
    instances: int = 0


class SeriesTracker:
    """Series still arriving, keyed by series key; thread-safe."""

    def __init__(self, spool: Spool, quiet_s: float, clock: Callable[[], float] = time.time):
        self.spool = spool
        self.quiet_s = quiet_s
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, Activity] = {}
        self._by_association: dict[int, set[str]] = {}
        self.wake = threading.Event()  # set when an association ends: the worker looks sooner

    def receive(self, tmp_path: Path, series: str, instance: str, association: int) -> Path:
        """Commit a written instance into the spool and note its association; returns its spool path."""
        with self._lock:
            path, replaced = self.spool.commit(tmp_path, series, instance)
            now = self.clock()
            activity = self._series.setdefault(series, Activity(first=now, last=now))
            activity.last = now
            if replaced:  # a re-send is normal, but an operator must be able to see it happened
                log.warning("series %s: an instance was received again and replaced the earlier copy", series)
            else:
                activity.instances += 1
            activity.open_associations.add(association)
            self._by_association.setdefault(association, set()).add(series)
        return path

    def association_ended(self, association: int) -> None:
        with self._lock:
            for series in self._by_association.pop(association, set()):
                activity = self._series.get(series)
                if activity is not None:
                    activity.open_associations.discard(association)
                    activity.last = max(activity.last, self.clock())
        self.wake.set()

    def add_recovered(self, series: str) -> None:
        """A series found in ``incoming`` at start: its sender may still add to it, so it waits ``quiet_s`` too."""
        with self._lock:
            now = self.clock()
            self._series.setdefault(series, Activity(first=now, last=now))

    def pending(self) -> int:
        with self._lock:
            return len(self._series)

    def next_due_in(self) -> Optional[float]:
        """Seconds until the earliest series could be complete (None: nothing pending or all still open)."""
        with self._lock:
            waits = [a.last + self.quiet_s - self.clock() for a in self._series.values() if not a.open_associations]
        return max(0.0, min(waits)) if waits else None

    def claim_ready(self) -> list[tuple[str, str, Activity]]:
        """Claim every complete series into a batch; returns ``[(series, batch, activity)]``.  A series the spool
        cannot claim (a full disk) stays pending and is tried again, so it is never forgotten."""
        claimed = []
        with self._lock:
            now = self.clock()
            for series, activity in list(self._series.items()):
                if activity.open_associations or now - activity.last < self.quiet_s:
                    continue
                try:
                    batch = self.spool.claim(series, activity.first, activity.last)
                except OSError as exc:
                    log.error("series %s complete but cannot be claimed (%s); trying again in %.0f s", series,
                              exc.strerror or exc, self.quiet_s)
                    activity.last = now
                    continue
                del self._series[series]
                if batch is not None:
                    claimed.append((series, batch, activity))
        return claimed
