"""The data of the v3 experiment: which CT feeds training, validation and the one test read, and the simulated pairs.

Split by patient, chosen before any model was trained:
- training sources (normal-dose images only, each turned into simulated low-dose pairs): AAPM-Mayo patient L096's
  full-dose slices, the enhanced abdomen series, the GE liver slices, the GE head CT and every edge-case file that
  converts to an axial CT slice;
- validation: patient L143 (D45f and B30f), never trained on: its real quarter/full-dose pairs and dose sweeps
  simulated from its full-dose slices;
- test: patient L286, read once by ``python -m experiments.v3 test`` and nothing else.

The simulated pairs follow the v2 recipe's stream design (projection-domain insertion of the extra noise of a
``k``-dose scan, reference = the slice through the same projector without noise), but across doses and textures:
``k`` log-uniform in [5 %, 50 %] and the sharp (ramp) or smooth (hann) FBP filter per realisation, so that one network
sees the noise levels and kernels a clinic has.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TEST_PATIENT = "L286"
VALIDATION_PATIENT = "L143"
DOSE_RANGE = (0.05, 0.5)
FILTERS = ("ramp", "hann")
SWEEP_DOSES = (0.10, 0.25, 0.50)
CALIBRATION = REPO / "configs" / "calibration_aapm_mayo.json"
#: CT files that also ship inside PyPI packages (pydicom, pydicom-data): ``make demo`` scores the model on them, so
#: they are never training sources.
DEMO_FILES = frozenset({"693_J2KI.dcm", "693_J2KR.dcm", "693_UNCI.dcm", "693_UNCR.dcm", "CT_small.dcm",
                        "explicit_VR-UN.dcm", "bad_sequence.dcm", "eCT_Supplemental.dcm",
                        "J2K_pixelrep_mismatch.dcm"})


def data_root() -> Path:
    return Path(os.environ.get("LDCT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def mayo_rows(root: Path) -> list[dict]:
    with open(root / "mayo_pairs" / "pairs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def calibrated_i0() -> float:
    """i0 of the D45f calibration (fitted on development patients L096/L143, unpaired; its provenance is in the file)."""
    return float(json.loads(CALIBRATION.read_text())["kernels"]["D45f"]["i0"])


def training_files(root: Path) -> list[Path]:
    """Every normal-dose file a training source may come from (never L143, never L286)."""
    files = [root / "mayo_pairs" / row["full_dose"] for row in mayo_rows(root)
             if row["patient"] not in (TEST_PATIENT, VALIDATION_PATIENT)]
    for folder in ("abdomen_series/dicom", "liver_slices", "head_ct/ge_tilted", "edge_cases"):
        files += sorted(p for p in (root / folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    return [f for f in files if f.name not in DEMO_FILES]


def slice_key(root: Path, path: Path, frame: int) -> str:
    """Anonymous, stable name of one source slice (a hash of its place in the data folder)."""
    return hashlib.sha256(f"{path.relative_to(root)}:{frame}".encode()).hexdigest()[:16]


def training_keys(root: Path) -> set[str]:
    """Keys of every slice :func:`source_slices` yields now (frames read from the headers only)."""
    import pydicom

    keys = set()
    for path in training_files(root):
        try:
            frames = int(pydicom.dcmread(str(path), stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
        except Exception:
            continue
        keys.update(slice_key(root, path, f) for f in range(frames))
    return keys


def square(hu: np.ndarray) -> np.ndarray:
    """Pad a slice with air to a square (the parallel-beam simulator needs one)."""
    h, w = hu.shape
    n = max(h, w)
    out = np.full((n, n), -1000.0, np.float32)
    out[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = hu
    return out


def source_slices(root: Path) -> Iterator[tuple[str, np.ndarray, float]]:
    """(anonymous key, HU slice, pixel spacing) of every training source slice that reads as axial CT >= 128 px."""
    from ldct_tf import dicom

    for path in training_files(root):
        try:
            slices = dicom.read_slices(str(path))
        except Exception:  # unusable files are the edge cases' point; the reader names the reason elsewhere
            continue
        for hu, info in slices:
            if min(hu.shape) < 128 or not np.isfinite(hu).all():
                continue
            key = slice_key(root, path, info.frame)
            spacing = float(info.pixel_spacing_mm[0]) if info.pixel_spacing_mm else 0.7
            yield key, square(np.clip(hu, -1024, 3071)), spacing if np.isfinite(spacing) and spacing > 0 else 0.7


def simulate_source(key: str, hu: np.ndarray, spacing: float, realisations: int, i0: float) -> dict:
    """``realisations`` simulated (low, reference) pairs of one slice, doses and filters drawn from the key's seed."""
    from ldct_tf.simulate import ProjectionSimulator

    rng = np.random.default_rng(int(key, 16) % 2**63)
    sim = ProjectionSimulator(hu, pixel_spacing_mm=spacing)
    lows, refs, doses, filters = [], [], [], []
    for r in range(realisations):
        dose = float(np.exp(rng.uniform(np.log(DOSE_RANGE[0]), np.log(DOSE_RANGE[1]))))
        filt = FILTERS[r % 2]
        noise = sim.noise_hu(sim.sinogram_noise(dose, i0, noise_model="insert", rng=rng), filt)
        ref = sim.reference(filt)
        lows.append((ref + noise).astype(np.float32))
        refs.append(ref.astype(np.float32))
        doses.append(dose)
        filters.append(filt)
    return {"low": np.stack(lows), "reference": np.stack(refs), "dose": np.array(doses), "filter": np.array(filters)}


