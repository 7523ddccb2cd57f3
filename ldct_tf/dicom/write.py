"""Writing a derived (denoised) CT slice back as a new DICOM object of a new series.

The writing direction of ``ldct_tf.dicom`` (which re-exports everything here; reading is ``ldct_tf.dicom.read``).
Used by the denoise CLI: everything about the patient, the study and the geometry is copied so that a viewer stacks
the new series beside the original; what identifies the new object (Series/SOP Instance UIDs), what says it is
derived (ImageType, DerivationDescription, SourceImageSequence, the AI marking) and the pixel data change.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ldct_tf.dicom import ai_marking
from ldct_tf.dicom.derived_attributes import copy_from_source
from ldct_tf.dicom.slices import CT_IMAGE_STORAGE, padding_tags, sop_class_of, tag_float, tag_text

if TYPE_CHECKING:
    from ldct_tf.dicom.deidentify import Deidentifier

#: Transfer syntaxes whose compression always loses information (JPEG baseline/extended, JPEG-LS near-lossless).
#: JPEG 2000 (.91) and HTJ2K (.203) may be either, so for them the input's own LossyImageCompression is trusted.
_LOSSY_SYNTAXES = {UID("1.2.840.10008.1.2.4.50"), UID("1.2.840.10008.1.2.4.51"), UID("1.2.840.10008.1.2.4.81")}

#: CodeSequence meaning "source image for image processing operation" (DICOM CID 7202, code 121322).
_SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


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
    slope = tag_float(ds, "RescaleSlope", 1.0)
    intercept = tag_float(ds, "RescaleIntercept", 0.0)
    if not math.isfinite(slope) or slope == 0:
        raise ValueError(f"RescaleSlope {slope} cannot be inverted")
    low, high = stored_value_range(ds)
    stored = np.rint((np.asarray(hu, np.float64) - intercept) / slope)
    return np.clip(stored, low, high).astype(stored_dtype(ds))


def _padding_range(ds: Dataset) -> Optional[tuple[float, float]]:
    """The stored values that PixelPaddingValue (and PixelPaddingRangeLimit) reserve for "outside the scan"."""
    pad_value, pad_limit = padding_tags(ds)
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
    deidentifier: Optional["Deidentifier"] = None  # PS3.15 basic profile (ldct_tf.dicom.deidentify), shared by a run

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
    padding keep their padding value.  Only the whitelisted attributes of a CT image's modules are taken from the
    source (``ldct_tf.dicom.derived_attributes``); private, unknown, overlay and curve attributes never are.  New SeriesInstanceUID (``series``) and SOPInstanceUID; ImageType
    DERIVED\\SECONDARY (value 3 on, e.g. AXIAL, kept); SeriesDescription gets ``series.description_suffix``;
    DerivationDescription and a SourceImageSequence item point at the source image; SeriesNumber moves by
    ``series.series_number_offset`` so that viewers list both series apart.  Patient, study, frame of reference,
    geometry and acquisition attributes are copied as they are (then de-identified with ``series.deidentifier``).
    """
    hu = np.asarray(hu)
    if hu.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"denoised slice has shape {hu.shape}, the source image is {source.Rows}x{source.Columns}")
    if not np.all(np.isfinite(hu)):
        raise ValueError("denoised slice contains NaN or Inf values")
    stored = _keep_padding(hu_to_stored(hu, source), source)

    # a whitelist of the CT image's modules, never the source's other attributes (issue 27: they leaked identity)
    ds = copy_from_source(source, deidentifying=series.deidentifier is not None)

    sop_class = sop_class_of(source) or CT_IMAGE_STORAGE
    source_sop_uid = tag_text(source, "SOPInstanceUID")
    if not source_sop_uid and hasattr(source, "file_meta"):
        source_sop_uid = str(source.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyInstanceUID = tag_text(source, "StudyInstanceUID") or series.study_uid
    ds.FrameOfReferenceUID = tag_text(source, "FrameOfReferenceUID") or series.frame_of_reference_uid

    image_type = [str(v) for v in (source.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *(image_type[2:] or ["AXIAL"])]
    description = (tag_text(source, "SeriesDescription") + series.description_suffix).strip()
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
