"""pydicom I/O for axial CT: read a file into HU slices, say exactly why a file is unusable, group slices into series,
write a derived (denoised) slice back as a new series.

Shared by the Beam pipeline (which reads bytes through Beam's filesystems) and the denoise CLI (which reads local
files), so both accept the same files and reject the same files with the same reasons.

Why pydicom and not tensorflow-io: tensorflow-io does not load with TF 2.21, and even where it loads its DICOM op
returns empty tensors for uint16 CT (see ``shared/STACK.md``).  pydicom with the pylibjpeg plugins decodes every
transfer syntax a CT scanner writes (JPEG lossless, JPEG-LS, JPEG 2000, RLE).

A :class:`SliceInfo` carries the real PatientID and UIDs because the pipeline needs them to build salted pseudonyms
and to group series.  They never leave the process: ``records.py`` writes only pseudonyms, and ``SliceInfo``'s repr
hides them so that a stray log line cannot leak them.
"""

from __future__ import annotations

import copy
import datetime
import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Iterable, Optional, Sequence, Union

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ldct_tf import ai_marking, ct, keras_compat, plausibility

if TYPE_CHECKING:
    from ldct_tf.deidentify import Deidentifier

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


class NotUsableCT(Exception):
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
        if self.series_uid:
            return self.series_uid
        return f"{self.frame_of_reference_uid}|{self.series_description}|{self.kernel}|{self.slice_thickness_mm}"

    @property
    def z_mm(self) -> float:
        """Position along the slice normal (equals ImagePositionPatient z for untilted axial slices)."""
        return float(np.dot(self.position_mm, slice_normal(self.orientation)))


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _source_name(src: PathOrFile, name: Optional[str]) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "name", "<bytes>")


def _float(ds: Dataset, keyword: str, default: float = float("nan")) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return default


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _exposure_mas(ds: Dataset) -> float:
    """Exposure in mAs: the Exposure tag, else ExposureInuAs / 1000, else tube current x exposure time."""
    value = _float(ds, "Exposure")
    if not math.isnan(value):
        return value
    value = _float(ds, "ExposureInuAs")
    if not math.isnan(value):
        return value / 1000.0
    current, time_ms = _float(ds, "XRayTubeCurrent"), _float(ds, "ExposureTime")
    if not (math.isnan(current) or math.isnan(time_ms)):
        return current * time_ms / 1000.0
    return float("nan")


def read_dataset(src: PathOrFile, name: Optional[str] = None) -> Dataset:
    """Parse a DICOM file (path, bytes or binary file object), raising :class:`NotUsableCT` with the reason."""
    source = _source_name(src, name)
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
    if not _sop_class(ds) or "Rows" not in ds:
        raise NotUsableCT(source, NOT_DICOM, "not a DICOM file (no DICM preamble and no SOP Class UID / Rows)")
    return ds


def _sop_class(ds: Dataset) -> UID:
    """SOPClassUID, falling back to the file meta's MediaStorageSOPClassUID (some anonymisers blank the former)."""
    value = str(ds.get("SOPClassUID", "") or "").strip()
    if not value and hasattr(ds, "file_meta"):
        value = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return UID(value)


def _check_image_ds(ds: Dataset, source: str) -> None:
    sop_class = _sop_class(ds)
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


