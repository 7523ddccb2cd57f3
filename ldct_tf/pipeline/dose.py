"""Which slices are low-dose and which normal-dose: a manifest CSV, or rules on DICOM tags.

Headers alone often cannot say it: the Mayo quarter-dose images carry the same mA and CTDIvol as the full-dose ones,
because the noise was inserted after the scan.  So a manifest written by whoever knows the data wins; tag rules are
the fallback for clinical archives where low-dose protocols really are acquired at lower exposure.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from ldct_tf.records import SPLITS
from ldct_tf.errors import LdctError

DOSES = ("low", "normal")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")


class DoseManifestError(LdctError, ValueError):
    """The dose manifest CSV cannot be used (message names the file, line and problem)."""


def is_remote(path: str) -> bool:
    return "://" in path


def normalise_path(path: str) -> str:
    """Canonical form used to compare input paths with manifest entries."""
    if is_remote(path):
        return path.rstrip("/")
    return os.path.normpath(os.path.abspath(path))


@dataclass(frozen=True)
class ManifestEntry:
    dose: str
    patient: Optional[str] = None  # optional grouping key that replaces PatientID (e.g. for anonymised archives)
    split: Optional[str] = None  # optional fixed split (e.g. a hold-out patient named by a study protocol)
    line: int = field(default=0, compare=False)  # CSV line, to name the entry in warnings without its path


@dataclass(frozen=True)
class DoseManifest:
    """Dose (and optionally the patient) by path (a file, or a folder covering everything under it) or by
    SeriesInstanceUID.

    Precedence for one slice: an entry naming its file exactly, then one naming its SeriesInstanceUID, then the
    longest folder entry that contains it.  The optional ``patient`` column exists because anonymised archives often
    set every PatientID to the same placeholder (the Mayo data says "Anonymous" for all patients), which would put
    every patient in one split.  The optional ``split`` column fixes an entry's split (train/val/test) instead of
    deriving it from the patient pseudonym, for studies whose protocol names the hold-out patients.
    """

    by_path: dict[str, ManifestEntry] = field(default_factory=dict)
    by_series: dict[str, ManifestEntry] = field(default_factory=dict)

    def lookup(self, path: str, series_uid: str) -> Optional[ManifestEntry]:
        path = normalise_path(path)
        if path in self.by_path:
            return self.by_path[path]
        if series_uid and series_uid in self.by_series:
            return self.by_series[series_uid]
        best, best_len = None, -1
        for prefix, entry in self.by_path.items():
            if path.startswith(prefix + "/") and len(prefix) > best_len:
                best, best_len = entry, len(prefix)
        return best

    @classmethod
    def load(cls, csv_path: str) -> "DoseManifest":
        """Read a ``path,dose[,patient][,split]`` CSV; relative paths are relative to the CSV's folder."""
        try:
            with FileSystems.open(csv_path) as handle:
                text = handle.read().decode("utf-8-sig")
        except Exception as exc:
            raise DoseManifestError(f"{csv_path}: cannot read dose manifest: {exc}") from exc
        base = os.path.dirname(csv_path) if not is_remote(csv_path) else csv_path.rsplit("/", 1)[0]
        reader = csv.DictReader(io.StringIO(text))
        header = [f.strip().lower() for f in (reader.fieldnames or [])]
        if header[:2] != ["path", "dose"] or not set(header) <= {"path", "dose", "patient", "split"}:
            raise DoseManifestError(f"{csv_path}: header must be 'path,dose' (optionally ',patient' and ',split'), "
                                    f"got {header}")
        reader.fieldnames = header
        by_path: dict[str, ManifestEntry] = {}
        by_series: dict[str, ManifestEntry] = {}
        for line, row in enumerate(reader, start=2):
            raw_path = (row.get("path") or "").strip()
            dose = (row.get("dose") or "").strip().lower()
            if not raw_path:
                raise DoseManifestError(f"{csv_path}:{line}: empty path")
            if dose not in DOSES:
                raise DoseManifestError(f"{csv_path}:{line}: dose must be 'low' or 'normal', got {dose!r}")
            split = (row.get("split") or "").strip().lower() or None
            if split is not None and split not in SPLITS:
                raise DoseManifestError(f"{csv_path}:{line}: split must be one of {SPLITS} or empty, got {split!r}")
            entry = ManifestEntry(dose, (row.get("patient") or "").strip() or None, split, line)
            resolved = raw_path if (is_remote(raw_path) or os.path.isabs(raw_path)) else f"{base}/{raw_path}"
            if _UID_RE.match(raw_path) and not FileSystems.exists(resolved):
                target, key = by_series, raw_path
            else:
                if not is_remote(resolved) and not os.path.exists(resolved):
                    raise DoseManifestError(f"{csv_path}:{line}: {raw_path!r} does not exist (resolved to {resolved})")
                target, key = by_path, normalise_path(resolved)
            if target.get(key, entry) != entry:
                raise DoseManifestError(f"{csv_path}:{line}: {raw_path!r} is listed twice with different values")
            target[key] = entry
        if not by_path and not by_series:
            raise DoseManifestError(f"{csv_path}: the dose manifest has no entries")
        return cls(by_path, by_series)


