"""Small, real-looking CT DICOM written by the project, for tests and the demo on machines with no data.

The pixels come from real CT that ships inside a PyPI package (pydicom's bundled ``CT_small.dcm``, 128x128), so every
fresh machine has them.  The headers are complete CT Image Storage objects with fake but realistic identifiers
(names, IDs, birth dates, accession numbers, institution), which lets tests prove that none of them reaches the output.
"""

from __future__ import annotations

import csv
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

from ldct_tf import ct


def ct_small_hu() -> np.ndarray:
    """HU of pydicom's bundled CT_small.dcm (real CT, 128x128), float32."""
    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - bundled in every pydicom wheel
        raise FileNotFoundError("pydicom's bundled CT_small.dcm is missing from this installation")
    ds = pydicom.dcmread(path)
    return ct.to_hu(ds.pixel_array, float(ds.RescaleSlope), float(ds.RescaleIntercept))


@dataclass(frozen=True)
class Identity:
    """Patient and study identifiers written into sample headers (all fake, all must stay out of outputs)."""

    patient_id: str
    patient_name: str
    birth_date: str = "19630417"
    accession: str = "ACC0000001"
    institution: str = "St Example General Hospital"
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)

    def values(self) -> list[str]:
        return [self.patient_id, self.patient_name, self.birth_date, self.accession, self.institution, self.study_uid,
                self.frame_of_reference_uid]


def write_ct_slice(
    path: os.PathLike | str,
    hu: np.ndarray,
    identity: Identity,
    *,
    series_uid: str,
    instance: int,
    z_mm: float,
    series_description: str = "Abdomen 3.0 B30f",
    ctdivol: Optional[float] = 12.0,
    exposure_mas: Optional[float] = 200.0,
    kvp: float = 120.0,
    kernel: str = "B30f",
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7),
    thickness_mm: float = 3.0,
    signed: bool = False,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    padding_value: Optional[int] = None,
) -> Path:
    """Write one axial CT Image Storage file holding ``hu`` (rounded to integers).

    ``signed=False`` stores uint16 with intercept -1024 (Siemens style); ``signed=True`` int16 with intercept 0
    (GE style).  A compressed ``transfer_syntax`` (RLE Lossless, JPEG 2000 Lossless, JPEG-LS Lossless) is encoded with
    pydicom's encoders (RLE natively, the others through the pylibjpeg plugins).
    """
    hu_int = ct.hu_to_int16(hu)
    intercept = 0 if signed else -1024
    stored = (hu_int.astype(np.int32) - intercept)
    stored = stored.astype(np.int16) if signed else np.clip(stored, 0, 65535).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientID = identity.patient_id
    ds.PatientName = identity.patient_name
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = "O"
    ds.AccessionNumber = identity.accession
    ds.InstitutionName = identity.institution
    ds.StudyInstanceUID = identity.study_uid
    ds.StudyDate = datetime.date(2024, 3, 5).strftime("%Y%m%d")
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.InstanceNumber = instance
    ds.Manufacturer = "SIEMENS"
    ds.KVP = kvp
    if ctdivol is not None:
        ds.CTDIvol = ctdivol
    if exposure_mas is not None:
        ds.Exposure = int(round(exposure_mas))
    ds.ConvolutionKernel = kernel
    ds.SliceThickness = thickness_mm
    ds.ImagePositionPatient = [-0.5 * hu.shape[1] * pixel_spacing_mm[1], -0.5 * hu.shape[0] * pixel_spacing_mm[0],
                               float(z_mm)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(pixel_spacing_mm)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
    ds.PixelData = stored.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, stored)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: os.PathLike | str, slices_hu: Sequence[np.ndarray], identity: Identity,
                 z_start_mm: float = 0.0, spacing_mm: float = 3.0, **kwargs) -> list[Path]:
    """Write a contiguous series (one file per slice, one new SeriesInstanceUID) into ``folder``."""
    series_uid = generate_uid()
    return [
        write_ct_slice(Path(folder) / f"IM{i + 1:04d}.dcm", hu, identity, series_uid=series_uid, instance=i + 1,
                       z_mm=z_start_mm + i * spacing_mm, **kwargs)
        for i, hu in enumerate(slices_hu)
    ]


@dataclass
class SampleDataset:
    root: Path
    dose_manifest: Path
    identities: list[Identity]
    files: dict[str, list[Path]]  # dose -> files
    hu: dict[Path, np.ndarray]  # file -> the integer HU it holds