def _decode(ds: Dataset, source: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        syntax_name = UID(str(syntax)).name if syntax != "unknown" else syntax
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise NotUsableCT(source, UNDECODABLE, f"cannot decode pixel data ({syntax_name}): {message}") from exc


def _geometry(
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
    tilt = math.degrees(math.acos(min(1.0, abs(float(slice_normal(ori)[2])))))
    if tilt > MAX_AXIAL_TILT_DEG:
        raise NotUsableCT(source, NOT_AXIAL, f"image plane is {tilt:.0f} degrees from axial (a reformat, not a slice)")
    return pos, ori, spc  # type: ignore[return-value]


def _check_plausible(source: str, hu: np.ndarray, slope: float, intercept: float) -> None:
    """Header-valid nonsense (RescaleSlope 0, HU off any CT scale, a 1x1 image) is refused like a broken file."""
    found = plausibility.problem(hu.shape[0], hu.shape[1], slope, intercept, hu)
    if found is not None:
        raise NotUsableCT(source, *found)


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


def read_slices(src: PathOrFile, name: Optional[str] = None) -> list[tuple[np.ndarray, SliceInfo]]:
    """Read a CT file into ``[(hu float32 [rows, cols], SliceInfo)]``: one item, or one per frame of an Enhanced CT.

    Raises :class:`NotUsableCT` naming the file and the reason for anything that is not a usable axial CT image.
    """
    source = _source_name(src, name)
    ds = read_dataset(src, source)
    _check_image_ds(ds, source)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    sop_class = _sop_class(ds)
    if n_frames > 1 and sop_class not in MULTI_FRAME_CT_CLASSES:
        raise NotUsableCT(source, MULTI_FRAME, f"{n_frames} frames in a CT Image Storage object (not Enhanced CT)")
    if sop_class in MULTI_FRAME_CT_CLASSES:
        return _read_enhanced(ds, source, n_frames)
    return [_read_single(ds, source)]


def read_slice(src: PathOrFile, name: Optional[str] = None) -> tuple[np.ndarray, SliceInfo]:
    """Read a single-slice CT file; a multi-frame object raises ``NotUsableCT`` (use :func:`read_slices`)."""
    slices = read_slices(src, name)
    if len(slices) != 1:
        raise NotUsableCT(_source_name(src, name), MULTI_FRAME, f"{len(slices)} frames; use read_slices()")
    return slices[0]


def _common_tags(ds: Dataset) -> dict:
    return dict(
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        kvp=_float(ds, "KVP"),
        exposure_mas=_exposure_mas(ds),
        ctdivol=_float(ds, "CTDIvol"),
        kernel=_text(ds, "ConvolutionKernel"),
        manufacturer=_text(ds, "Manufacturer"),
        series_description=_text(ds, "SeriesDescription"),
    )


def _padding(ds: Dataset) -> tuple[Optional[float], Optional[float]]:
    value = ds.get("PixelPaddingValue")
    limit = ds.get("PixelPaddingRangeLimit")
    return (None if value is None else float(value)), (None if limit is None else float(limit))


def _read_single(ds: Dataset, source: str) -> tuple[np.ndarray, SliceInfo]:
    pos, ori, spc = _geometry(source, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                              ds.get("PixelSpacing"))
    stored = _decode(ds, source)
    if stored.ndim != 2:
        raise NotUsableCT(source, NOT_GRAYSCALE, f"decoded pixel array has shape {stored.shape}, expected 2-D")
    pad_value, pad_limit = _padding(ds)
    slope, intercept = _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0)
    hu = ct.to_hu(stored, slope, intercept, pad_value, pad_limit)
    _check_plausible(source, hu, slope, intercept)
    info = SliceInfo(
        source=source,
        instance=int(_float(ds, "InstanceNumber", 0.0)),
        frame=0,
        position_mm=pos,
        orientation=ori,
        pixel_spacing_mm=spc,
        slice_thickness_mm=_float(ds, "SliceThickness"),
        **_common_tags(ds),
    )
    return hu, info


def _read_enhanced(ds: Dataset, source: str, n_frames: int) -> list[tuple[np.ndarray, SliceInfo]]:
    """Split an Enhanced / Legacy Converted Enhanced CT object into slices, one per frame.

    Geometry and rescale come from the per-frame functional groups, falling back to the shared ones.  Frames that
    are localizers (FrameType / CT Image Frame Type) are rejected as a whole object because they are never mixed with
    axial frames in practice.
    """
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, n_frames):
        raise NotUsableCT(source, BAD_GEOMETRY, f"{len(per_frame)} per-frame groups for {n_frames} frames")
    stored = _decode(ds, source)
    if stored.ndim == 2:
        stored = stored[np.newaxis]
    if stored.ndim != 3 or stored.shape[0] != n_frames:
        raise NotUsableCT(source, NOT_GRAYSCALE, f"decoded pixel array has shape {stored.shape} for {n_frames} frames")
    common = _common_tags(ds)
    pad_value, pad_limit = _padding(ds)
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
        pos, ori, spc = _geometry(
            f"{source} frame {index + 1}",
            plane_pos.get("ImagePositionPatient") if plane_pos else None,
            plane_ori.get("ImageOrientationPatient") if plane_ori else None,
            measures.get("PixelSpacing") if measures else None,
        )
        slope = _float(rescale, "RescaleSlope", 1.0) if rescale else _float(ds, "RescaleSlope", 1.0)
        intercept = _float(rescale, "RescaleIntercept", 0.0) if rescale else _float(ds, "RescaleIntercept", 0.0)
        hu = ct.to_hu(stored[index], slope, intercept, pad_value, pad_limit)
        _check_plausible(f"{source} frame {index + 1}", hu, slope, intercept)
        thickness = _float(measures, "SliceThickness") if measures else float("nan")
        number = _float(content, "InStackPositionNumber", float(index + 1)) if content else float(index + 1)
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


