"""The pipeline's composable PTransforms: read and decode, classify dose, assign split, to Example, write, summarise.

Each stage that can refuse an element emits it on the ``rejected`` tagged output as a dict ``{path, reason, detail}``
instead of raising, so one bad file never stops a run.  Every transform is usable alone with Beam's testing utilities
(``TestPipeline`` + ``assert_that``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import stat
from typing import Any, Iterable, Optional

import apache_beam as beam
import numpy as np
import pydicom
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from ldct_tf import ct, dicom, records
from ldct_tf.pipeline.dose import DoseClassifier
# The sinks, importable from here as before they had their own module.
from ldct_tf.pipeline.sinks import (NAMESPACE, SHARD_SUFFIX, SHARD_TEMPLATE, WriteLinesFn, WriteRejected,  # noqa: F401
                             WriteShardFn, WriteShards, ensure_rejected_file, fill_missing_shards, rejected_path,
                             shard_of, shard_path, shard_prefix)

REJECTED = "rejected"
NOT_REGULAR = "not_a_regular_file"
BURNED_IN = "burned_in_annotation"
BAD_INSTANCE = "instance_number_out_of_range"
#: DICOM's IS range (PS3.5 6.2): a larger InstanceNumber is malformed, and beyond int64 it wrapped in the records.
INSTANCE_RANGE = (-(2**31), 2**31 - 1)
DOSE_UNKNOWN = "dose_unknown"
NO_PATIENT = "no_patient_identifier"
UNEXPECTED = "unexpected_error"

#: HU histogram used for the manifest's percentiles: 8-HU bins over [-2048, 4096).
HIST_LOW, HIST_HIGH, HIST_BIN = -2048, 4096, 8


@dataclasses.dataclass(frozen=True)
class Slice:
    """One decoded slice moving through the pipeline.  ``hu`` is int16 HU; dose/split/pseudonyms are filled in."""

    hu: np.ndarray
    info: dicom.SliceInfo
    dose: Optional[str] = None
    split: Optional[str] = None
    patient: Optional[str] = None
    series: Optional[str] = None
    patient_key: Optional[str] = None  # the dose manifest's patient column, when given: replaces PatientID
    fixed_split: Optional[str] = None  # the dose manifest's split column, when given: replaces the derived split



def rejection(path: str, reason: str, detail: str) -> dict:
    Metrics.counter(NAMESPACE, f"rejected_{reason}").inc()
    return {"path": path, "reason": reason, "detail": detail}


def _not_regular(path: str) -> bool:
    """A local path that is not a regular file (a FIFO, socket or device): opening a FIFO waits for a writer forever
    (issue 27), so such a path is refused from its ``stat`` alone."""
    if "://" in path:
        return False
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False  # gone or unreadable: the read below says so as a rejection


def _burned_in(data: bytes) -> bool:
    """Whether the header says text is burned into the pixels (only that tag is read, the pixels are not)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                             specific_tags=["BurnedInAnnotation"])
        return str(ds.get("BurnedInAnnotation", "NO")).strip().upper() == "YES"
    except Exception:  # not parseable: read_slices rejects it with its own reason
        return False


class DecodeDicomFn(beam.DoFn):
    """File path (or ReadableFile) -> Slice (one per frame) or a rejection naming the file and the reason."""

    def __init__(self) -> None:
        self.files_read = Metrics.counter(NAMESPACE, "files_read")
        self.slices_decoded = Metrics.counter(NAMESPACE, "slices_decoded")

    def _read(self, readable: Any, path: str) -> bytes:
        if hasattr(readable, "read"):
            return readable.read()
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return handle.read()

    def process(self, readable: Any) -> Iterable:
        path = readable.metadata.path if hasattr(readable, "metadata") else str(readable)
        self.files_read.inc()
        if _not_regular(path):
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(
                path, NOT_REGULAR, "not a regular file (a FIFO, socket or device); skipped without opening it"))
            return
        try:
            data = self._read(readable, path)
            if not data:
                yield beam.pvalue.TaggedOutput(REJECTED, rejection(path, dicom.NOT_DICOM, "empty file"))
                return
            if _burned_in(data):
                yield beam.pvalue.TaggedOutput(REJECTED, rejection(
                    path, BURNED_IN, "BurnedInAnnotation is YES: text in the pixels may identify the patient"))
                return
            slices = dicom.read_slices(data, name=path)
        except dicom.NotUsableCT as exc:
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(path, exc.reason, exc.detail))
            return
        except Exception as exc:  # a pipeline never dies on one bad input (ARCHITECTURE.md)
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(path, UNEXPECTED, f"{type(exc).__name__}: {exc}"))
            return
        for hu, info in slices:
            if not INSTANCE_RANGE[0] <= info.instance <= INSTANCE_RANGE[1]:
                yield beam.pvalue.TaggedOutput(REJECTED, rejection(
                    path, BAD_INSTANCE, f"InstanceNumber outside DICOM's integer range [{INSTANCE_RANGE[0]}, "
                    f"{INSTANCE_RANGE[1]}] (frame {info.frame})"))
                continue
            self.slices_decoded.inc()
            yield Slice(hu=ct.hu_to_int16(hu), info=info)


