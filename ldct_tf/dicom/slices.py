"""What both CT readers share: SliceInfo, the rejection reasons, tag access, decoding, geometry and plausibility.

The seam between ``ldct_tf.dicom.read`` (single-frame CT) and ``ldct_tf.dicom.enhanced`` (multi-frame Enhanced CT):
both build on these pieces, and neither imports the other's internals.

The reading direction of ``ldct_tf.dicom`` (which re-exports everything here; the writing direction is
``ldct_tf.dicom.write``).  Shared by the Beam pipeline (bytes through Beam's filesystems) and the denoise CLI (local
files), so both accept and reject the same files with the same reasons.  Why pydicom and not tensorflow-io, and why
:class:`SliceInfo` may carry the real PatientID and UIDs (never out of the process; its repr hides them): see
``ldct_tf.dicom``.
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Optional, Sequence, Union

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ldct_tf import ct, keras_compat
from ldct_tf.dicom import plausibility
from ldct_tf.errors import LdctError

keras_compat.quiet_pydicom_validation()  # its warnings would print identifiers into logs

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
MULTI_FRAME_CT_CLASSES = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE)

#: An image counts as axial when its normal is within this angle of the patient z axis. 45 degrees accepts gantry
#: tilt (up to about 30 degrees on clinical scanners) and rejects coronal and sagittal reformats.
MAX_AXIAL_TILT_DEG = 45.0

# Stable rejection reasons: they are the keys of manifest.json's ``rejected_by_reason`` and of Beam counters.
NOT_DICOM = "not_dicom"
UNREADABLE = "unreadable_dicom"
NOT_CT_IMAGE = "not_ct_image_storage"
LOCALIZER = "localizer"
NO_PIXEL_DATA = "no_pixel_data"
UNDECODABLE = "undecodable_pixel_data"
MULTI_FRAME = "multi_frame_unsupported"
NOT_GRAYSCALE = "not_grayscale"
NOT_AXIAL = "not_axial"
BAD_GEOMETRY = "bad_geometry"

PathOrFile = Union[str, os.PathLike, BinaryIO, bytes]


class NotUsableCT(LdctError):
    """A file that is not a usable axial CT image. ``reason`` is one of the stable codes above; ``detail`` explains."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {reason}: {detail}")
        self.source = source
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SliceInfo:
    """Geometry and acquisition tags of one axial slice (what the TFRecord needs, plus grouping keys)."""

    source: str
    patient_id: str = field(repr=False)
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    sop_uid: str = field(repr=False)
    frame_of_reference_uid: str = field(repr=False)
    rows: int
    columns: int
    instance: int
    frame: int  # 0 for single-frame files; the frame index inside an Enhanced CT object
    position_mm: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    kvp: float
    exposure_mas: float
    ctdivol: float
    kernel: str
    manufacturer: str
    series_description: str = field(repr=False)  # free text: may hold names, so kept out of logs and records

    @property
    def patient_key(self) -> str:
        """What identifies the patient for splitting: PatientID, else the study, else the frame of reference.

        Fully anonymised files (all three blank) return "" and cannot be split by patient.
        """
        for prefix, value in (("", self.patient_id), ("study:", self.study_uid),
                              ("frame-of-reference:", self.frame_of_reference_uid)):
            if value:
                return prefix + value
        return ""

    @property
    def series_key(self) -> str:
        """SeriesInstanceUID, else frame of reference + description + kernel (anonymisers sometimes blank UIDs)."""
        return series_key(self.series_uid, self.frame_of_reference_uid, self.series_description, self.kernel,
                          self.slice_thickness_mm)

    @property
    def group_key(self) -> tuple[str, str, str]:
        """(PatientID, StudyInstanceUID, :attr:`series_key`): what makes one series.  Two patients whose scanners
        wrote the same SeriesInstanceUID (issue 27) are two series, never one."""
        return self.patient_id, self.study_uid, self.series_key

    @property
    def z_mm(self) -> float:
        """Position along the slice normal (equals ImagePositionPatient z for untilted axial slices)."""
        return float(np.dot(self.position_mm, slice_normal(self.orientation)))


def series_key(series_uid: str, frame_of_reference_uid: str, description: str, kernel: str, thickness: float) -> str:
    """:attr:`SliceInfo.series_key` from its parts (also used on headers read without their pixels)."""
    if series_uid:
        return series_uid
    return f"{frame_of_reference_uid}|{description}|{kernel}|{thickness}"