@dataclass(frozen=True)
class DoseRules:
    """Dose from DICOM tags: series-description patterns first, then CTDIvol thresholds, then exposure thresholds.

    A value between a low-dose maximum and a normal-dose minimum matches neither: the slice is rejected as
    ``dose_unknown`` rather than guessed.
    """

    low_description: Optional[str] = None
    normal_description: Optional[str] = None
    low_max_ctdivol: Optional[float] = None
    normal_min_ctdivol: Optional[float] = None
    low_max_mas: Optional[float] = None
    normal_min_mas: Optional[float] = None

    def __post_init__(self) -> None:
        for pattern in (self.low_description, self.normal_description):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"bad series-description pattern {pattern!r}: {exc}") from exc
        thresholds = {"--low-dose-max-ctdivol": self.low_max_ctdivol, "--normal-dose-min-ctdivol": self.normal_min_ctdivol,
                      "--low-dose-max-mas": self.low_max_mas, "--normal-dose-min-mas": self.normal_min_mas}
        for option, value in thresholds.items():
            # NaN compares false with everything, so a NaN rule silently matched nothing (issue 27); inf matched all.
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{option} must be a finite number, got {value}")
        for low, normal, what in ((self.low_max_ctdivol, self.normal_min_ctdivol, "CTDIvol"),
                                  (self.low_max_mas, self.normal_min_mas, "exposure")):
            if low is not None and normal is not None and low >= normal:
                raise ValueError(f"low-dose {what} maximum {low} must be below the normal-dose minimum {normal}")

    @property
    def empty(self) -> bool:
        return all(v is None for v in vars(self).values())

    def classify(self, series_description: str, ctdivol: float, exposure_mas: float) -> Optional[str]:
        desc = series_description or ""
        low = bool(self.low_description and re.search(self.low_description, desc, re.IGNORECASE))
        normal = bool(self.normal_description and re.search(self.normal_description, desc, re.IGNORECASE))
        if low != normal:
            return "low" if low else "normal"
        for value, low_max, normal_min in ((ctdivol, self.low_max_ctdivol, self.normal_min_ctdivol),
                                           (exposure_mas, self.low_max_mas, self.normal_min_mas)):
            if value is None or math.isnan(value):
                continue
            if low_max is not None and value <= low_max:
                return "low"
            if normal_min is not None and value >= normal_min:
                return "normal"
        return None


@dataclass(frozen=True)
class DoseClassifier:
    """Manifest first, rules as the fallback.

    ``classify`` returns ``(dose, patient_override)``; dose ``None`` means unknown (the caller rejects the slice).
    """

    manifest: Optional[DoseManifest] = None
    rules: DoseRules = DoseRules()

    def classify(self, path: str, series_uid: str, series_description: str, ctdivol: float,
                 exposure_mas: float) -> tuple[Optional[str], Optional[str]]:
        entry = self.manifest.lookup(path, series_uid) if self.manifest is not None else None
        if entry is not None:
            return entry.dose, entry.patient
        return self.rules.classify(series_description, ctdivol, exposure_mas), None

    def fixed_split(self, path: str, series_uid: str) -> Optional[str]:
        """The manifest's ``split`` for this slice, if it names one."""
        entry = self.manifest.lookup(path, series_uid) if self.manifest is not None else None
        return entry.split if entry is not None else None