class _TagAsPairs(beam.DoFn):
    """Runs a DoFn with one tagged output (``TaggedOutput(tag, ...)``) and emits ``(tag, value)`` pairs instead."""

    def __init__(self, fn: beam.DoFn) -> None:
        self.fn = fn

    def setup(self) -> None:
        self.fn.setup()

    def teardown(self) -> None:
        self.fn.teardown()

    def process(self, element: Any) -> Iterable:
        for out in self.fn.process(element):
            yield (out.tag, out.value) if isinstance(out, beam.pvalue.TaggedOutput) else ("slices", out)


class _Outputs(dict):
    """``{"slices": ..., REJECTED: ...}`` that also answers ``.slices`` / ``.rejected``, like Beam's DoOutputsTuple."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def with_rejected(pcoll, fn: beam.DoFn, tag: str = REJECTED):
    """``pcoll | ParDo(fn).with_outputs(tag, main="slices")`` without a multi-output ParDo.

    Why: Beam 2.77's DaskRunner keeps one bag per transform and ignores output tags, so every consumer of a
    multi-output ParDo receives the main *and* the tagged elements (``'Slice' object is not subscriptable`` in the
    rejects branch, ``'dict' object has no attribute 'info'`` downstream of the main one).  One single-output ParDo
    of ``(tag, value)`` pairs and a filter per tag gives the same two PCollections on every runner.
    """
    pairs = pcoll | "Tag" >> beam.ParDo(_TagAsPairs(fn))
    return _Outputs({name: pairs | f"Only{name.capitalize()}" >> beam.FlatMap(
        lambda pair, wanted=name: [pair[1]] if pair[0] == wanted else []) for name in ("slices", tag)})


class ReadDicomSlices(beam.PTransform):
    """PCollection of file patterns (local or any Beam filesystem, ``**`` recursive) -> Slices + ``rejected``."""

    def expand(self, patterns):
        # Paths, not fileio.ReadMatches: it opens every match, and opening a FIFO blocks forever (DecodeDicomFn
        # checks each path before it opens it).
        paths = (patterns
                 | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
                 | "Paths" >> beam.Map(lambda metadata: metadata.path))
        return with_rejected(paths, DecodeDicomFn())


class ClassifyDoseFn(beam.DoFn):
    def __init__(self, classifier: DoseClassifier) -> None:
        self.classifier = classifier

    def process(self, item: Slice) -> Iterable:
        info = item.info
        dose, patient_key = self.classifier.classify(info.source, info.series_uid, info.series_description, info.ctdivol,
                                        info.exposure_mas)
        if dose is None:
            source = "not covered by the dose manifest and " if self.classifier.manifest is not None else ""
            detail = (f"{source}no dose rule matched "
                      f"(CTDIvol {info.ctdivol:.3g} mGy, exposure {info.exposure_mas:.3g} mAs)")
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(info.source, DOSE_UNKNOWN, detail))
            return
        Metrics.counter(NAMESPACE, f"dose_{dose}").inc()
        yield dataclasses.replace(item, dose=dose, patient_key=patient_key,
                                  fixed_split=self.classifier.fixed_split(info.source, info.series_uid))


class ClassifyDose(beam.PTransform):
    """Slices -> Slices with ``dose`` set, or ``rejected`` with reason ``dose_unknown``."""

    def __init__(self, classifier: DoseClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def expand(self, slices):
        return with_rejected(slices, ClassifyDoseFn(self.classifier))


def parse_splits(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> fractions; names from records.SPLITS, summing to 1."""
    fractions = {name: 0.0 for name in records.SPLITS}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in fractions:
            raise ValueError(f"bad --splits entry {part!r}: expected NAME=FRACTION with NAME in {records.SPLITS}")
        try:
            fractions[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --splits fraction {value!r} for {name}") from None
        if not 0.0 <= fractions[name] <= 1.0:
            raise ValueError(f"--splits fraction for {name} must be in [0, 1], got {value}")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"--splits fractions must sum to 1, got {sum(fractions.values()):.6g} from {text!r}")
    return fractions


def split_for(patient_pseudonym: str, fractions: dict[str, float]) -> str:
    """Deterministic split of a patient: its pseudonym read as a uniform number in [0, 1).

    It depends only on the (salted) patient, never on which other patients are in the run, so adding data later never
    moves a patient from one split to another.
    """
    position = int(patient_pseudonym[:13], 16) / float(16**13)
    cumulative = 0.0
    for name in records.SPLITS:
        cumulative += fractions.get(name, 0.0)
        if position < cumulative:
            return name
    return [name for name in records.SPLITS if fractions.get(name, 0.0) > 0][-1]


class AssignSplitFn(beam.DoFn):
    def __init__(self, salt: str, fractions: dict[str, float]) -> None:
        self.salt = salt
        self.fractions = fractions

    def process(self, item: Slice) -> Iterable:
        info = item.info
        patient_key = f"manifest:{item.patient_key}" if item.patient_key else info.patient_key
        if not patient_key:
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(
                info.source, NO_PATIENT, "no PatientID, StudyInstanceUID or FrameOfReferenceUID to split by "
                "(give a patient column in the dose manifest)"))
            return
        if not info.patient_id and not item.patient_key:
            Metrics.counter(NAMESPACE, "patient_id_missing_used_" + patient_key.split(":", 1)[0]).inc()
        patient = records.pseudonym(patient_key, self.salt, "patient")
        series = records.pseudonym(info.series_key, self.salt, "series")
        split = item.fixed_split or split_for(patient, self.fractions)
        yield dataclasses.replace(item, patient=patient, series=series, split=split)


class AssignSplit(beam.PTransform):
    """Slices -> Slices with salted pseudonyms and a split assigned by patient."""

    def __init__(self, salt: str, fractions: dict[str, float]) -> None:
        super().__init__()
        self.salt = salt
        self.fractions = fractions

    def expand(self, slices):
        return with_rejected(slices, AssignSplitFn(self.salt, self.fractions))


