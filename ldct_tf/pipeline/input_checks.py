"""Checks on the run's inputs as a whole: duplicate slices, dose-manifest entries that match nothing, placeholder
patient IDs.  Each of these used to pass silently and give a wrong dataset:

- the same folder given three times wrote every slice three times, so :class:`DeduplicateSlices` keeps one slice per
  SOP Instance UID (and frame) and counts the rest; copies with different pixels are all rejected;
- a dose-manifest entry with a typo (or for data not passed as ``--input``) matched nothing and was ignored, so
  :func:`manifest_warnings` names every such entry by its CSV line;
- anonymised archives often give every patient the same PatientID (the Mayo data says "Anonymous"), which puts every
  slice into one split; :class:`InputFacts` gathers (as salted hashes, never the values) how many patients and
  studies the run saw so that :func:`patient_warnings` can say so and point at the manifest's ``patient`` column.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from typing import Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from ldct_tf.pipeline.dose import DoseManifest

NAMESPACE = "ldct_tf"
DUPLICATES = "duplicates"
CONFLICTING_DUPLICATE = "conflicting_duplicate"

#: PatientID values that anonymisers write for everybody (matched case-insensitively, whole value).
PLACEHOLDER_ID = re.compile(r"(anonymous|anonymi[sz]ed|anon|unknown|none|null|n/?a|test|patient|x+|0+|-+|\*+)",
                            re.IGNORECASE)


def _hash(value: str, salt: str, kind: str) -> str:
    return hashlib.sha256(f"{salt}\x00input-check-{kind}\x00{value}".encode("utf-8")).hexdigest()[:20]


def instance_key(item) -> str:
    """SOP Instance UID and frame; files without a SOP Instance UID fall back to their path (the same file listed
    twice is still one slice)."""
    info = item.info
    return f"sop:{info.sop_uid}:{info.frame}" if info.sop_uid else f"path:{info.source}:{info.frame}"


def content_hash(item) -> str:
    """A short SHA-256 of a slice's HU pixels: says whether two copies differ, and nothing about the patient."""
    return hashlib.sha256(item.hu.tobytes()).hexdigest()[:16]


class _KeepFirst(beam.DoFn):
    """Identical copies of one instance: keep one, count the others (a ``1`` on ``duplicates``).  Copies with
    DIFFERENT pixels (issue 27: a normal-dose image ended up in val/low because the first path won): no copy can be
    trusted, so every one is a rejection (a dict on ``duplicates``) naming all the copies' content hashes."""

    def process(self, element) -> Iterable:
        _, items = element
        items = sorted(items, key=lambda s: s.info.source)  # deterministic: the smallest path wins
        hashes = [content_hash(item) for item in items]
        if len(set(hashes)) > 1:
            detail = (f"{len(items)} inputs share one SOP Instance UID with different pixels (content sha256 "
                      f"{', '.join(hashes)}); none was converted")
            for item in items:
                Metrics.counter(NAMESPACE, f"rejected_{CONFLICTING_DUPLICATE}").inc()
                yield beam.pvalue.TaggedOutput(DUPLICATES, {"path": item.info.source, "reason": CONFLICTING_DUPLICATE,
                                                            "detail": detail})
            return
        yield items[0]
        for _ in items[1:]:
            Metrics.counter(NAMESPACE, "duplicate_slices_dropped").inc()
            yield beam.pvalue.TaggedOutput(DUPLICATES, 1)


class DeduplicateSlices(beam.PTransform):
    """Slices -> one Slice per SOP Instance UID (and frame); each dropped identical copy is a ``1`` on the
    ``duplicates`` output, so the summary can count them, and each copy of a conflicting instance a rejection dict."""

    def expand(self, slices):
        from ldct_tf.pipeline.transforms import with_rejected  # one multi-output idiom for every runner (see there)

        grouped = (slices
                   | "KeyByInstance" >> beam.Map(lambda s: (instance_key(s), s))
                   | "GroupInstances" >> beam.GroupByKey())
        return with_rejected(grouped, _KeepFirst(), tag=DUPLICATES)