def write_sample_dataset(root: os.PathLike | str, n_patients: int = 4, slices_per_series: int = 3,
                         low_dose_noise_hu: float = 40.0, seed: int = 0) -> SampleDataset:
    """A small multi-patient archive: for each patient a normal-dose and a low-dose series of CT_small-based slices.

    The low-dose series has Gaussian noise added in the image domain and a quarter of the normal exposure in its
    headers; it is test and demo data for the data path, not a dose simulation (``ldct_tf.simulate`` does that).
    Writes ``doses.csv`` (the pipeline's ``path,dose`` manifest, relative paths) beside the patient folders.
    """
    rng = np.random.default_rng(seed)
    base = ct_small_hu()
    root = Path(root)
    identities, files, hu_by_file = [], {"low": [], "normal": []}, {}
    rows = []
    for p in range(n_patients):
        identity = Identity(patient_id=f"MRN{48213 + p:07d}", patient_name=f"Doe^Jane{chr(65 + p)}",
                            birth_date=f"19{50 + p:02d}0{1 + p % 9}15", accession=f"ACC{903311 + p}")
        identities.append(identity)
        volume = [np.roll(base, shift=(2 * i + p, i), axis=(0, 1)) + rng.normal(0, 5, base.shape)
                  for i in range(slices_per_series)]
        normal = [np.rint(v) for v in volume]
        low = [np.rint(v + rng.normal(0, low_dose_noise_hu, base.shape)) for v in volume]
        for dose, slices, mas, ctdi, desc in (("normal", normal, 200.0, 12.0, "Abdomen 3.0 B30f"),
                                              ("low", low, 50.0, 3.0, "Abdomen LD 3.0 B30f")):
            folder = root / f"patient{p + 1:02d}" / f"{dose}_dose"
            written = write_series(folder, slices, identity, z_start_mm=-100.0, exposure_mas=mas, ctdivol=ctdi,
                                   series_description=desc)
            files[dose].extend(written)
            hu_by_file.update({f: ct.hu_to_int16(h) for f, h in zip(written, slices)})
            rows.append((os.path.relpath(folder, root), dose))
    manifest = root / "doses.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "dose"])
        writer.writerows(rows)
    return SampleDataset(root, manifest, identities, files, hu_by_file)


def write_mayo_dose_manifest(mayo_dir: os.PathLike | str, out_csv: os.PathLike | str) -> Path:
    """Dose manifest for a Mayo pairs folder (``pairs.csv`` with patient,full_dose,quarter_dose columns): quarter
    dose is low, full dose normal, and the patient column comes from pairs.csv, because the files' PatientID is the
    same placeholder ("Anonymous") for every patient."""
    mayo_dir, out_csv = Path(mayo_dir), Path(out_csv)
    with open(mayo_dir / "pairs.csv", newline="") as handle, open(out_csv, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "dose", "patient"])
        for row in csv.DictReader(handle):
            writer.writerow([str(mayo_dir / row["quarter_dose"]), "low", row["patient"]])
            writer.writerow([str(mayo_dir / row["full_dose"]), "normal", row["patient"]])
    return out_csv


#: Incident photons per ray at full dose that make ``ldct_tf.simulate``'s quarter dose as noisy as the real Mayo
#: quarter-dose data: at i0 = 1e5 the simulated added noise SD was 2.28x the real one on the 5 D45f slices checked
#: (``simulate.compare_with_real``, see simulate.py), and noise SD scales as 1/sqrt(i0): 1e5 * 2.28**2 ~ 5e5.
MAYO_CALIBRATED_I0 = 5e5


def simulated_low_dose_hu(hu: np.ndarray, dose_fraction: float = 0.25, seed: int = 0,
                          pixel_spacing_mm: float = 0.7, i0: float = MAYO_CALIBRATED_I0) -> np.ndarray:
    """``hu`` plus the noise that ``ldct_tf.simulate`` adds when the dose drops to ``dose_fraction``.

    Only the simulated noise (simulated low minus the reference reconstructed through the same projector) is added
    to the original slice, the way Mayo's quarter-dose data was made: the result keeps the original's sharpness and
    differs from it only by noise, so ``(result, hu)`` is a clean evaluation pair.  Non-square slices are padded with
    air to a square for the projector and cropped back.
    """
    from ldct_tf import simulate

    hu = np.asarray(hu, np.float32)
    h, w = hu.shape
    n = max(h, w)
    square = np.full((n, n), ct.AIR_HU, np.float32)
    top, left = (n - h) // 2, (n - w) // 2
    square[top:top + h, left:left + w] = hu
    low, reference = simulate.simulate_low_dose(square, dose_fraction, i0=i0, seed=seed,
                                                pixel_spacing_mm=pixel_spacing_mm)
    noise = (low - reference)[top:top + h, left:left + w]
    return hu + noise


def write_simulated_series(sources: Sequence[os.PathLike | str], out_dir: os.PathLike | str,
                           dose_fraction: float = 0.25, seed: int = 0, progress: bool = False) -> list[Path]:
    """Write a simulated ``dose_fraction`` dose copy of each source CT slice as one derived DICOM series.

    Every header stays as in the source except the derived-series attributes (new UIDs, ImageType DERIVED,
    a SeriesDescription suffix and a DerivationDescription saying it is simulated), so it can stand in for a real
    low-dose series in the pipeline, the denoise CLI and evaluation.  Returns the written paths, in source order.
    """
    from ldct_tf import dicom

    out_dir = Path(out_dir)
    percent = f"{100 * dose_fraction:g}%"
    series = dicom.DerivedSeries.new(
        f"Simulated {percent} dose: projection-domain Poisson and electronic noise added by ldct_tf.simulate",
        description_suffix=f" simulated {percent} dose")
    paths = []
    items = list(sources)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"simulating {percent} dose", unit="slice")
    for index, source in enumerate(items):
        ds = dicom.read_dataset(source)
        hu, info = dicom.read_slice(source)
        spacing = float(np.mean(info.pixel_spacing_mm)) if info.pixel_spacing_mm else 0.7
        low = simulated_low_dose_hu(hu, dose_fraction, seed=seed + index, pixel_spacing_mm=spacing)
        path = out_dir / f"sim{index:04d}.dcm"
        dicom.write_derived_slice(ds, low, series, path)
        paths.append(path)
    return paths
