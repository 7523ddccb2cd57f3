"""Which attributes of a source CT image a derived (denoised) CT image copies: a whitelist, module by module.

Why a whitelist: a removal list (copy everything, then delete what is known to identify) keeps whatever it does not
know about, and an adversarial sweep (issue 27) found a public patient-group tag pydicom does not know holding the
PatientID, birth dates in alternative calendars, overlay descriptions and labels with the name, a procedure code
meaning with the name, calibration and secondary-capture dates, and dates inside the source's Contributing Equipment
items, all carried into a ``--deidentify`` output.  As highdicom builds derived objects, the derived CT is built
fresh and takes from the source only the attributes of the modules a CT image has (PS3.3 A.3: Patient, General
Study, Patient Study, General Series, Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel,
Contrast/Bolus, CT Image, VOI LUT, SOP Common).  Everything else (private tags, unknown public tags, overlay 60xx and
curve 50xx groups, the source's own references, other modules) is left behind.  The de-identification profile
(``ldct_tf.dicom.deidentify``) then replaces the identifying attributes among those kept.
"""

from __future__ import annotations

import copy
from pydicom.dataset import Dataset

MODULES: dict[str, tuple[str, ...]] = {
    "Patient": ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"),
    "General Study": ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                      "AccessionNumber", "StudyDescription"),
    "Patient Study": ("PatientAge", "PatientSize", "PatientWeight"),
    "General Series": ("Modality", "SeriesNumber", "Laterality", "SeriesDate", "SeriesTime", "SeriesDescription",
                       "ProtocolName", "BodyPartExamined", "PatientPosition"),
    "Frame of Reference": ("FrameOfReferenceUID", "PositionReferenceIndicator"),
    "General Equipment": ("Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName",
                          "DeviceSerialNumber", "SoftwareVersions", "PixelPaddingValue"),
    "General Image": ("InstanceNumber", "PatientOrientation", "ContentDate", "ContentTime", "AcquisitionNumber",
                      "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "ImageComments",
                      "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
                      "BurnedInAnnotation", "RecognizableVisualFeatures", "DerivationDescription",
                      "IrradiationEventUID"),
    "Image Plane": ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
                    "SpacingBetweenSlices", "SliceLocation"),
    "Image Pixel": ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "PixelPaddingRangeLimit"),
    "Contrast/Bolus": ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume", "ContrastBolusStartTime",
                       "ContrastBolusStopTime", "ContrastBolusTotalDose", "ContrastFlowRate", "ContrastFlowDuration",
                       "ContrastBolusIngredient", "ContrastBolusIngredientConcentration"),
    "CT Image": ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP", "ScanOptions", "DataCollectionDiameter",
                 "DataCollectionCenterPatient", "ReconstructionDiameter", "ReconstructionTargetCenterPatient",
                 "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight",
                 "RotationDirection", "ExposureTime", "ExposureTimeInms", "XRayTubeCurrent", "XRayTubeCurrentInmA",
                 "Exposure", "ExposureInuAs", "FilterType", "GeneratorPower", "FocalSpots", "ConvolutionKernel",
                 "RevolutionTime", "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed",
                 "TableFeedPerRotation", "SpiralPitchFactor", "ExposureModulationType", "CTDIvol",
                 "CTDIPhantomTypeCodeSequence", "WaterEquivalentDiameter", "CalciumScoringMassFactorPatient",
                 "CalciumScoringMassFactorDevice", "EnergyWeightingFactor"),
    "VOI LUT": ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction"),
    "SOP Common": ("SpecificCharacterSet", "TimezoneOffsetFromUTC", "ImageType"),
}

#: Every attribute a derived CT copies from its source (ImageType, UIDs and the like are then rewritten by the writer).
COPIED = tuple(keyword for keywords in MODULES.values() for keyword in keywords)

#: Type 2 attributes of the modules above: present (empty when the source lacks them) so the object validates.
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "Manufacturer", "InstanceNumber",
          "KVP", "AcquisitionNumber", "PositionReferenceIndicator")

#: Code sequences (items hold a code only) and the item attributes copied from them.
CODE_SEQUENCES = ("CTDIPhantomTypeCodeSequence", "DeidentificationMethodCodeSequence")
CODE_ITEM = ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning")
#: Of each item of the source's Contributing Equipment Sequence: what a de-identified copy keeps (device identity
#: and purpose, no date, place, serial number or free text) and what a plain copy adds.
EQUIPMENT_ITEM_DEIDENTIFIED = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")
EQUIPMENT_ITEM_EXTRA = ("InstitutionName", "StationName", "DeviceSerialNumber", "ContributionDateTime",
                        "ContributionDescription")


def _copy_item(item: Dataset, keywords: tuple[str, ...]) -> Dataset:
    out = Dataset()
    for keyword in keywords:
        if keyword in item:
            out[keyword] = copy.deepcopy(item[keyword])
    return out


def _equipment_items(source: Dataset, deidentifying: bool) -> list[Dataset]:
    keywords = EQUIPMENT_ITEM_DEIDENTIFIED + (() if deidentifying else EQUIPMENT_ITEM_EXTRA)
    items = []
    for item in source.get("ContributingEquipmentSequence") or []:
        kept = _copy_item(item, keywords)
        purposes = [_copy_item(code, CODE_ITEM) for code in item.get("PurposeOfReferenceCodeSequence") or []]
        if not purposes or "Manufacturer" not in kept:
            continue  # an item without its type 1 attributes would make the derived object invalid
        kept.PurposeOfReferenceCodeSequence = purposes
        items.append(kept)
    return items


def copy_from_source(source: Dataset, deidentifying: bool = False) -> Dataset:
    """A new dataset holding only the whitelisted attributes of ``source`` (deep copies; ``source`` is unchanged).

    ``deidentifying``: the source's Contributing Equipment items keep only the device's identity and purpose (the
    profile does not reach into them).  Type 2 attributes the source lacks are added empty."""
    ds = Dataset()
    for keyword in COPIED:
        if keyword not in source:
            continue
        if keyword in CODE_SEQUENCES:
            ds[keyword] = copy.deepcopy(source[keyword])
            ds[keyword].value = [_copy_item(item, CODE_ITEM) for item in source[keyword].value or []]
        else:
            ds[keyword] = copy.deepcopy(source[keyword])
    equipment = _equipment_items(source, deidentifying)
    if equipment:
        ds.ContributingEquipmentSequence = equipment
    for keyword in TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds

