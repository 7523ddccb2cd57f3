"""The pipeline's sinks: gzip TFRecord shards per split and dose, the rejected list, and their file names.

Split from ``ldct_tf.pipeline.transforms`` (which re-exports these names): everything that decides what is written where.
Single-writer designs where Beam's own sinks misbehave on some runners are explained where they are used.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from ldct_tf.pipeline import tfrecord_sink

NAMESPACE = "ldct_tf"


def shard_prefix(output: str, split: str, dose: str) -> str:
    return f"{output.rstrip('/')}/{split}/{dose}"


SHARD_SUFFIX = ".tfrecord.gz"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"


def shard_path(output: str, split: str, dose: str, shard: int, num_shards: int) -> str:
    """``OUT/{split}/{dose}-SSSSS-of-NNNNN.tfrecord.gz``."""
    return f"{shard_prefix(output, split, dose)}-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic shard of a slice, from its (pseudonymous) key: reruns give the same files."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % num_shards


class WriteShardFn(beam.DoFn):
    """((split, dose, shard), serialized Examples) -> one gzip TFRecord file, written under a temporary name and
    renamed, so a retried bundle or a crash never leaves a half-written shard."""

    def __init__(self, output: str, num_shards: int, gzip_level: int) -> None:
        self.output, self.num_shards, self.gzip_level = output, num_shards, gzip_level

    def process(self, element) -> Iterable[str]:
        (split, dose, shard), examples = element
        final = shard_path(self.output, split, dose, shard, self.num_shards)
        temporary = f"{self.output.rstrip('/')}/{split}/.tmp-{uuid.uuid4().hex}{SHARD_SUFFIX}"
        try:
            FileSystems.mkdirs(f"{self.output.rstrip('/')}/{split}")
        except Exception:
            pass  # exists already (or an object store, where folders need not exist)
        count = tfrecord_sink.write_tfrecord_gzip(temporary, examples, self.gzip_level)
        if FileSystems.exists(final):
            FileSystems.delete([final])
        FileSystems.rename([temporary], [final])
        Metrics.counter(NAMESPACE, "shards_written").inc()
        Metrics.distribution(NAMESPACE, "slices_per_shard").update(count)
        yield final


class WriteShards(beam.PTransform):
    """EncodedSlices -> gzip TFRecord shards ``OUT/{split}/{dose}-SSSSS-of-NNNNN.tfrecord.gz`` (returns the paths).

    A split/dose with no slices gets no files; the driver fills in empty files for shard numbers that received no
    slice (``fill_missing_shards``), so every non-empty set is complete.
    """

    def __init__(self, output: str, num_shards: int, gzip_level: int = 1) -> None:
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards!r}")
        self.output, self.num_shards, self.gzip_level = output, num_shards, gzip_level

    def expand(self, encoded):
        n = self.num_shards
        return (
            encoded
            | "KeyByShard" >> beam.Map(lambda e: ((e.split, e.dose, shard_of(e.key, n)), e.example))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(WriteShardFn(self.output, n, self.gzip_level))
        )


def fill_missing_shards(output: str, counts: dict, num_shards: int) -> list[str]:
    """Write empty (valid) shard files for the shard numbers of non-empty split/dose sets that got no slice."""
    created = []
    for split, by_dose in counts.items():
        for dose, count in by_dose.items():
            if not count:
                continue
            for shard in range(num_shards):
                path = shard_path(output, split, dose, shard, num_shards)
                if not FileSystems.exists(path):
                    tfrecord_sink.write_tfrecord_gzip(path, [])
                    created.append(path)
    return created


class WriteRejected(beam.PTransform):
    """Rejections -> ``OUT/rejected/rejected-SSSSS-of-NNNNN.jsonl`` (one JSON line per rejected input)."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    def expand(self, rejected):
        # Not beam.io.WriteToText: its finalisation runs through side inputs that Beam 2.77's DaskRunner never
        # computes, so on Dask no file appeared.  One group and one writer give the same file on every runner.
        return (
            rejected
            | "ToJson" >> beam.Map(lambda r: (0, json.dumps(r, sort_keys=True)))
            | "OneFile" >> beam.GroupByKey()
            | "WriteJsonl" >> beam.ParDo(WriteLinesFn(rejected_path(self.output)))
        )


def rejected_path(output: str) -> str:
    """The rejected list: ``OUT/rejected/rejected-00000-of-00001.jsonl``."""
    return f"{output.rstrip('/')}/rejected/rejected-00000-of-00001.jsonl"


def ensure_rejected_file(output: str) -> None:
    """An empty rejected list when nothing was rejected (the group above then has no element to write)."""
    path = rejected_path(output)
    if not FileSystems.exists(path):
        WriteLinesFn(path).write([])


class WriteLinesFn(beam.DoFn):
    """``(key, lines)`` -> one text file of the sorted lines, written under a temporary name and renamed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, lines) -> str:
        folder = self.path.rsplit("/", 1)[0]
        try:
            FileSystems.mkdirs(folder)
        except Exception:
            pass  # exists already (or an object store)
        temporary = f"{folder}/.tmp-{uuid.uuid4().hex}.jsonl"
        with FileSystems.create(temporary) as handle:
            handle.write("".join(f"{line}\n" for line in sorted(lines)).encode("utf-8"))
        if FileSystems.exists(self.path):
            FileSystems.delete([self.path])
        FileSystems.rename([temporary], [self.path])
        return self.path

    def process(self, element) -> Iterable[str]:
        yield self.write(element[1])
