"""Paired low/normal-dose slices for the evaluation: from a pairs CSV, two folders, or simulated from normal dose.

Why a module of its own: every way of getting pairs ends in the same :class:`Pair` (HU arrays on one grid), so the
scoring never needs to know where the slices came from.  Slices are named after the files given, never after DICOM
header fields (which may identify the patient).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ldct_tf import dicom
from ldct_tf.errors import LdctError

class EvaluateInputError(LdctError, ValueError):
    """Pairs, score sheets or denoiser names that cannot be evaluated; names the file or value.  A ``ValueError`` too,
    as these checks raised before the project had one error base."""


@dataclass
class Pair:
    """One paired slice in HU: the low-dose input and its normal-dose reference (same position, same grid)."""

    name: str
    low: np.ndarray
    normal: np.ndarray
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
    #: Display window of its panel (``ldct_tf.ct.WINDOWS``): the liver window unless the slice needs another (a head).
    window: str = "liver"


# ------------------------------------------------------------------------------------------------------------ input
def _read(path: Path) -> tuple[np.ndarray, dicom.SliceInfo]:
    try:
        return dicom.read_slice(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such DICOM file") from None


def load_pair(low_path: str | Path, normal_path: str | Path, name: Optional[str] = None) -> Pair:
    """Read a low-dose and a normal-dose DICOM file into a :class:`Pair`; different grids raise ``ValueError``."""
    low, low_info = _read(Path(low_path))
    normal, _ = _read(Path(normal_path))
    if low.shape != normal.shape:
        raise EvaluateInputError(f"{low_path} ({low.shape}) and {normal_path} ({normal.shape}) differ in size: "
                                 "not a pair")
    return Pair(name or Path(low_path).stem, low, normal, tuple(low_info.pixel_spacing_mm))


def _label(cell: str) -> str:
    """A slice's name: the low-dose path as written in the CSV, without its suffix (just the stem if absolute)."""
    p = Path(cell)
    return p.stem if p.is_absolute() else p.with_suffix("").as_posix()


def read_pairs_csv(path: str | Path, patients: Optional[Iterable[str]] = None) -> list[tuple[Path, Path, str]]:
    """``(low, normal, name)`` from a pairs CSV (see the module docstring), optionally only some patients."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such pairs CSV") from None
    low_col = next((c for c in ("low", "quarter_dose") if c in header), None)
    normal_col = next((c for c in ("normal", "full_dose") if c in header), None)
    if not rows or low_col is None or normal_col is None:
        raise EvaluateInputError(f"{path}: expected a header with columns low,normal (or quarter_dose,full_dose) "
                                 f"and at least one row; got {list(header)}")
    wanted = set(patients) if patients else None
    if wanted and "patient" not in header:
        raise EvaluateInputError(f"{path}: --patients needs a 'patient' column")
    base = path.parent
    out = [((base / r[low_col]).resolve(), (base / r[normal_col]).resolve(), _label(r[low_col])) for r in rows
           if wanted is None or r["patient"] in wanted]
    if not out:
        raise EvaluateInputError(f"{path}: no pairs for patients {sorted(wanted or [])}")
    return out


def load_pairs_csv(path: str | Path, patients: Optional[Iterable[str]] = None) -> list[Pair]:
    """The pairs a pairs CSV names, read (see :func:`read_pairs_csv`)."""
    return [load_pair(lo, no, name) for lo, no, name in read_pairs_csv(path, patients)]


def dicom_files(folder: Path) -> list[Path]:
    """The files below ``folder`` in name order (a single file stands for itself); hidden files are skipped."""
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise EvaluateInputError(f"{folder}: no files")
    return files


def load_pair_dirs(low_dir: str | Path, normal_dir: str | Path) -> list[Pair]:
    """Pairs from two folders matched by position in name order (equal counts required)."""
    lows, normals = dicom_files(Path(low_dir)), dicom_files(Path(normal_dir))
    if len(lows) != len(normals):
        raise EvaluateInputError(f"{low_dir} has {len(lows)} files but {normal_dir} has {len(normals)}: "
                         f"--low/--normal are matched by position and need equal counts")
    low_root = Path(low_dir) if Path(low_dir).is_dir() else Path(low_dir).parent
    return [load_pair(lo, no, lo.relative_to(low_root).with_suffix("").as_posix()) for lo, no in zip(lows, normals)]


#: The simulator calibration that ``--simulate`` uses unless ``--calibration`` names another (written by
#: ``python -m experiments.ablation`` with ``ldct_tf.simulate.calibration`` from unpaired AAPM-Mayo slices).
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "configs" / "calibration_aapm_mayo.json"


def simulated_pairs(normal_paths: Iterable[str | Path], dose_fraction: float, seed: int = 0,
                    calibration: Optional[dict] = None, **simulate_kwargs) -> list[Pair]:
    """Pairs simulated from normal-dose files: ``(simulated low dose, same slice through the same projector)``.

    With a ``calibration`` (``ldct_tf.simulate.calibration``) each slice is simulated with its kernel's calibrated ``i0`` and
    FBP filter (the uncalibrated 1e5 default is about 2.3x too noisy for the Mayo quarter dose)."""
    from ldct_tf.simulate import calibration as calibration_lib
    from ldct_tf import simulate

    pairs = []
    for i, path in enumerate(normal_paths):
        hu, info = _read(Path(path))
        if hu.shape[0] != hu.shape[1]:
            raise EvaluateInputError(f"{path}: --simulate needs square slices, got {hu.shape}")
        kwargs = dict(simulate_kwargs)
        if calibration is not None:
            params = calibration_lib.simulation_parameters(calibration, info.kernel)
            kwargs = {"i0": params["i0"], "filter_name": params["filter_name"],
                      "electronic_noise": params["electronic_noise"], **kwargs}
        low, ref = simulate.simulate_low_dose(hu, dose_fraction, seed=seed + i,
                                              pixel_spacing_mm=float(np.mean(info.pixel_spacing_mm)), **kwargs)
        pairs.append(Pair(Path(path).stem, low, ref, tuple(info.pixel_spacing_mm)))
    return pairs