class _FactsFn(beam.CombineFn):
    """Sets of salted hashes: patients and studies (only slices the manifest gives no patient), matched series."""

    def __init__(self, salt: str, manifest_series: Sequence[str]) -> None:
        self.salt = salt
        self.manifest_series = frozenset(manifest_series)

    def create_accumulator(self):
        return {"patients": set(), "studies": set(), "series_matched": set(), "placeholder_slices": 0,
                "slices_by_patient_id": 0}

    def add_input(self, acc, item):
        info = item.info
        if info.series_uid and info.series_uid in self.manifest_series:
            acc["series_matched"].add(_hash(info.series_uid, self.salt, "series"))
        if not item.patient_key:  # the manifest's patient column did not replace the PatientID
            acc["slices_by_patient_id"] += 1
            acc["patients"].add(_hash(info.patient_key, self.salt, "patient"))
            acc["studies"].add(_hash(info.study_uid or info.series_key, self.salt, "study"))
            if info.patient_id and PLACEHOLDER_ID.fullmatch(info.patient_id.strip()):
                acc["placeholder_slices"] += 1
        return acc

    def merge_accumulators(self, accs):
        merged = self.create_accumulator()
        for acc in accs:
            for key in ("patients", "studies", "series_matched"):
                merged[key] |= acc[key]
            merged["placeholder_slices"] += acc["placeholder_slices"]
            merged["slices_by_patient_id"] += acc["slices_by_patient_id"]
        return merged

    def extract_output(self, acc):
        return {"patients": len(acc["patients"]), "studies": len(acc["studies"]),
                "series_matched": sorted(acc["series_matched"]), "placeholder_slices": acc["placeholder_slices"],
                "slices_by_patient_id": acc["slices_by_patient_id"]}


class InputFacts(beam.PTransform):
    """Classified slices -> one dict of counts and salted hashes (no identifier) for the driver's warnings."""

    def __init__(self, salt: str, manifest: Optional[DoseManifest]) -> None:
        super().__init__()
        self.salt = salt
        self.manifest_series = sorted(manifest.by_series) if manifest is not None else []

    def expand(self, slices):
        return slices | beam.CombineGlobally(_FactsFn(self.salt, self.manifest_series))


def manifest_warnings(manifest: Optional[DoseManifest], input_files: Sequence[str], series_matched: Sequence[str],
                      salt: str) -> list[str]:
    """One warning per dose-manifest entry that matches no input file (path entries) or no decoded slice (series
    entries), named by its CSV line (the path itself may hold identifiers)."""
    if manifest is None:
        return []
    files = sorted(input_files)
    exact = set(files)
    matched_series = set(series_matched)
    found = []
    for key, entry in manifest.by_path.items():
        at = bisect.bisect_left(files, key + "/")  # the first file that could lie under the folder ``key``
        if key not in exact and not (at < len(files) and files[at].startswith(key + "/")):
            found.append((entry.line, f"dose manifest line {entry.line}: the path matches no input file (not under "
                                      f"any --input?); the entry was not used"))
    for key, entry in manifest.by_series.items():
        if _hash(key, salt, "series") not in matched_series:
            found.append((entry.line, f"dose manifest line {entry.line}: no input slice has this SeriesInstanceUID; "
                                      f"the entry was not used"))
    return [text for _, text in sorted(found)]


def patient_warnings(facts: dict, counts: dict) -> list[str]:
    """A loud warning when the PatientIDs cannot tell patients apart (so splits by patient mean nothing)."""
    if not facts or not facts.get("slices_by_patient_id"):
        return []
    used = [split for split, by_dose in counts.items() if sum(by_dose.values())]
    where = f"every slice went to split {used[0]!r}" if len(used) == 1 else f"splits used: {', '.join(used)}"
    hint = ("give the dose manifest a per-file or per-folder 'patient' column (and a 'split' column to fix "
            "hold-out patients); see docs/pipeline.md, '--dose-manifest'")
    warnings = []
    if facts["patients"] == 1 and facts["studies"] > 1:
        warnings.append(f"all {facts['studies']} studies share ONE patient identifier, so the split by patient "
                        f"cannot separate patients ({where}); {hint}")
    if facts["placeholder_slices"]:
        warnings.append(f"{facts['placeholder_slices']} slice(s) carry a placeholder PatientID (such as "
                        f"'Anonymous'): patients that share it are treated as one; {hint}")
    return warnings
