"""What ``ldct_tf.denoise`` checks before the model runs, and how it writes a series all or nothing.

Why: a read-only or over-long output used to fail only when the first file was written, after the model had run,
with a traceback; a slice with ``RescaleSlope 0`` crashed the writer half-way through its series; and the series
that failed half-way stayed behind half-written, so that a re-run refused it ("already exists").  Now the output is
probed for writability and every path is checked against the file system's limits first, a series with an
implausible slice is dropped whole before anything is written, and each series is written into a staging folder
inside the output (same file system, so the final move is a rename) that is moved into place only when the whole
series is written, and removed otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from ldct_tf.errors import LdctError

STAGING_PREFIX = ".ldct_tf-partial-"
#: Inside every staging folder: tells a later run that the folder is this tool's own leftover (after a kill -9).
STAGING_MARKER = ".written-by-ldct_tf.denoise"
_STAGING_NAME_LENGTH = len(STAGING_PREFIX) + 32
#: In OUTPUT: the files (and folders) denoise wrote there, relative paths.  ``--overwrite`` deletes exactly these, so
#: that no stale derived file or audit PNG of an earlier run survives and no file of the user's is ever touched.
RECORD_NAME = ".ldct_tf_denoise_outputs.json"


class DenoiseError(LdctError):
    """A problem with the command as a whole (paths, model); reported as one line, exit status 1.

    Defined here so that the checks below raise it directly; ``ldct_tf.denoise.DenoiseError`` is the same class.
    """


OutputError = DenoiseError  # the output cannot be written


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    path = path.absolute()
    while path != path.parent:
        try:
            if path.exists():
                break
        except OSError:  # a name too long for the file system cannot exist
            pass
        path = path.parent
    return path


def check_writable(output: Path) -> None:
    """Refuse an output that cannot be created or written, without creating it (a probe file comes and goes)."""
    anchor = existing_ancestor(output)
    if not anchor.is_dir():
        raise OutputError(f"{output}: cannot be created: {anchor} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=anchor, prefix=".ldct_tf-write-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{output}: not writable ({exc.strerror or type(exc).__name__} in {anchor}); "
                          f"choose a folder you can write to") from None


def _limits(anchor: Path) -> tuple[int, int]:
    try:
        return os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # not every platform or file system reports them
        return 255, 4096


def check_path_lengths(output: Path, paths: Iterable[Path]) -> None:
    """Every output path (and its staging twin, which is longer) must fit the file system's name and path limits."""
    name_max, path_max = _limits(existing_ancestor(output))
    output = output.absolute()
    for path in paths:
        path = path.absolute()
        staged = len(os.fsencode(str(path))) + _STAGING_NAME_LENGTH + 1
        longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
        if longest > name_max:
            raise OutputError(f"{output}: an output file or folder name would be {longest} bytes long, more than "
                              f"the {name_max} this file system allows; choose a shorter output folder")
        if staged >= path_max:
            raise OutputError(f"{output}: an output path would be {staged} bytes long, more than the {path_max} "
                              f"this file system allows; choose a shorter output folder")


