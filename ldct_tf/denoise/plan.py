"""Planning a denoise run, before any model runs: find the files, read and check each one (the pipeline's checks),
group slices into series, drop a series with an implausible slice whole, decide where every derived file goes, and
refuse outputs that would overwrite an input or an earlier run.  Split from ``ldct_tf.denoise`` so that the rules
about what gets written where live in one short file."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from ldct_tf import audit, dicom
from ldct_tf.denoise import output as denoise_output
from ldct_tf.dicom import plausibility
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
    """A file -> [it]; a folder -> every regular file below it, in sorted order (hidden files included: a file that is
    not DICOM is reported as skipped, never silently ignored)."""
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise DenoiseError(f"{input_path}: input not found")
    return sorted(p for p in input_path.rglob("*") if p.is_file())


def check_paths(input_path: Path, output: Path) -> None:
    """Refuse an OUTPUT inside INPUT (or equal to it), an OUTPUT that is an existing file, and one that cannot be
    written (probed) or whose path is too long for the file system."""
    denoise_output.check_path_lengths(output, [output])
    inp, out = input_path.resolve(), output.resolve()
    if input_path.is_dir() and (out == inp or inp in out.parents):
        raise DenoiseError(f"{output}: the output folder is inside the input folder {input_path}; choose a folder "
                           f"outside it (the input is never written to)")
    if out.exists() and not out.is_dir():
        raise DenoiseError(f"{output}: exists and is not a folder")
    denoise_output.check_writable(output)


def _warn_skipped(skipped: Skipped) -> None:
    log.warning("skipped %s: %s", skipped.path, skipped.reason)


def scan(files: Sequence[Path], progress: Optional[bool] = None
         ) -> tuple[dict[str, list[tuple[dicom.SliceInfo, Path]]], list[Skipped]]:
    """Read and check every file (the same checks as the pipeline); group usable slices by series.

    A series with a slice that fails the plausibility checks (RescaleSlope 0, HU off the CT scale, a tiny image) is
    dropped whole, with one warning, so that no partial series is written.
    """
    series: dict[str, list[tuple[dicom.SliceInfo, Path]]] = defaultdict(list)
    skipped = []
    implausible = []
    disable = None if progress is None else not progress  # None: a bar only on a terminal
    for path in tqdm(files, desc="scanning", unit="file", leave=False, disable=disable):
        try:
            _, _, info = dicom.read_ct_dataset(path)
        except dicom.NotUsableCT as exc:
            skipped.append(Skipped(str(path), f"{exc.reason}: {exc.detail}"))
            _warn_skipped(skipped[-1])
            if exc.reason in plausibility.REASONS:
                implausible.append(path)
            continue
        series[info.series_key].append((info, path))
    for members, bad in denoise_output.drop_series_with(series, implausible):
        log.warning("series in %s not written: %d of its %d slices failed validation", members[0][1].parent, bad,
                    bad + len(members))
        skipped.extend(Skipped(str(path), "series_not_written: other slices of its series failed validation")
                       for _, path in members)
    return series, skipped


def plan(input_path: Path, output: Path, series: dict[str, list[tuple[dicom.SliceInfo, Path]]],
         anonymous_names: bool = False) -> list[SeriesPlan]:
    """Where each derived series goes: OUTPUT mirrors INPUT's folders; the series' files keep their names (relative
    to the series' common folder); a folder holding several series gets ``series_1``, ``series_2``... subfolders.

    ``anonymous_names`` (``--deidentify``): folder and file names may hold identifiers, so none is kept: series
    ``k`` goes to ``OUTPUT/series_k/slice_NNNNN.dcm`` in slice order."""
    root = input_path if input_path.is_dir() else input_path.parent
    ordered = []
    for items in series.values():
        items = sorted(items, key=lambda item: (item[0].z_mm, item[0].instance, str(item[1])))
        files = [path for _, path in items]
        common = Path(os.path.commonpath([str(p.parent) for p in files]))
        ordered.append((common, files))
    ordered.sort(key=lambda entry: (str(entry[0]), str(min(entry[1]))))
    if anonymous_names:
        return [SeriesPlan(files, [output / f"series_{k}" / f"slice_{i + 1:05d}.dcm" for i in range(len(files))],
                           output / f"series_{k}") for k, (_, files) in enumerate(ordered, start=1)]
    per_folder: dict[Path, int] = defaultdict(int)
    for common, _ in ordered:
        per_folder[common] += 1
    counters: dict[Path, int] = defaultdict(int)
    plans = []
    for common, files in ordered:
        folder = output / common.relative_to(root)
        if per_folder[common] > 1:
            counters[common] += 1
            folder = folder / f"series_{counters[common]}"
        plans.append(SeriesPlan(files, [folder / p.relative_to(common) for p in files], folder))
    return plans


def check_outputs(plans: Sequence[SeriesPlan], inputs: Sequence[Path], overwrite: bool) -> None:
    """No output may be an input file; existing outputs need ``overwrite``."""
    input_set = {p.resolve() for p in inputs}
    existing = []
    for item in plans:
        for out in [*item.outputs, item.folder / audit.AUDIT_FOLDER / audit.SIDECAR]:
            if out.resolve() in input_set:
                raise DenoiseError(f"{out}: would overwrite an input file; choose another output folder")
            if out.exists():
                existing.append(out)
    if existing and not overwrite:
        raise DenoiseError(f"{existing[0]}: already exists ({len(existing)} output file(s) exist); choose an empty "
                           f"output folder or pass --overwrite")
