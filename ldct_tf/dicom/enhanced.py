"""Enhanced and Legacy Converted Enhanced CT: one multi-frame object split into axial slices, one per frame.

Kept apart from ``ldct_tf.dicom.read`` (which calls it for those SOP classes) because the functional-group lookups
(PS3.3 C.7.6.16) are a format of their own; every check and rejection reason is the single-frame reader's.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from pydicom.dataset import Dataset

from ldct_tf import ct
from ldct_tf.dicom.slices import (BAD_GEOMETRY, LOCALIZER, NOT_GRAYSCALE, NotUsableCT, SliceInfo, check_plausible,
                                common_tags, decode_pixels, geometry, padding_tags, tag_float)
from ldct_tf.dicom.slices import rescale as read_rescale


def _first_item(ds: Dataset, keyword: str) -> Optional[Dataset]:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional_group(frame_groups: Optional[Dataset], shared: Optional[Dataset], keyword: str) -> Optional[Dataset]:
    """Per-frame functional group item when present, else the shared one (PS3.3 C.7.6.16)."""
    for groups in (frame_groups, shared):
        if groups is not None and keyword in groups:
            item = _first_item(groups, keyword)
            if item is not None:
                return item
    return None


def read_enhanced(ds: Dataset, source: str, n_frames: int) -> list[tuple[np.ndarray, SliceInfo]]:
    """Split an Enhanced / Legacy Converted Enhanced CT object into slices, one per frame.

    Geometry and rescale come from the per-frame functional groups, falling back to the shared ones.  Frames that
    are localizers (FrameType / CT Image Frame Type) are rejected as a whole object because they are never mixed with
    axial frames in practice.
    """
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, n_frames):
        raise NotUsableCT(source, BAD_GEOMETRY, f"{len(per_frame)} per-frame groups for {n_frames} frames")
    stored = decode_pixels(ds, source)
    if stored.ndim == 2:
        stored = stored[np.newaxis]
    if stored.ndim != 3 or stored.shape[0] != n_frames:
        raise NotUsableCT(source, NOT_GRAYSCALE, f"decoded pixel array has shape {stored.shape} for {n_frames} frames")
    common = common_tags(ds)
    pad_value, pad_limit = padding_tags(ds)
    out = []
    for index in range(n_frames):
        groups = per_frame[index] if per_frame else None
        frame_type = _functional_group(groups, shared, "CTImageFrameTypeSequence")
        if frame_type is not None and "LOCALIZER" in [str(v).upper() for v in (frame_type.get("FrameType") or [])]:
            raise NotUsableCT(source, LOCALIZER, f"frame {index + 1} is a LOCALIZER")
        plane_pos = _functional_group(groups, shared, "PlanePositionSequence")
        plane_ori = _functional_group(groups, shared, "PlaneOrientationSequence")
        measures = _functional_group(groups, shared, "PixelMeasuresSequence")
        rescale = _functional_group(groups, shared, "PixelValueTransformationSequence")
        content = _functional_group(groups, None, "FrameContentSequence")
        pos, ori, spc = geometry(
            f"{source} frame {index + 1}",
            plane_pos.get("ImagePositionPatient") if plane_pos else None,
            plane_ori.get("ImageOrientationPatient") if plane_ori else None,
            measures.get("PixelSpacing") if measures else None,
        )
        slope, intercept = read_rescale(rescale if rescale else ds, f"{source} frame {index + 1}")
        hu = ct.to_hu(stored[index], slope, intercept, pad_value, pad_limit)
        check_plausible(f"{source} frame {index + 1}", hu, slope, intercept)
        thickness = tag_float(measures, "SliceThickness") if measures else float("nan")
        number = tag_float(content, "InStackPositionNumber", float(index + 1)) if content else float(index + 1)
        info = SliceInfo(
            source=source,
            instance=int(number),
            frame=index,
            position_mm=pos,
            orientation=ori,
            pixel_spacing_mm=spc,
            slice_thickness_mm=thickness,
            **common,
        )
        out.append((hu, info))
    return out
