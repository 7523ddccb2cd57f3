"""Reading axial CT with pydicom: a file into HU slices (single-frame here, Enhanced CT in ``enhanced``), slices
grouped into series.  Shared by the Beam pipeline and the denoise CLI, so both accept and reject the same files with
the same reasons (``ldct_tf.dicom.slices``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import numpy as np
from pydicom.dataset import Dataset

from ldct_tf import ct
from ldct_tf.dicom.enhanced import read_enhanced
from ldct_tf.dicom.slices import (MULTI_FRAME, MULTI_FRAME_CT_CLASSES, NOT_GRAYSCALE, NotUsableCT, PathOrFile,
                                  SliceInfo, check_image_dataset, check_plausible, check_size, common_tags,
                                  decode_pixels, geometry, padding_tags, read_dataset, rescale, sop_class_of,
                                  source_name, tag_float)


def read_slices(src: PathOrFile, name: Optional[str] = None) -> list[tuple[np.ndarray, SliceInfo]]:
    """Read a CT file into ``[(hu float32 [rows, cols], SliceInfo)]``: one item, or one per frame of an Enhanced CT.

    Raises :class:`NotUsableCT` naming the file and the reason for anything that is not a usable axial CT image.
    """
    source = source_name(src, name)
    ds = read_dataset(src, source)
    check_image_dataset(ds, source)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    sop_class = sop_class_of(ds)
    if n_frames > 1 and sop_class not in MULTI_FRAME_CT_CLASSES:
        raise NotUsableCT(source, MULTI_FRAME, f"{n_frames} frames in a CT Image Storage object (not Enhanced CT)")
    if sop_class in MULTI_FRAME_CT_CLASSES:
        return read_enhanced(ds, source, n_frames)
    return [_read_single(ds, source)]


def read_slice(src: PathOrFile, name: Optional[str] = None) -> tuple[np.ndarray, SliceInfo]:
    """Read a single-slice CT file; a multi-frame object raises ``NotUsableCT`` (use :func:`read_slices`)."""
    slices = read_slices(src, name)
    if len(slices) != 1:
        raise NotUsableCT(source_name(src, name), MULTI_FRAME, f"{len(slices)} frames; use read_slices()")
    return slices[0]


def _read_single(ds: Dataset, source: str, max_pixels: Optional[int] = None) -> tuple[np.ndarray, SliceInfo]:
    pos, ori, spc = geometry(source, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                              ds.get("PixelSpacing"))
    slope, intercept = rescale(ds, source)
    check_size(ds, source, max_pixels)  # before decoding: a huge slice is refused, not allocated
    stored = decode_pixels(ds, source)
    if stored.ndim != 2:
        raise NotUsableCT(source, NOT_GRAYSCALE, f"decoded pixel array has shape {stored.shape}, expected 2-D")
    pad_value, pad_limit = padding_tags(ds)
    hu = ct.to_hu(stored, slope, intercept, pad_value, pad_limit)
    check_plausible(source, hu, slope, intercept)
    info = SliceInfo(
        source=source,
        instance=int(tag_float(ds, "InstanceNumber", 0.0)),
        frame=0,
        position_mm=pos,
        orientation=ori,
        pixel_spacing_mm=spc,
        slice_thickness_mm=tag_float(ds, "SliceThickness"),
        **common_tags(ds),
    )
    return hu, info


def group_series(infos: Iterable[SliceInfo]) -> dict[str, list[SliceInfo]]:
    """Group slices by series (:attr:`SliceInfo.series_key`), each series sorted by position along its normal (then instance number)."""
    series: dict[str, list[SliceInfo]] = defaultdict(list)
    for info in infos:
        series[info.series_key].append(info)
    return {uid: sorted(items, key=lambda s: (s.z_mm, s.instance, s.frame)) for uid, items in series.items()}



def read_ct_dataset(src: PathOrFile, name: Optional[str] = None, max_pixels: Optional[int] = None
                    ) -> tuple[Dataset, np.ndarray, SliceInfo]:
    """Read a single-frame CT file into ``(dataset, hu float32 [rows, cols], SliceInfo)``.

    The same checks as :func:`read_slices` (same :class:`NotUsableCT` reasons), but the parsed dataset is returned too,
    so that a derived object can be written from it without parsing and decoding the file twice.  Enhanced
    (multi-frame) CT raises ``NotUsableCT`` with reason ``multi_frame_unsupported``: writing a derived multi-frame
    object is not implemented.  ``max_pixels`` refuses a slice of more than that many pixels before decoding it.
    """
    source = source_name(src, name)
    ds = read_dataset(src, source)
    check_image_dataset(ds, source)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 or sop_class_of(ds) in MULTI_FRAME_CT_CLASSES:
        raise NotUsableCT(source, MULTI_FRAME, f"{n_frames}-frame {sop_class_of(ds).name} object: only single-frame "
                                               "CT Image Storage files can be written back as a derived series")
    hu, info = _read_single(ds, source, max_pixels)
    return ds, hu, info
