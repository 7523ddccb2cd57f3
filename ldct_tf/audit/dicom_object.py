"""The change audit of a derived series as a DICOM object that travels with it: a Secondary Capture summary image.

Why: ``audit.json`` and the PNGs sit in a folder that PACS users never see.  A Secondary Capture image (RGB, one
frame) is shown by every PACS viewer, so the audit's verdict (how many slices were flagged, which ones, why, and
that the series is research-only AI output) lands in the same study as the denoised series.

Why its own series: PS3.3 C.7.3.1 puts one modality in a series, and the Secondary Capture image is Modality ``OT``
while the derived series is ``CT``; a CT series with an RGB image inside would also break viewers' volume tools.  So
the object gets its own SeriesInstanceUID (from ``generate_uid``) in the derived series' study (same
StudyInstanceUID), the derived series' SeriesNumber (viewers list the two side by side), and references the flagged
derived slices in its Referenced Image Sequence.

No identifiers beyond the derived series' own: the Patient and Study attributes are copied from a derived instance
(so under de-identification they are its pseudonyms, with its PatientIdentityRemoved and method), nothing else of
the source is copied, and the picture holds counts, instance numbers and thresholds only.
"""

from __future__ import annotations

import sys

import datetime
import json
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ldct_tf.audit import AUDIT_FOLDER, SIDECAR
from ldct_tf.dicom.ai_marking import RESEARCH_USE

#: file name of the audit object inside the series' ``audit/`` folder (a ``.dcm``: the node forwards it)
OBJECT_NAME = "audit_summary.dcm"
MANUFACTURER = "ldct_tf"

#: attributes copied from the derived instance when it has them: Patient, General Study, de-identification marks
PATIENT_AND_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                     "PatientSex", "PatientIdentityRemoved", "DeidentificationMethod",
                     "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                     "AccessionNumber", "StudyDescription")
#: Type 2 attributes of those modules: present (empty when the derived instance lacks them)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


class AuditObjectError(Exception):
    """The series folder has no audit sidecar or no derived instance to take the study context from."""


def flag_counts(report: dict) -> dict:
    """Slices, flagged slices, flagged patches per criterion and the flagged slices' instance numbers: the audit's
    verdict in a form with no identifiers (used by the picture and by the node's log line)."""
    per_slice = report.get("per_slice", [])
    flagged = [s for s in per_slice if s.get("flagged")]
    by = {c: int(sum(s.get("flagged_by", {}).get(c, 0) for s in per_slice)) for c in ("frc", "blob", "anatomy")}
    return {"slices": int(report.get("slices", len(per_slice))), "flagged_slices": len(flagged),
            "flagged_patches": int(report.get("flagged_patches", 0)), "by": by,
            "instances": [s.get("instance") if s.get("instance") is not None else f"#{s['index']}" for s in flagged]}


def summary_lines(report: dict, model_text: str) -> list[str]:
    """The text of the summary picture."""
    counts = flag_counts(report)
    shown = ", ".join(str(i) for i in counts["instances"][:30]) + (" ..." if len(counts["instances"]) > 30 else "")
    by = counts["by"]
    thresholds = ", ".join(f"{k} {v}" for k, v in report.get("thresholds", {}).items()
                           if isinstance(v, (int, float)))
    return [RESEARCH_USE, model_text, "",
            f"Slices audited: {counts['slices']}    flagged: {counts['flagged_slices']}    "
            f"flagged patches: {counts['flagged_patches']}",
            f"Patches flagged by: FRC (texture lost) {by['frc']}, blob (structure removed) {by['blob']}, "
            f"anatomy in the residual {by['anatomy']}",
            f"Flagged slices (instance numbers): {shown or 'none'}", "",
            "How to read: a flagged slice is where the denoiser changed more than noise; compare it with the",
            "original low-dose series before relying on it.  Unflagged is not proof of fidelity.",
            *textwrap.wrap(f"Thresholds: {thresholds}", 100)[:3]]


