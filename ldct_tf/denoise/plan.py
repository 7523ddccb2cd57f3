"""Planning a denoise run, before any model runs: find the files, read and check each one (the pipeline's checks),
group slices into series, drop a series with an implausible slice whole, decide where every derived file goes, and
refuse outputs that would overwrite an input or an earlier run.  Split from ``ldct_tf.denoise`` so that the rules
about what gets written where live in one short file."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pydicom
from tqdm.auto import tqdm

from ldct_tf import audit, dicom
from ldct_tf.denoise import output as denoise_output
from ldct_tf.denoise.output import DenoiseError

log = logging.getLogger("ldct_tf.denoise")


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class SeriesPlan:
    """One input series: its files in slice order and where each derived file goes."""

    files: list[Path]
    outputs: list[Path]
    folder: Path



def list_files(input_path: Path) -> list[Path]:
    """A file -> [it]; a folder -> every file below it that is no folder, in sorted order (hidden files, FIFOs and
    sockets included: a file that is not DICOM is reported as skipped, never silently ignored)."""
    if input_path.is_dir():
        return sorted(p for p in input_path.rglob("*") if p.exists() and not p.is_dir())
    if not input_path.exists():
        raise DenoiseError(f"{input_path}: input not found")
    return [input_path]


def check_paths(input_path: Path, output: Path) -> None:
    """Refuse an OUTPUT inside INPUT (or equal to it), an OUTPUT that is an existing file, and one that cannot be
    written (probed) or whose path is too long for the file system; and an INPUT that does not exist, all before
    a model is loaded."""
    if not input_path.exists():
        raise DenoiseError(f"{input_path}: input not found")
    denoise_output.check_path_lengths(output, [output])
    inp, out = input_path.resolve(), output.resolve()
    if input_path.is_dir() and (out == inp or inp in out.parents):
        raise DenoiseError(f"{output}: the output folder is inside the input folder {input_path}; choose a folder "
                           f"outside it (the input is never written to)")
    if input_path.is_file() and out == inp.parent:
        raise DenoiseError(f"{output}: is the input file's folder; choose a folder outside it (the input is never "
                           f"written to)")
    if out.exists() and not out.is_dir():
        raise DenoiseError(f"{output}: exists and is not a folder")
    denoise_output.check_writable(output)


def _warn_skipped(skipped: Skipped) -> None:
    log.warning("skipped %s: %s", skipped.path, skipped.reason)


#: Reasons that say nothing about a series' slices (the file is no axial CT image of it): skipped alone.  Any other
#: failure (truncated, short pixel data, multi-frame, implausible, too large...) is a slice the series cannot lose.
NOT_A_SLICE = (dicom.NOT_DICOM, dicom.NOT_CT_IMAGE, dicom.LOCALIZER)
#: A FIFO, socket or device (the pipeline's reason, ``ldct_tf.pipeline.transforms.NOT_REGULAR``): opening a FIFO
#: waits for a writer forever (issue 27), so such a path is skipped from its ``stat`` alone, never opened.
NOT_REGULAR = "not_a_regular_file"
#: --deidentify cannot remove text burned into the pixels: such a slice refuses its series.
BURNED_IN = "burned_in_annotation"
#: Two files of one series with the same SOP Instance UID.
DUPLICATE_INSTANCE = "duplicate_instance"
MAX_PIXELS = 4096 * 4096  # default --max-pixels: the largest CT matrices are 2048x2048; 4096x4096 leaves room


@dataclass(frozen=True)
class RefusedSeries:
    """A series not written because some of its slices are unusable (never a partial series, issue 27)."""

    folder: str
    slices: int
    reasons: tuple[str, ...]  # "file: reason" per unusable slice

    def line(self) -> str:
        more = f" (and {len(self.reasons) - 1} more)" if len(self.reasons) > 1 else ""
        return (f"series in {self.folder} not written: {len(self.reasons)} of its {self.slices} slices are unusable: "
                f"{self.reasons[0]}{more}")


def _header_key(path: Path) -> Optional[tuple[str, str, str]]:
    """The group key of a file whose slice is unusable, from its header; None when even that cannot be read."""
    try:
        return dicom.header_group_key(pydicom.dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001 - a header pydicom cannot parse: the file is skipped on its own
        return None


def _read_for_scan(path: Path, deidentify: bool, max_pixels: Optional[int]):
    """(info, None) for a usable slice, (None, Skipped) otherwise, with whether it breaks its series."""
    try:
        irregular = not stat.S_ISREG(os.stat(path).st_mode)  # symlinks resolved
    except OSError:
        irregular = False  # gone or unreadable: the read below says so
    if irregular:
        return None, Skipped(str(path), f"{NOT_REGULAR}: a FIFO, socket or device, not a file; not opened"), False
    try:
        ds, _, info = dicom.read_ct_dataset(path, max_pixels=max_pixels)
    except dicom.NotUsableCT as exc:
        return None, Skipped(str(path), f"{exc.reason}: {exc.detail}"), exc.reason not in NOT_A_SLICE
    if deidentify and str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
        return None, Skipped(str(path), f"{BURNED_IN}: text in the pixels cannot be removed by --deidentify"), True
    return info, None, False


def scan(files: Sequence[Path], progress: Optional[bool] = None, deidentify: bool = False,
         max_pixels: Optional[int] = MAX_PIXELS
         ) -> tuple[dict[tuple, list[tuple[dicom.SliceInfo, Path]]], list[Skipped], list[RefusedSeries]]:
    """Read and check every file (the same checks as the pipeline); group usable slices by patient, study and series.

    A series with an unusable slice (any reason but "not an axial CT image at all", or burned-in text under
    ``deidentify``) is refused whole, with the reasons, so that no partial series is ever written.
    """
    series: dict[tuple, list[tuple[dicom.SliceInfo, Path]]] = defaultdict(list)
    skipped, breaking = [], defaultdict(list)
    disable = None if progress is None else not progress  # None: a bar only on a terminal
    for path in tqdm(files, desc="scanning", unit="file", leave=False, disable=disable):
        info, problem, breaks = _read_for_scan(path, deidentify, max_pixels)
        if info is not None:
            series[info.group_key].append((info, path))
            continue
        skipped.append(problem)
        _warn_skipped(problem)
        key = _header_key(path) if breaks else None
        if key is not None:
            breaking[key].append(f"{path.name}: {problem.reason.split(':')[0]}")
    refused = []
    for key, reasons in breaking.items():
        members = series.pop(key, [])
        if not members:
            continue  # nothing of that series was usable: its files are skipped, no partial series is possible
        folder = members[0][1].parent
        refused.append(RefusedSeries(str(folder), len(members) + len(reasons), tuple(reasons)))
        log.warning(refused[-1].line())
        skipped.extend(Skipped(str(path), "series_not_written: other slices of its series are unusable")
                       for _, path in members)
    return series, skipped, refused


def _content_digest(path: Path) -> str:
    """What a duplicate must share with the slice it duplicates: the image (HU) and where it lies."""
    _, hu, info = dicom.read_ct_dataset(path)
    return hashlib.sha256(hu.tobytes() + repr((hu.shape, info.position_mm)).encode()).hexdigest()


def drop_duplicates(series: dict[tuple, list[tuple[dicom.SliceInfo, Path]]]
                    ) -> tuple[list[Skipped], list[RefusedSeries]]:
    """Files that repeat a SOP Instance UID of their series (a re-sent or copied instance; issue 26: 4 files at one
    position became one "series").  Identical copies are skipped with a note and the first (by path) is kept; copies
    whose image or position differ make the series ambiguous, so it is refused whole.  Changes ``series`` in place."""
    skipped, refused = [], []
    for key in list(series):
        by_uid: dict[tuple, list[tuple[dicom.SliceInfo, Path]]] = defaultdict(list)
        for item in series[key]:
            if item[0].sop_uid:  # a blank UID (some anonymisers) says nothing about which files are copies
                by_uid[(item[0].sop_uid, item[0].frame)].append(item)
        copies = [sorted(group, key=lambda item: str(item[1])) for group in by_uid.values() if len(group) > 1]
        if not copies:
            continue
        conflicting = [group for group in copies if len({_content_digest(p) for _, p in group}) > 1]
        if conflicting:
            names = ", ".join(p.name for _, p in conflicting[0])
            members = series.pop(key)
            refused.append(RefusedSeries(str(members[0][1].parent), len(members),
                                         (f"{names}: {DUPLICATE_INSTANCE} with different content",)))
            log.warning(refused[-1].line())
            continue
        extra = {id(item) for group in copies for item in group[1:]}
        for group in copies:
            for _, path in group[1:]:
                skipped.append(Skipped(str(path), f"{DUPLICATE_INSTANCE}: the same SOP Instance UID and content as "
                                                  f"{group[0][1].name}, which is kept"))
                _warn_skipped(skipped[-1])
        series[key] = [item for item in series[key] if id(item) not in extra]
    return skipped, refused


def output_names(infos: Sequence[dicom.SliceInfo]) -> list[str]:
    """Derived file names for a series' slices in slice order: ``IM_<InstanceNumber>.dcm`` when the instance numbers
    are positive and unique, else ``slice_<position in the series>.dcm``.  Never the input's file name, which can
    embed the source's SOP Instance UID (the derived file holds a new one) or a patient's name."""
    numbers = [int(info.instance) for info in infos]
    if all(n > 0 for n in numbers) and len(set(numbers)) == len(numbers):
        return [f"IM_{n:05d}.dcm" for n in numbers]
    return [f"slice_{k:05d}.dcm" for k in range(1, len(infos) + 1)]


def plan(input_path: Path, output: Path, series: dict[tuple, list[tuple[dicom.SliceInfo, Path]]],
         anonymous_names: bool = False) -> list[SeriesPlan]:
    """Where each derived series goes: OUTPUT mirrors INPUT's folders (the series' common folder); a folder holding
    several series gets ``series_1``, ``series_2``... subfolders; files are named by :func:`output_names`.

    ``anonymous_names`` (``--deidentify``): folder names may hold identifiers too, so none is kept: series ``k``
    goes to ``OUTPUT/series_k/slice_NNNNN.dcm`` in slice order."""
    root = input_path if input_path.is_dir() else input_path.parent
    ordered = []
    for items in series.values():
        items = sorted(items, key=lambda item: (item[0].z_mm, item[0].instance, str(item[1])))
        files = [path for _, path in items]
        common = Path(os.path.commonpath([str(p.parent) for p in files]))
        ordered.append((common, files, output_names([info for info, _ in items])))
    ordered.sort(key=lambda entry: (str(entry[0]), str(min(entry[1]))))
    if anonymous_names:
        return [SeriesPlan(files, [output / f"series_{k}" / f"slice_{i + 1:05d}.dcm" for i in range(len(files))],
                           output / f"series_{k}") for k, (_, files, _) in enumerate(ordered, start=1)]
    per_folder: dict[Path, int] = defaultdict(int)
    for common, _, _ in ordered:
        per_folder[common] += 1
    counters: dict[Path, int] = defaultdict(int)
    plans = []
    for common, files, names in ordered:
        folder = output / common.relative_to(root)
        if per_folder[common] > 1:
            counters[common] += 1
            folder = folder / f"series_{counters[common]}"
        plans.append(SeriesPlan(files, [folder / name for name in names], folder))
    return plans


def check_outputs(plans: Sequence[SeriesPlan], inputs: Sequence[Path], overwrite: bool,
                  record: Optional[denoise_output.OutputRecord] = None) -> None:
    """No output may be an input file, no two series may share a folder or a file (issue 27: a subfolder named
    ``series_1`` and the first of two series beside it both planned ``OUT/series_1/``, and one replaced the other);
    existing outputs need ``overwrite``, and even then only files an earlier run recorded (``record``) are replaced."""
    input_set = {p.resolve() for p in inputs}
    existing, owner = [], {}
    for number, item in enumerate(plans):
        for out in [item.folder, *item.outputs, item.folder / audit.AUDIT_FOLDER / audit.SIDECAR]:
            resolved = out.resolve()
            if owner.setdefault(resolved, number) != number:
                raise DenoiseError(f"{out}: two input series would be written here (their folders' layout "
                                   f"collides); denoise them into separate output folders")
            if out == item.folder:
                continue
            if resolved in input_set:
                raise DenoiseError(f"{out}: would overwrite an input file; choose another output folder")
            if record is not None and resolved == record.path.resolve():
                raise DenoiseError(f"{out}: would overwrite denoise's record of its outputs; rename that input file")
            if out.exists():
                existing.append(out)
    if existing and not overwrite:
        raise DenoiseError(f"{existing[0]}: already exists ({len(existing)} output file(s) exist); choose an empty "
                           f"output folder or pass --overwrite")
    for out in existing if record is not None else ():
        if not record.owns(out):
            raise DenoiseError(f"{out}: exists and was not written by denoise into this output folder, so "
                               f"--overwrite never replaces it; move it away or choose another output folder")