def sweep(normal_hu: np.ndarray, spacing: float, doses: tuple, seed: int, i0: float,
          filter_name: str) -> list[np.ndarray]:
    """``doses`` scans of a real normal-dose slice the way Mayo made its quarter-dose images: only the extra noise,
    added to the slice itself (its reference is the slice).  One projection serves every dose."""
    from ldct_tf.simulate import ProjectionSimulator

    sim = ProjectionSimulator(square(normal_hu), pixel_spacing_mm=spacing)
    h, w = normal_hu.shape
    n = sim.size
    out = []
    for j, dose in enumerate(doses):
        rng = np.random.default_rng(seed * 100 + j)
        noise = sim.noise_hu(sim.sinogram_noise(dose, i0, noise_model="insert", rng=rng), filter_name)
        out.append((normal_hu + noise[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w]).astype(np.float32))
    return out


def filter_of_kernel(kernel: str) -> str:
    """The FBP filter whose noise texture resembles a Mayo kernel (smooth B30f: hann; sharp D45f: ramp)."""
    return "hann" if kernel.upper().startswith("B") else "ramp"


def mayo_pairs(root: Path, patient: str) -> list[dict]:
    """Real pairs of one patient: HU arrays of both doses, the kernel, the spacing."""
    from ldct_tf import dicom

    out = []
    for row in mayo_rows(root):
        if row["patient"] != patient:
            continue
        (full, info), = dicom.read_slices(str(root / "mayo_pairs" / row["full_dose"]))
        (low, _), = dicom.read_slices(str(root / "mayo_pairs" / row["quarter_dose"]))
        out.append({"name": Path(row["full_dose"]).stem, "kernel": row["kernel"], "full": full, "quarter": low,
                    "spacing": float(info.pixel_spacing_mm[0])})
    return out


#: What the denoiser is trained to output.  ``projected``: the slice through the projector without noise (v2's
#: target: removes all noise it can, the normal dose's own included).  ``original``: the normal-dose slice itself,
#: with the same inserted noise added to it (Mayo's own construction of its low-dose images): the network learns to
#: remove the noise a lower dose ADDS and to keep the normal-dose appearance.
TARGETS = ("projected", "original")


def load_training_pairs(work: Path, target: str = "projected") -> tuple[list, list]:
    """All simulated pairs written by ``simulate`` (lists of float32 HU slices), for the given target."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    root = data_root()
    keys = training_keys(root)
    sources = {key: hu for key, hu, _ in source_slices(root)} if target == "original" else {}
    lows, refs = [], []
    for f in sorted(f for f in (work / "pairs").glob("*.npz") if f.stem in keys):
        with np.load(f) as z:
            if target == "projected":
                lows += list(z["low"])
                refs += list(z["reference"])
                continue
            source = sources[f.stem]
            for low, ref in zip(z["low"], z["reference"]):  # the same noise realisation, added to the slice itself
                lows.append((source + (low - ref)).astype(np.float32))
                refs.append(source)
    return lows, refs