def render_summary(report: dict, model_text: str, size: tuple[float, float] = (9.6, 6.4),
                   dpi: int = 100) -> np.ndarray:
    """The summary as an RGB uint8 picture: the text above, flagged patches per slice as bars below."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a notebook's inline backend is kept
        matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    per_slice = report.get("per_slice", [])
    fig = plt.figure(figsize=size, dpi=dpi, facecolor="black")
    text_ax = fig.add_axes((0.03, 0.42, 0.94, 0.56))
    text_ax.axis("off")
    lines = summary_lines(report, model_text)
    for row, line in enumerate(lines):
        text_ax.text(0.0, 1.0 - row * 0.09, line, color="yellow" if row == 0 else "white", fontsize=9.5,
                     family="monospace", va="top", transform=text_ax.transAxes, clip_on=True)
    bars = fig.add_axes((0.08, 0.08, 0.88, 0.3), facecolor="black")
    x = [s.get("instance") if s.get("instance") is not None else s["index"] for s in per_slice]
    y = [s.get("flagged_patches", 0) for s in per_slice]
    bars.bar(x, y, color=["red" if v else "gray" for v in y], width=0.8)
    bars.set_xlabel("instance number", color="white", fontsize=9)
    bars.set_ylabel("flagged patches", color="white", fontsize=9)
    bars.tick_params(colors="white", labelsize=8)
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    for spine in bars.spines.values():
        spine.set_color("white")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def _ai_item(derived: Dataset) -> Optional[Dataset]:
    items = [i for i in derived.get("ContributingEquipmentSequence", []) if i.get("Manufacturer") == MANUFACTURER]
    return items[-1] if items else None


def _copy_context(derived: Dataset, ds: Dataset) -> None:
    for keyword in PATIENT_AND_STUDY:
        if keyword in derived:
            ds[keyword] = derived[keyword]
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")


def _references(report: dict, derived: Dataset) -> list[Dataset]:
    refs = []
    for entry in report.get("per_slice", []):
        if entry.get("flagged") and entry.get("sop_instance_uid"):
            item = Dataset()
            item.ReferencedSOPClassUID = derived.SOPClassUID
            item.ReferencedSOPInstanceUID = entry["sop_instance_uid"]
            refs.append(item)
    return refs


def _pixels(ds: Dataset, rgb: np.ndarray) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()


def build_audit_object(report: dict, derived: Dataset, now: Optional[datetime.datetime] = None) -> Dataset:
    """A Secondary Capture image of ``report`` (an ``audit.json``) in the study of ``derived`` (one instance of the
    derived series), new UIDs, marked as ldct_tf research-use AI output."""
    now = now or datetime.datetime.now()
    item = _ai_item(derived)
    model_text = str(item.ContributionDescription).split(";")[0] if item is not None and \
        "ContributionDescription" in item else "Denoised by an AI model (ldct_tf)"
    model_text += ")" * (model_text.count("(") - model_text.count(")"))
    ds = Dataset()
    _copy_context(derived, ds)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.SeriesInstanceUID = "OT", generate_uid()
    ds.SeriesNumber = derived.get("SeriesNumber", "")
    ds.Laterality = ""  # Type 2C (a paired body part without Image Laterality): a summary has none
    ds.SeriesDescription = "AI change audit (ldct_tf), research use only"
    ds.ConversionType, ds.Manufacturer = "WSD", MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    if item is not None:
        ds.ManufacturerModelName = item.get("ManufacturerModelName", "")
        ds.SoftwareVersions = item.get("SoftwareVersions", "")
        ds.ContributingEquipmentSequence = [item]
    ds.InstanceNumber, ds.PatientOrientation = 1, ""
    ds.ContentDate = ds.DateOfSecondaryCapture = now.strftime("%Y%m%d")
    ds.ContentTime = ds.TimeOfSecondaryCapture = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"Change audit of an AI-denoised series: {model_text}"[:1024]
    ds.ImageComments = RESEARCH_USE
    ds.BurnedInAnnotation, ds.RecognizableVisualFeatures, ds.LossyImageCompression = "NO", "NO", "00"
    refs = _references(report, derived)
    if refs:
        ds.ReferencedImageSequence = refs
    _pixels(ds, render_summary(report, model_text))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, \
        ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _first_derived(series_folder: Path, exclude: Sequence[Path]) -> Dataset:
    for path in sorted(series_folder.glob("*.dcm")):
        if path not in exclude:
            return pydicom.dcmread(path, stop_before_pixels=True)
    raise AuditObjectError(f"{series_folder}: no derived instance to take the study from")


def write_audit_object(series_folder: Path) -> Path:
    """Build the audit object of the derived series in ``series_folder`` from its ``audit/audit.json`` and write
    it as ``audit/audit_summary.dcm``; returns its path."""
    sidecar = series_folder / AUDIT_FOLDER / SIDECAR
    if not sidecar.is_file():
        raise AuditObjectError(f"{sidecar}: no audit sidecar")
    target = sidecar.parent / OBJECT_NAME
    report = json.loads(sidecar.read_text())
    ds = build_audit_object(report, _first_derived(series_folder, [target]))
    ds.save_as(target, enforce_file_format=True)
    return target
