"""What of a run may leave the site, and what must not: input paths go into one clearly named site-local folder.

File and folder names are chosen by whoever exported the data and often hold identifiers (``TEST_1_study_1234.dcm``
holds a PatientID and an accession number).  So the shareable output (shards, ``manifest.json``, ``rejected/``) names
no path or file: a rejected input appears there as ``input`` (a salted hash of its path) with its reason and a
detail scrubbed of the path, and the operator finds the file again in the site-local folder, which is never inside
the output (issue 27: the output folder must be shareable whole): ``OUT-site_local_DO_NOT_SHARE/`` beside it, or the
folder given with ``--site-local``:

- ``rejected_paths-SSSSS-of-NNNNN.jsonl``: ``{"input": HASH, "path": PATH}`` per rejected file;
- ``run.json``: the run's input patterns, output folder and dose-manifest path.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

FOLDER = "site_local_DO_NOT_SHARE"
REJECTED_PATHS = "rejected_paths"
RUN_FILE = "run.json"


def folder_for(output: str, chosen: Optional[str] = None) -> str:
    """The site-local folder of a run writing to ``output``: ``chosen``, else the sibling ``OUT-site_local_DO_NOT_SHARE``."""
    if chosen:
        return chosen.rstrip("/") if "://" in chosen else os.path.abspath(os.path.expanduser(chosen))
    return f"{output.rstrip('/')}-{FOLDER}"


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


#: Longest detail in the shareable list; the whole one stays in the site-local list.
MAX_DETAIL = 200
# A quoted value as Python's repr and most error messages write it ('x', "x", b'x'): a tag's value, which may be
# anything (a name typed into the wrong field), so the shareable detail never carries it.
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')


def sanitise(text: str) -> str:
    """A detail fit to share: quoted values replaced by ``<value>``, printable ASCII only, one line, at most
    :data:`MAX_DETAIL` characters (issue 27: malformed tag values were echoed into ``rejected/``)."""
    text = _QUOTED.sub("<value>", text)
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def shareable(rejection: dict, salt: str) -> dict:
    """A rejection without its path and without tag values (for ``rejected/``)."""
    path = rejection["path"]
    return {"input": input_id(path, salt), "reason": rejection["reason"],
            "detail": sanitise(scrub(rejection["detail"], path))}


def local(rejection: dict, salt: str) -> dict:
    """The site-local line that maps the shareable ``input`` hash back to the file, with the detail in full (values
    included: this list stays at the site)."""
    return {"input": input_id(rejection["path"], salt), "path": rejection["path"], "detail": rejection["detail"]}


class WriteRejectedPaths(beam.PTransform):
    """Rejections (with paths) -> ``LOCAL/rejected_paths-*.jsonl`` (``LOCAL``: :func:`folder_for`)."""

    def __init__(self, local_folder: str, salt: str) -> None:
        super().__init__()
        self.local_folder, self.salt = local_folder, salt

    def expand(self, rejected):
        from ldct_tf.pipeline.transforms import WriteLinesFn

        salt = self.salt
        # One group and one writer, as transforms.WriteRejected (WriteToText writes nothing on Beam 2.77's DaskRunner).
        return (rejected
                | "LocalLine" >> beam.Map(lambda r: (0, json.dumps(local(r, salt), sort_keys=True)))
                | "OneFile" >> beam.GroupByKey()
                | "WriteLocal" >> beam.ParDo(WriteLinesFn(
                    f"{self.local_folder.rstrip('/')}/{REJECTED_PATHS}-00000-of-00001.jsonl")))


def write_run_file(local_folder: str, details: dict) -> str:
    """``LOCAL/run.json``: the paths this run was given (never copied into the manifest)."""
    folder = local_folder.rstrip("/")
    try:
        FileSystems.mkdirs(folder)
    except Exception:
        pass  # exists, or an object store without folders
    path = f"{folder}/{RUN_FILE}"
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(details, indent=2, sort_keys=True).encode("utf-8"))
    return path


def output_patterns(local_folder: str) -> list[str]:
    """This module's files (so that ``--overwrite`` replaces them with the rest of a run)."""
    folder = local_folder.rstrip("/")
    return [f"{folder}/{REJECTED_PATHS}-*.jsonl", f"{folder}/{RUN_FILE}"]