class OutputRecord:
    """What denoise wrote into one OUTPUT (``OUTPUT/.ldct_tf_denoise_outputs.json``), kept up to date series by
    series, so that ``--overwrite`` can remove an earlier run's outputs, all of them and nothing else (issue 27: a
    re-run with fewer slices or fewer flagged slices left the earlier run's extra files and audit PNGs behind)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output / RECORD_NAME
        self.files: set[str] = set()
        self.folders: set[str] = set()
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.files = {self._checked(f) for f in data["files"]}
                self.folders = {self._checked(f) for f in data["folders"]}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise OutputError(f"{self.path}: not a readable record of an earlier denoise run ({exc}); remove "
                                  f"it or choose an empty output folder") from None

    def _checked(self, entry: str) -> str:
        """A recorded path must stay inside OUTPUT: a record edited to name ``../x`` never deletes anything outside."""
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"{entry!r} is not a path inside the output folder")
        rel = PurePosixPath(entry)
        if rel.is_absolute() or ".." in rel.parts or rel.as_posix() == ".":
            raise ValueError(f"{entry!r} is not a path inside the output folder")
        return rel.as_posix()

    def owns(self, path: Path) -> bool:
        """Whether ``path`` (under OUTPUT) was written by an earlier run into this OUTPUT."""
        try:
            return path.absolute().relative_to(self.output.absolute()).as_posix() in self.files
        except ValueError:
            return False

    def remove_recorded(self) -> int:
        """Delete the recorded files, then the recorded folders that are left empty (deepest first); nothing else.
        Returns how many files were deleted."""
        root, removed = self.output.resolve(), 0
        for rel in sorted(self.files):
            path = self.output / rel
            if path.is_file() and not path.is_symlink() and root in path.resolve().parents:
                path.unlink()
                removed += 1
        for rel in sorted(self.folders, key=lambda f: (-len(PurePosixPath(f).parts), f)):
            try:
                (self.output / rel).rmdir()  # only when empty: a folder holding a user's file stays
            except OSError:
                pass
        self.files, self.folders = set(), set()
        self.save()
        return removed

    def add(self, files: Iterable[Path], folders: Iterable[Path]) -> None:
        out = self.output.absolute()
        self.files.update(p.absolute().relative_to(out).as_posix() for p in files)
        self.folders.update(p.absolute().relative_to(out).as_posix() for p in folders)
        self.save()

    def save(self) -> None:
        """Written whole or not at all (a temporary file renamed over the record)."""
        text = json.dumps({"written_by": "ldct_tf.denoise", "files": sorted(self.files),
                           "folders": sorted(self.folders)}, indent=1)
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f"{RECORD_NAME}.{uuid.uuid4().hex}.tmp")
            temporary.write_text(text + "\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or type(exc).__name__})") from None


class StagedSeries:
    """One series' files, written under ``OUTPUT/.ldct_tf-partial-XXXX/`` and moved to their places by :meth:`commit`.

    Use as a context manager: leaving the block with an exception removes the staging folder, so no partial series
    is ever left in the output.  ``record`` (the OUTPUT's :class:`OutputRecord`) learns every file before it is moved
    into place, so that a kill between the two never leaves a file that a later ``--overwrite`` refuses.
    """

    def __init__(self, output: Path, record: Optional[OutputRecord] = None) -> None:
        self.output = output
        self.root = output / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        self._staged: list[tuple[Path, Path]] = []
        self.record = record

    def __enter__(self) -> "StagedSeries":
        try:
            self.root.mkdir(parents=True)
            (self.root / STAGING_MARKER).write_text("a series being written; removed when complete\n")
        except OSError as exc:
            raise OutputError(f"{self.output}: cannot write ({exc.strerror or type(exc).__name__})") from None
        return self

    def path_for(self, final: Path) -> Path:
        """Where to write the file that will become ``final`` (a path under the output)."""
        staged = self.root / final.relative_to(self.output)
        self._staged.append((staged, final))
        return staged

    def commit(self) -> None:
        """Move every staged file to its final path (renames on one file system), then drop the staging folder.

        A final path that exists is a file no run of denoise recorded (``--overwrite`` removed the recorded ones
        first): it is never replaced, and nothing of the series is moved."""
        moves = [(staged, final) for staged, final in self._staged if staged.exists()]
        for _, final in moves:
            if final.exists() or final.is_symlink():
                raise OutputError(f"{final}: exists and was not written by denoise into this output folder, so it "
                                  f"is never replaced; move it away or choose another output folder")
        if self.record is not None:
            self.record.add([final for _, final in moves], self._new_folders(final for _, final in moves))
        try:
            for staged, final in moves:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
        except OSError as exc:
            raise OutputError(f"{final}: cannot write ({exc.strerror or type(exc).__name__})") from None
        self.abort()

    def _new_folders(self, finals: Iterable[Path]) -> set[Path]:
        """The folders between OUTPUT and the final paths that do not exist yet (the ones the commit makes)."""
        new = set()
        for final in finals:
            folder = final.parent
            while folder != self.output and self.output in folder.parents and not folder.exists():
                new.add(folder)
                folder = folder.parent
        return new

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(self, kind, value, traceback) -> Optional[bool]:
        if kind is not None:
            self.abort()
        return None


def remove_stale_staging(output: Path) -> int:
    """Delete staging folders that a killed earlier run left in ``output`` (only folders holding the marker)."""
    removed = 0
    if output.is_dir():
        for folder in output.glob(f"{STAGING_PREFIX}*"):
            if folder.is_dir() and (folder / STAGING_MARKER).exists():
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    return removed