def header_group_key(ds: Dataset) -> tuple[str, str, str]:
    """:attr:`SliceInfo.group_key` of a dataset whose pixels could not be read (to refuse its whole series)."""
    key = series_key(tag_text(ds, "SeriesInstanceUID"), tag_text(ds, "FrameOfReferenceUID"),
                     tag_text(ds, "SeriesDescription"), tag_text(ds, "ConvolutionKernel"),
                     tag_float(ds, "SliceThickness"))
    return tag_text(ds, "PatientID"), tag_text(ds, "StudyInstanceUID"), key



def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def source_name(src: PathOrFile, name: Optional[str]) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "name", "<bytes>")


def tag_float(ds: Dataset, keyword: str, default: float = float("nan")) -> float:
    """A numeric tag (its first value if multi-valued), ``default`` when absent, blank or not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return default


def rescale(ds: Dataset, source: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept): 1 and 0 when absent or blank; a value that is not a number is refused, since
    reading it as the default would shift every HU (a non-numeric intercept used to become 0: +1024 HU, issue 27).
    The value is not echoed: a malformed tag can hold anything."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        try:
            raw = ds.get(keyword)
        except (TypeError, ValueError):  # pydicom may fail converting a malformed DS
            raw = "not a number"
        if not _blank_or_number(raw):
            raise NotUsableCT(source, plausibility.IMPLAUSIBLE_RESCALE, f"{keyword} is not a number")
        values.append(tag_float(ds, keyword, default))
    return values[0], values[1]


def _blank_or_number(value) -> bool:
    if value is None or value == "":
        return True
    try:
        float(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)
        return True
    except (TypeError, ValueError, IndexError):
        return False


def check_size(ds: Dataset, source: str, max_pixels: Optional[int]) -> None:
    """Refuse a slice larger than ``max_pixels`` (Rows x Columns) before its pixels are decoded: a 5000x5000 slice
    needs gigabytes on the way through the model."""
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if max_pixels is not None and rows * columns > max_pixels:
        raise NotUsableCT(source, plausibility.TOO_LARGE, f"{rows}x{columns} pixels is more than the {max_pixels} "
                                                          f"allowed (a larger limit can be set)")


def tag_text(ds: Dataset, keyword: str) -> str:
    """A text tag stripped ("" when absent); multiple values joined with a backslash as DICOM writes them."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _exposure_mas(ds: Dataset) -> float:
    """Exposure in mAs: the Exposure tag, else ExposureInuAs / 1000, else tube current x exposure time."""
    value = tag_float(ds, "Exposure")
    if not math.isnan(value):
        return value
    value = tag_float(ds, "ExposureInuAs")
    if not math.isnan(value):
        return value / 1000.0
    current, time_ms = tag_float(ds, "XRayTubeCurrent"), tag_float(ds, "ExposureTime")
    if not (math.isnan(current) or math.isnan(time_ms)):
        return current * time_ms / 1000.0
    return float("nan")


def read_dataset(src: PathOrFile, name: Optional[str] = None) -> Dataset:
    """Parse a DICOM file (path, bytes or binary file object), raising :class:`NotUsableCT` with the reason."""
    source = source_name(src, name)
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    try:
        return pydicom.dcmread(src)
    except pydicom.errors.InvalidDicomError:
        pass  # no DICM preamble: retry below, some archives strip it
    except FileNotFoundError as exc:
        raise NotUsableCT(source, UNREADABLE, f"file not found ({exc.strerror})") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise NotUsableCT(source, UNREADABLE, f"cannot parse DICOM: {type(exc).__name__}: {exc}") from exc
    if hasattr(src, "seek"):
        src.seek(0)
    try:
        ds = pydicom.dcmread(src, force=True)
    except Exception as exc:
        raise NotUsableCT(source, NOT_DICOM, f"not a DICOM file ({type(exc).__name__})") from exc
    # force=True "parses" any bytes: only accept it when it found real image attributes.
    if not sop_class_of(ds) or "Rows" not in ds:
        raise NotUsableCT(source, NOT_DICOM, "not a DICOM file (no DICM preamble and no SOP Class UID / Rows)")
    return ds


