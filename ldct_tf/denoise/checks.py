"""Input checks before denoising: is each series what the model was made for?

Why: a normal-dose PET/CT series (18.5 mGy) and a GE head CT were denoised without a word (issue 26).  The model was
trained on low-dose abdomen/chest CT reconstructed with smooth to medium-sharp soft-tissue kernels (AAPM-Mayo B30f and
D45f), so it should not silently run on a series that is already at normal dose, that shows a head or was
reconstructed with a head, bone or lung kernel, or whose slices are smaller than the model answers.  Each such series
gets one line naming it and the reason and is skipped unless the caller forces it (``--force``).

The checks read only a few slices of a series (25, 50 and 75 % of its extent), so they cost three reads per series.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ldct_tf import dicom

#: Noise index (``ldct_tf.noise``, HU) below which a series looks normal-dose.  Why 14 HU: on the development
#: patient L143 (``experiments/results/v3_strength.json``, written by ``python -m experiments.v3_strength``; L286 is
#: held out) the smooth B30f kernel measures 15 HU at full dose and 29 HU at Mayo's quarter dose (the sharp D45f 33
#: and 68 HU), and its half-dose slices simulated from the full dose measure 15.6-22.6 HU.  v3 is made to serve
#: 5-50 % dose, so a half-dose smooth-kernel scan must pass: the line sits below the quietest of them.  The
#: normal-dose PET/CT series of issue 26 (``../shared/data/abdomen_series``) measures 12.3 HU and is caught.  Noise
#: alone cannot tell a normal-dose series from a low-dose one in general (a sharp-kernel normal-dose D45f series,
#: 33 HU, passes): this check catches only the clearly quiet ones.
NORMAL_DOSE_MAX_NOISE_HU = 14.0
#: Share of the series' extent at which the checks (and the overview) look: three slices, not the ends.
SAMPLE_FRACTIONS = (0.25, 0.5, 0.75)
#: BodyPartExamined values (upper case) that say "head", not the abdomen/chest the model knows.
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK", "HEADANDNECK", "ORBIT", "SINUS",
                             "IAC", "EAR"})
#: Slice content of a head: a body cross-section below this area (cm2; adult heads measure 70-295 cm2 here, the
#: abdomen and chest series 590-1120 cm2) ...
HEAD_MAX_AREA_CM2 = 400.0
#: ... inside a skull: at least this share of the body pixels is bone (> 300 HU; heads 0.10-0.39, abdomens and
#: chests 0.006-0.05).
HEAD_MIN_BONE_FRACTION = 0.09
BODY_MIN_HU = -500.0
BONE_MIN_HU = 300.0
#: Kernel names that are not soft-tissue body kernels: head, bone, lung, edge enhancing.
OTHER_KERNEL_WORDS = ("HEAD", "BRAIN", "BONE", "LUNG", "EDGE")
#: Siemens kernel names: a letter (B/D body, H head, ...), an optional letter, two digits of sharpness.
SIEMENS_KERNEL = re.compile(r"^([A-Z])[a-z]?(\d{2})")
#: Siemens sharpness from which a body kernel is a bone/lung kernel (the model knows 30 and 45).
SIEMENS_SHARP_FROM = 60

NORMAL_DOSE, NOT_BODY, UNKNOWN_KERNEL, TOO_SMALL = "normal_dose", "not_body_region", "unknown_kernel", "too_small"


@dataclass(frozen=True)
class SeriesCheck:
    """One failed input check of one series: what the console line and the summary say."""

    folder: str  # the input series' folder (console only; never written into the output)
    slices: int
    code: str
    detail: str

    def line(self, forced: bool = False) -> str:
        then = "denoised anyway (--force)" if forced else "skipped; pass --force to denoise it anyway"
        return f"series in {self.folder} ({self.slices} slices): {self.code}: {self.detail}; {then}"

    def anonymous_line(self) -> str:
        """The same without the folder, for files that leave the machine (summary.md)."""
        return f"a series of {self.slices} slices: {self.code}: {self.detail}"


def sample_indices(count: int) -> list[int]:
    """The slices at 25, 50 and 75 % of a series of ``count`` slices (fewer when the series is shorter)."""
    return sorted({min(count - 1, int(fraction * count)) for fraction in SAMPLE_FRACTIONS}) if count else []


def kernel_problem(kernel: str) -> Optional[str]:
    """Why ``kernel`` is not one the model knows, or None (unknown names pass: only clear mismatches are flagged)."""
    for part in str(kernel).replace("\\", " ").split():
        if any(word in part.upper() for word in OTHER_KERNEL_WORDS):
            return f"kernel {part} is not a soft-tissue body kernel"
        match = SIEMENS_KERNEL.match(part)
        if match and match.group(1) == "H":
            return f"kernel {part} is a head kernel"
        if match and match.group(1) in "BDIQ" and int(match.group(2)) >= SIEMENS_SHARP_FROM:
            return f"kernel {part} is sharper than the body kernels the model knows (sharpness 30-45)"
    return None


def head_by_content(hu: np.ndarray, spacing_mm: Sequence[float]) -> bool:
    """A small body cross-section inside a ring of bone: a head (see the thresholds' measurements above)."""
    body = hu > BODY_MIN_HU
    if not body.any():
        return False
    area_cm2 = float(body.sum()) * float(spacing_mm[0]) * float(spacing_mm[1]) / 100.0
    bone = float((hu[body] > BONE_MIN_HU).mean())
    return area_cm2 < HEAD_MAX_AREA_CM2 and bone >= HEAD_MIN_BONE_FRACTION


def is_head(ds, hu: np.ndarray, spacing_mm: Sequence[float]) -> bool:
    """Whether one slice shows a head: by BodyPartExamined when it says so, else by its content."""
    part = str(ds.get("BodyPartExamined", "") or "").upper().replace(" ", "")
    return part in HEAD_BODY_PARTS or head_by_content(hu, spacing_mm)


def check_series(folder: str, files: Sequence[Path], infos: Sequence[dicom.SliceInfo],
                 min_size: int) -> list[SeriesCheck]:
    """Every failed check of one series (files in slice order); an empty list when it looks like what the model
    was made for."""
    found = []
    rows, columns = min(i.rows for i in infos), min(i.columns for i in infos)
    if min(rows, columns) < min_size:
        found.append(SeriesCheck(folder, len(files), TOO_SMALL, f"{rows}x{columns} pixels, the model needs at "
                                                                 f"least {min_size}x{min_size}"))
        return found  # the other checks need slices the noise index and the model can read
    problem = kernel_problem(infos[0].kernel)
    if problem:
        found.append(SeriesCheck(folder, len(files), UNKNOWN_KERNEL, problem))
    from ldct_tf import noise  # imports TensorFlow: only when a run checks its inputs

    levels, heads = [], []
    for index in sample_indices(len(files)):
        ds, hu, info = dicom.read_ct_dataset(files[index])
        levels.append(noise.noise_index(hu))
        heads.append(is_head(ds, hu, info.pixel_spacing_mm))
    if sum(heads) * 2 > len(heads):
        found.append(SeriesCheck(folder, len(files), NOT_BODY, "shows a head (BodyPartExamined or slice content); "
                                                               "the model knows abdomen and chest CT"))
    level = float(np.median(levels))
    if level < NORMAL_DOSE_MAX_NOISE_HU:
        found.append(SeriesCheck(folder, len(files), NORMAL_DOSE,
                                 f"noise index {level:.1f} HU, below {NORMAL_DOSE_MAX_NOISE_HU:.0f} HU, quieter than any "
                                 f"low-dose scan the model was made for: looks normal-dose already"))
    return found


def check_all(series: dict, min_size: int, force: bool, warn) -> list[SeriesCheck]:
    """Check every series of a scan (``plan.scan``'s dict: key -> [(SliceInfo, path)]); each failed check is
    reported through ``warn`` (one line) and, unless ``force``, its series is removed from ``series``."""
    found_all = []
    for key in list(series):
        items = sorted(series[key], key=lambda item: (item[0].z_mm, item[0].instance, str(item[1])))
        folder = str(Path(os.path.commonpath([str(path.parent) for _, path in items])))
        try:
            found = check_series(folder, [path for _, path in items], [info for info, _ in items], min_size)
        except dicom.NotUsableCT as exc:  # a file that changed since the scan: the series cannot be judged
            found = [SeriesCheck(folder, len(items), exc.reason, f"{Path(exc.source).name} changed since the scan")]
        for check in found:
            warn(check.line(forced=force))
        if found and not force:
            del series[key]
        found_all.extend(found)
    return found_all
