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

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Optional

from ldct_tf.errors import LdctError

STAGING_PREFIX = ".ldct_tf-partial-"
#: Inside every staging folder: tells a later run that the folder is this tool's own leftover (after a kill -9).
STAGING_MARKER = ".written-by-ldct_tf.denoise"
_STAGING_NAME_LENGTH = len(STAGING_PREFIX) + 32


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


class StagedSeries:
    """One series' files, written under ``OUTPUT/.ldct_tf-partial-XXXX/`` and moved to their places by :meth:`commit`.

    Use as a context manager: leaving the block with an exception removes the staging folder, so no partial series
    is ever left in the output.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.root = output / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        self._staged: list[tuple[Path, Path]] = []

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
        """Move every staged file to its final path (renames on one file system), then drop the staging folder."""
        try:
            for staged, final in self._staged:
                if staged.exists():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, final)
        except OSError as exc:
            raise OutputError(f"{final}: cannot write ({exc.strerror or type(exc).__name__})") from None
        self.abort()

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