def sop_class_of(ds: Dataset) -> UID:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID (some anonymisers blank the former)."""
    value = str(ds.get("SOPClassUID", "") or "").strip()
    if not value and hasattr(ds, "file_meta"):
        value = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return UID(value)


def check_image_dataset(ds: Dataset, source: str) -> None:
    sop_class = sop_class_of(ds)
    if sop_class not in (CT_IMAGE_STORAGE, *MULTI_FRAME_CT_CLASSES):
        what = sop_class.name if sop_class else "no SOP Class UID"
        raise NotUsableCT(source, NOT_CT_IMAGE, f"SOP class is {what}, not CT Image Storage")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        raise NotUsableCT(source, LOCALIZER, "ImageType says LOCALIZER (a scout/topogram, not an axial slice)")
    if "PixelData" not in ds:
        raise NotUsableCT(source, NO_PIXEL_DATA, "the file has no Pixel Data element")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise NotUsableCT(source, NOT_GRAYSCALE, f"{samples} samples per pixel, {photometric}: not a grayscale CT")


def decode_pixels(ds: Dataset, source: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        syntax_name = UID(str(syntax)).name if syntax != "unknown" else syntax
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise NotUsableCT(source, UNDECODABLE, f"cannot decode pixel data ({syntax_name}): {message}") from exc


def geometry(
    source: str, position, orientation, spacing
) -> tuple[tuple[float, float, float], tuple[float, ...], tuple[float, float]]:
    try:
        pos = tuple(float(v) for v in position)
        ori = tuple(float(v) for v in orientation)
        spc = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as exc:
        raise NotUsableCT(source, BAD_GEOMETRY, f"unreadable geometry tags: {exc}") from exc
    if len(pos) != 3 or len(ori) != 6 or len(spc) != 2:
        raise NotUsableCT(
            source, BAD_GEOMETRY, "ImagePositionPatient / ImageOrientationPatient / PixelSpacing missing or malformed"
        )
    if not all(math.isfinite(v) for v in pos + ori + spc) or min(spc) <= 0:
        raise NotUsableCT(source, BAD_GEOMETRY, f"non-finite position/orientation or bad pixel spacing {spc}")
    if np.linalg.norm(np.cross(ori[:3], ori[3:])) < 1e-6:  # all zero or parallel: no plane (was taken as axial)
        raise NotUsableCT(source, BAD_GEOMETRY, "ImageOrientationPatient does not define a plane (zero or parallel "
                                                "row and column vectors)")
    tilt = math.degrees(math.acos(min(1.0, abs(float(slice_normal(ori)[2])))))
    if tilt > MAX_AXIAL_TILT_DEG:
        raise NotUsableCT(source, NOT_AXIAL, f"image plane is {tilt:.0f} degrees from axial (a reformat, not a slice)")
    return pos, ori, spc  # type: ignore[return-value]


def check_plausible(source: str, hu: np.ndarray, slope: float, intercept: float) -> None:
    """Header-valid nonsense (RescaleSlope 0, HU off any CT scale, a 1x1 image) is refused like a broken file."""
    found = plausibility.problem(hu.shape[0], hu.shape[1], slope, intercept, hu)
    if found is not None:
        raise NotUsableCT(source, *found)


def common_tags(ds: Dataset) -> dict:
    return dict(
        patient_id=tag_text(ds, "PatientID"),
        study_uid=tag_text(ds, "StudyInstanceUID"),
        series_uid=tag_text(ds, "SeriesInstanceUID"),
        sop_uid=tag_text(ds, "SOPInstanceUID"),
        frame_of_reference_uid=tag_text(ds, "FrameOfReferenceUID"),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        kvp=tag_float(ds, "KVP"),
        exposure_mas=_exposure_mas(ds),
        ctdivol=tag_float(ds, "CTDIvol"),
        kernel=tag_text(ds, "ConvolutionKernel"),
        manufacturer=tag_text(ds, "Manufacturer"),
        series_description=tag_text(ds, "SeriesDescription"),
    )


def padding_tags(ds: Dataset) -> tuple[Optional[float], Optional[float]]:
    """PixelPaddingValue and PixelPaddingRangeLimit as floats (None when absent)."""
    value = ds.get("PixelPaddingValue")
    limit = ds.get("PixelPaddingRangeLimit")
    return (None if value is None else float(value)), (None if limit is None else float(limit))