def slice_stats(hu: np.ndarray) -> dict:
    """Per-slice HU summary that combines exactly across slices (integer sums and a histogram)."""
    values = hu.ravel().astype(np.int64)
    bins = (np.clip(values, HIST_LOW, HIST_HIGH - 1) - HIST_LOW) // HIST_BIN
    hist = np.bincount(bins, minlength=(HIST_HIGH - HIST_LOW) // HIST_BIN)
    return {"n": int(values.size), "sum": int(values.sum()), "sumsq": int(np.dot(values, values)),
            "min": int(values.min()), "max": int(values.max()), "hist": hist}


def to_record(item: Slice) -> records.SliceRecord:
    info = item.info
    return records.SliceRecord(
        image=item.hu, dose=item.dose, split=item.split, patient=item.patient, series=item.series,
        instance=info.instance, z_mm=info.z_mm, pixel_spacing_mm=info.pixel_spacing_mm,
        slice_thickness_mm=info.slice_thickness_mm, kvp=info.kvp, exposure_mas=info.exposure_mas,
        ctdivol=info.ctdivol, kernel=info.kernel, manufacturer=info.manufacturer,
    )


@dataclasses.dataclass(frozen=True)
class EncodedSlice:
    """A serialized Example and what the summary needs; no identifiers, only pseudonyms."""

    split: str
    dose: str
    patient: str
    series: str
    example: bytes
    stats: dict
    key: str = ""  # series pseudonym, instance, frame: picks the shard


class ToExamples(beam.PTransform):
    """Slices (dose, split and pseudonyms set) -> EncodedSlice."""

    def expand(self, slices):
        def encode(item: Slice) -> EncodedSlice:
            Metrics.counter(NAMESPACE, "slices_written").inc()
            key = f"{item.series}:{item.info.instance}:{item.info.frame}:{item.info.z_mm:.3f}"
            return EncodedSlice(item.split, item.dose, item.patient, item.series, records.encode(to_record(item)),
                                slice_stats(item.hu), key)

        return slices | beam.Map(encode)


class HUStatsFn(beam.CombineFn):
    """Exact HU mean/std/min/max and histogram percentiles over all slices of a key."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, stats):
        return self.merge_accumulators([acc, stats])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        return {
            "n": sum(a["n"] for a in accs), "sum": sum(a["sum"] for a in accs),
            "sumsq": sum(a["sumsq"] for a in accs), "min": min(a["min"] for a in accs),
            "max": max(a["max"] for a in accs), "hist": np.sum([a["hist"] for a in accs], axis=0),
        }

    def extract_output(self, acc):
        if acc is None:
            return {}
        mean = acc["sum"] / acc["n"]
        std = math.sqrt(max(acc["sumsq"] / acc["n"] - mean * mean, 0.0))
        cdf = np.cumsum(acc["hist"]) / acc["n"]
        def percentile(q: float) -> float:  # lower edge of the 8-HU bin holding the q-th quantile
            return float(HIST_LOW + HIST_BIN * int(np.searchsorted(cdf, q)))
        return {"pixels": int(acc["n"]), "mean": round(mean, 3), "std": round(std, 3), "min": float(acc["min"]),
                "max": float(acc["max"]), "p01": percentile(0.01), "p50": percentile(0.5), "p99": percentile(0.99)}


class Summarise(beam.PTransform):
    """(EncodedSlices, rejections) -> one dict: counts by split and dose, patients, series, HU stats, rejections."""

    def expand(self, pcolls):
        encoded, rejected = pcolls
        counts = (encoded | "CountKey" >> beam.Map(lambda e: (("counts", e.split, e.dose), 1))
                  | "Count" >> beam.CombinePerKey(sum))
        patients = (encoded | "PatientKey" >> beam.Map(lambda e: (("patients", e.split, e.dose), e.patient))
                    | "DistinctPatients" >> beam.Distinct()
                    | "PatientOnes" >> beam.Map(lambda kv: (kv[0], 1)) | "CountPatients" >> beam.CombinePerKey(sum))
        series = (encoded | "SeriesKey" >> beam.Map(lambda e: (("series", e.split, e.dose), e.series))
                  | "DistinctSeries" >> beam.Distinct()
                  | "SeriesOnes" >> beam.Map(lambda kv: (kv[0], 1)) | "CountSeries" >> beam.CombinePerKey(sum))
        stats = (encoded | "StatsKey" >> beam.Map(lambda e: (("hu_stats", e.dose), e.stats))
                 | "Stats" >> beam.CombinePerKey(HUStatsFn()))
        reasons = (rejected | "ReasonKey" >> beam.Map(lambda r: (("rejected_by_reason", r["reason"]), 1))
                   | "CountReasons" >> beam.CombinePerKey(sum))
        return ((counts, patients, series, stats, reasons) | "AllFigures" >> beam.Flatten()
                | "OneList" >> beam.combiners.ToList() | "Nest" >> beam.Map(nest_summary))


def nest_summary(items: list) -> dict:
    """[((section, *keys), value)] -> {section: {key: {key: value}}} with every split and dose present in counts."""
    summary: dict = {"counts": {s: {d: 0 for d in records.DOSES} for s in records.SPLITS},
                     "patients": {s: {d: 0 for d in records.DOSES} for s in records.SPLITS},
                     "series": {s: {d: 0 for d in records.DOSES} for s in records.SPLITS},
                     "hu_stats": {}, "rejected_by_reason": {}}
    for key, value in items:
        node = summary.setdefault(key[0], {})
        for part in key[1:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    summary["rejected"] = int(sum(summary["rejected_by_reason"].values()))
    summary["rejected_by_reason"] = dict(sorted(summary["rejected_by_reason"].items()))
    return summary


class WriteJson(beam.DoFn):
    """Writes its single input as JSON to ``path`` through Beam's filesystems (works on GCS too)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def process(self, value: dict) -> Iterable[str]:
        with FileSystems.create(self.path) as handle:
            handle.write(json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))
        yield self.path
