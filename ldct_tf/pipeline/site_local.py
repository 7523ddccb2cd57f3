"""What of a run may leave the site, and what must not: input paths go into one clearly named site-local folder.

File and folder names are chosen by whoever exported the data and often hold identifiers (``TEST_1_study_1234.dcm``
holds a PatientID and an accession number).  So the shareable output (shards, ``manifest.json``, ``rejected/``) names
no path or file: a rejected input appears there as ``input`` (a salted hash of its path) with its reason and a
detail scrubbed of the path, and the operator finds the file again in ``site_local_DO_NOT_SHARE/``:

- ``rejected_paths-SSSSS-of-NNNNN.jsonl``: ``{"input": HASH, "path": PATH}`` per rejected file;
- ``run.json``: the run's input patterns, output folder and dose-manifest path.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

FOLDER = "site_local_DO_NOT_SHARE"
REJECTED_PATHS = "rejected_paths"
RUN_FILE = "run.json"


def input_id(path: str, salt: str) -> str:
    """A stable, salted name for an input file that says nothing about its path."""
    return hashlib.sha256(f"{salt}\x00input-path\x00{path}".encode("utf-8")).hexdigest()[:16]


def scrub(text: str, path: str) -> str:
    """``text`` with the path, its file name and the name without its suffix replaced by ``<file>``."""
    name = posixpath.basename(path.replace("\\", "/"))
    stem = name.rsplit(".", 1)[0] if "." in name else name
    for value in sorted({path, name, stem} - {""}, key=len, reverse=True):
        if len(value) >= 3:  # a one- or two-letter stem would blank ordinary words
            text = text.replace(value, "<file>")
    return text


def shareable(rejection: dict, salt: str) -> dict:
    """A rejection without its path (for ``rejected/``)."""
    path = rejection["path"]
    return {"input": input_id(path, salt), "reason": rejection["reason"], "detail": scrub(rejection["detail"], path)}


def local(rejection: dict, salt: str) -> dict:
    """The site-local line that maps the shareable ``input`` hash back to the file."""
    return {"input": input_id(rejection["path"], salt), "path": rejection["path"]}


class WriteRejectedPaths(beam.PTransform):
    """Rejections (with paths) -> ``OUT/site_local_DO_NOT_SHARE/rejected_paths-*.jsonl``."""

    def __init__(self, output: str, salt: str) -> None:
        super().__init__()
        self.output, self.salt = output, salt

    def expand(self, rejected):
        from ldct_tf.pipeline.transforms import WriteLinesFn

        salt = self.salt
        # One group and one writer, as transforms.WriteRejected (WriteToText writes nothing on Beam 2.77's DaskRunner).
        return (rejected
                | "LocalLine" >> beam.Map(lambda r: (0, json.dumps(local(r, salt), sort_keys=True)))
                | "OneFile" >> beam.GroupByKey()
                | "WriteLocal" >> beam.ParDo(WriteLinesFn(
                    f"{self.output.rstrip('/')}/{FOLDER}/{REJECTED_PATHS}-00000-of-00001.jsonl")))


def write_run_file(output: str, details: dict) -> str:
    """``OUT/site_local_DO_NOT_SHARE/run.json``: the paths this run was given (never copied into the manifest)."""
    folder = f"{output.rstrip('/')}/{FOLDER}"
    try:
        FileSystems.mkdirs(folder)
    except Exception:
        pass  # exists, or an object store without folders
    path = f"{folder}/{RUN_FILE}"
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(details, indent=2, sort_keys=True).encode("utf-8"))
    return path


def output_patterns(output: str) -> list[str]:
    """This module's files in ``output`` (so that ``--overwrite`` replaces them with the rest of a run)."""
    folder = f"{output.rstrip('/')}/{FOLDER}"
    return [f"{folder}/{REJECTED_PATHS}-*.jsonl", f"{folder}/{RUN_FILE}"]