def group_series(infos: Iterable[SliceInfo]) -> dict[str, list[SliceInfo]]:
    """Group slices by series (:attr:`SliceInfo.series_key`), each series sorted by position along its normal (then instance number)."""
    series: dict[str, list[SliceInfo]] = defaultdict(list)
    for info in infos:
        series[info.series_key].append(info)
    return {uid: sorted(items, key=lambda s: (s.z_mm, s.instance, s.frame)) for uid, items in series.items()}


# ------------------------------------------------------------------------------------------- derived (denoised) series
#
# Used by the denoise CLI: a denoised slice is written as a new DICOM object derived from the input file.  Everything
# about the patient, the study and the geometry is copied so that a viewer stacks the new series beside the original;
# what identifies the new object (Series/SOP Instance UIDs), what says it is derived (ImageType, DerivationDescription,
# SourceImageSequence) and the pixel data change.

#: Transfer syntaxes whose compression always loses information (JPEG baseline/extended, JPEG-LS near-lossless).
#: JPEG 2000 (.91) and HTJ2K (.203) may be either, so for them the input's own LossyImageCompression is trusted.
_LOSSY_SYNTAXES = {UID("1.2.840.10008.1.2.4.50"), UID("1.2.840.10008.1.2.4.51"), UID("1.2.840.10008.1.2.4.81")}

#: Attributes that describe the old pixel data (or an old rendering of it) and would be wrong for the new pixels.
_STALE_PIXEL_ATTRIBUTES = ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                           "LargestPixelValueInSeries", "IconImageSequence", "ExtendedOffsetTable",
                           "ExtendedOffsetTableLengths", "FloatPixelData", "DoubleFloatPixelData")

#: CodeSequence meaning "source image for image processing operation" (DICOM CID 7202, code 121322).
_SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def read_ct_dataset(src: PathOrFile, name: Optional[str] = None) -> tuple[Dataset, np.ndarray, SliceInfo]:
    """Read a single-frame CT file into ``(dataset, hu float32 [rows, cols], SliceInfo)``.

    The same checks as :func:`read_slices` (same :class:`NotUsableCT` reasons), but the parsed dataset is returned too,
    so that a derived object can be written from it without parsing and decoding the file twice.  Enhanced
    (multi-frame) CT raises ``NotUsableCT`` with reason ``multi_frame_unsupported``: writing a derived multi-frame
    object is not implemented.
    """
    source = _source_name(src, name)
    ds = read_dataset(src, source)
    _check_image_ds(ds, source)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 or _sop_class(ds) in MULTI_FRAME_CT_CLASSES:
        raise NotUsableCT(source, MULTI_FRAME, f"{n_frames}-frame {_sop_class(ds).name} object: only single-frame "
                                               "CT Image Storage files can be written back as a derived series")
    hu, info = _read_single(ds, source)
    return ds, hu, info


