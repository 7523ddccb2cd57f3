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

This module is the one name importers use: reading, classifying and validating slices and series live in
``ldct_tf.dicom.read`` (on ``ldct_tf.dicom.slices``), the derived-series writer in ``ldct_tf.dicom.write``; this face exports the names other stages use.
"""

from ldct_tf.dicom.read import (group_series, read_ct_dataset, read_slice, read_slices)
from ldct_tf.dicom.slices import (BAD_GEOMETRY, CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_ENHANCED_CT_IMAGE_STORAGE, LOCALIZER, MAX_AXIAL_TILT_DEG, MULTI_FRAME, MULTI_FRAME_CT_CLASSES,
    NO_PIXEL_DATA, NOT_AXIAL, NOT_CT_IMAGE, NOT_DICOM, NOT_GRAYSCALE, UNDECODABLE, UNREADABLE, NotUsableCT,
    PathOrFile, SliceInfo, header_group_key, padding_tags, read_dataset, slice_normal, sop_class_of, tag_float,
    tag_text)
from ldct_tf.dicom.write import (DerivedSeries, derived_dataset, hu_to_stored, stored_dtype, stored_value_range,
                                 write_derived_slice)

__all__ = [
    "BAD_GEOMETRY", "CT_IMAGE_STORAGE", "ENHANCED_CT_IMAGE_STORAGE", "LEGACY_ENHANCED_CT_IMAGE_STORAGE", "LOCALIZER",
    "MAX_AXIAL_TILT_DEG", "MULTI_FRAME", "MULTI_FRAME_CT_CLASSES", "NO_PIXEL_DATA", "NOT_AXIAL", "NOT_CT_IMAGE",
    "NOT_DICOM", "NOT_GRAYSCALE", "UNDECODABLE", "UNREADABLE", "NotUsableCT", "PathOrFile", "SliceInfo",
    "DerivedSeries", "derived_dataset", "group_series", "header_group_key", "hu_to_stored", "padding_tags", "read_ct_dataset",
    "read_dataset", "read_slice", "read_slices", "slice_normal", "sop_class_of", "stored_dtype",
    "stored_value_range", "tag_float", "tag_text", "write_derived_slice",
]