def stored_value_range(ds: Dataset) -> tuple[int, int]:
    """The smallest and largest stored pixel value that BitsStored and PixelRepresentation allow."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def stored_dtype(ds: Dataset) -> np.dtype:
    """The numpy integer type of the stored pixels (BitsAllocated 8/16/32, signed or not)."""
    bits = int(ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits not in (8, 16, 32):
        raise ValueError(f"BitsAllocated {bits} is not supported for writing pixel data (8, 16 or 32)")
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def hu_to_stored(hu: np.ndarray, ds: Dataset) -> np.ndarray:
    """HU -> the dataset's stored integer values with its own RescaleSlope / RescaleIntercept, rounded and clipped to
    the range that BitsStored allows (so a value the input cannot represent saturates instead of wrapping around)."""
    slope = _float(ds, "RescaleSlope", 1.0)
    intercept = _float(ds, "RescaleIntercept", 0.0)
    if not math.isfinite(slope) or slope == 0:
        raise ValueError(f"RescaleSlope {slope} cannot be inverted")
    low, high = stored_value_range(ds)
    stored = np.rint((np.asarray(hu, np.float64) - intercept) / slope)
    return np.clip(stored, low, high).astype(stored_dtype(ds))


def _padding_range(ds: Dataset) -> Optional[tuple[float, float]]:
    """The stored values that PixelPaddingValue (and PixelPaddingRangeLimit) reserve for "outside the scan"."""
    pad_value, pad_limit = _padding(ds)
    if pad_value is None:
        return None
    return (pad_value, pad_value) if pad_limit is None else tuple(sorted((pad_value, pad_limit)))  # type: ignore


def _keep_padding(stored: np.ndarray, source: Dataset) -> np.ndarray:
    """Pixels that were padding in ``source`` keep their stored value; any other pixel whose new value falls into the
    padding range is moved just outside it, or a reader would take a denoised pixel for padding (this happens with
    lossy-compressed inputs, whose air pixels scatter around the padding value)."""
    padding = _padding_range(source)
    if padding is None:
        return stored
    lo, hi = padding
    raw = np.asarray(source.pixel_array)
    was_padding = (raw >= lo) & (raw <= hi)
    collides = (stored >= lo) & (stored <= hi) & ~was_padding
    if collides.any():
        low, high = stored_value_range(source)
        stored[collides] = hi + 1 if hi + 1 <= high else lo - 1
    stored[was_padding] = raw[was_padding].astype(stored.dtype)
    return stored


def _uid_or_new(value: Optional[str]) -> str:
    return str(value) if value else str(pydicom.uid.generate_uid())


@dataclass(frozen=True)
class DerivedSeries:
    """What every slice of one derived series shares: its new UID and how the derivation is described.

    ``study_uid`` / ``frame_of_reference_uid`` are used only when the input lacks them (anonymisers sometimes blank
    them; the output must carry them, and one value per series keeps its slices together).  Make one per input series
    with :meth:`new`.
    """

    series_uid: str
    description_suffix: str
    derivation_description: str
    study_uid: str
    frame_of_reference_uid: str
    series_number_offset: int = 1000
    model: Optional[ai_marking.AIModel] = None  # the AI model that made the series (Contributing Equipment etc.)
    deidentifier: Optional["Deidentifier"] = None  # PS3.15 basic profile (ldct_tf.deidentify), shared by a run

    @classmethod
    def new(cls, derivation_description: str, description_suffix: str = " denoised",
            model: Optional[ai_marking.AIModel] = None, deidentifier: Optional["Deidentifier"] = None
            ) -> "DerivedSeries":
        generate = pydicom.uid.generate_uid
        return cls(str(generate()), description_suffix, derivation_description, str(generate()), str(generate()),
                   model=model, deidentifier=deidentifier)


def derived_dataset(source: Dataset, hu: np.ndarray, series: DerivedSeries) -> Dataset:
    """A new CT image derived from ``source`` holding ``hu`` (float HU, the source's shape); ``source`` is not changed.

    Pixel data: the source's integer type, BitsStored and rescale (:func:`hu_to_stored`), written uncompressed
    (Explicit VR Little Endian, or Implicit VR Little Endian when the source used it); pixels the source marks as
    padding keep their padding value.  New SeriesInstanceUID (``series``) and SOPInstanceUID; ImageType
    DERIVED\\SECONDARY (value 3 on, e.g. AXIAL, kept); SeriesDescription gets ``series.description_suffix``;
    DerivationDescription and a SourceImageSequence item point at the source image; SeriesNumber moves by
    ``series.series_number_offset`` so that viewers list both series apart.  Patient, study, frame of reference,
    geometry and acquisition attributes are copied as they are.
    """
    hu = np.asarray(hu)
    if hu.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"denoised slice has shape {hu.shape}, the source image is {source.Rows}x{source.Columns}")
    if not np.all(np.isfinite(hu)):
        raise ValueError("denoised slice contains NaN or Inf values")
    stored = _keep_padding(hu_to_stored(hu, source), source)

    ds = Dataset()
    for element in source:  # element-wise deep copy, leaving the (possibly encapsulated) pixel data behind
        if element.keyword == "PixelData" or element.keyword in _STALE_PIXEL_ATTRIBUTES:
            continue
        ds.add(copy.deepcopy(element))

    sop_class = _sop_class(source) or CT_IMAGE_STORAGE
    source_sop_uid = _text(source, "SOPInstanceUID")
    if not source_sop_uid and hasattr(source, "file_meta"):
        source_sop_uid = str(source.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyInstanceUID = _text(source, "StudyInstanceUID") or series.study_uid
    ds.FrameOfReferenceUID = _text(source, "FrameOfReferenceUID") or series.frame_of_reference_uid

    image_type = [str(v) for v in (source.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *(image_type[2:] or ["AXIAL"])]
    description = (_text(source, "SeriesDescription") + series.description_suffix).strip()
    ds.SeriesDescription = description[-64:] if len(description) > 64 else description  # LO: 64 characters
    series_number = source.get("SeriesNumber")
    if series_number not in (None, ""):
        ds.SeriesNumber = int(series_number) + series.series_number_offset
    if source_sop_uid and UID(source_sop_uid).is_valid:  # anonymisers sometimes write hashes that are not UIDs
        reference = Dataset()
        reference.ReferencedSOPClassUID = sop_class
        reference.ReferencedSOPInstanceUID = source_sop_uid
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_IMAGE_PURPOSE
        reference.PurposeOfReferenceCodeSequence = [purpose]
        ds.SourceImageSequence = [reference]
    elif "SourceImageSequence" in ds:
        del ds.SourceImageSequence  # it described the source's own predecessors
    now = datetime.datetime.now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    source_syntax = UID(str(source.file_meta.get("TransferSyntaxUID", ""))) if hasattr(source, "file_meta") else UID("")
    if source_syntax in _LOSSY_SYNTAXES and "LossyImageCompression" not in ds:
        ds.LossyImageCompression = "01"  # once lossy-compressed, always marked lossy (PS3.3 C.7.6.1.1.5)
    syntax = ImplicitVRLittleEndian if source_syntax == ImplicitVRLittleEndian else ExplicitVRLittleEndian
    if stored.dtype.itemsize > 1 and stored.dtype.byteorder == ">":
        stored = stored.astype(stored.dtype.newbyteorder("<"))
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if stored.dtype.itemsize == 1 and syntax != ImplicitVRLittleEndian else "OW"

    if series.deidentifier is not None:  # before the marking, which names no person and must survive
        series.deidentifier.apply(ds)
        ds.SeriesDescription = series.description_suffix.strip()[:64]  # the source's text may name people
    # appended to the source's DerivationDescription, never replacing it (issue 15)
    ai_marking.mark(ds, series.derivation_description, series.model)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    return ds


def write_derived_slice(source: Dataset, hu: np.ndarray, series: DerivedSeries,
                        path: Union[str, os.PathLike]) -> Dataset:
    """Write :func:`derived_dataset` to ``path`` as a DICOM Part 10 file (parent folders created); returns it.

    Refuses to write over ``source``'s own file, so that an input can never be overwritten.
    """
    path = os.fspath(path)
    source_file = getattr(source, "filename", None)
    if isinstance(source_file, str) and os.path.exists(path) and os.path.exists(source_file) \
            and os.path.samefile(path, source_file):
        raise ValueError(f"{path}: refusing to overwrite the input file with its denoised version")
    ds = derived_dataset(source, hu, series)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds
