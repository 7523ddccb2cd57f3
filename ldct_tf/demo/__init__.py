"""``python -m ldct_tf.demo`` (``make demo``): the shipped model on real CT, DICOM in, DICOM out, scored.

1. Input.  By default real CT that ships inside PyPI packages, so every fresh machine has it: pydicom's bundled
   ``CT_small.dcm`` and, when the ``pydicom-data`` package is installed (``make demo`` installs it), its head CT
   (``693_UNCI.dcm``) and the two frames of its enhanced abdominal CT (``eCT_Supplemental.dcm``).  Each slice is
   turned into a quarter-dose slice with ``ldct_tf.simulate`` (projection-domain Poisson and electronic noise) and
   written as a low-dose DICOM series; the original is the normal-dose reference.  With ``LDCT_DATA_DIR`` pointing
   at the shared data, the held-out Mayo patient's real quarter-dose slices are used instead (their full-dose
   slices are the reference); ``--input DIR [--reference DIR]`` takes your own low-dose series.
2. Denoise: ``ldct_tf.denoise`` with the shipped SavedModel (``saved_models/ldct_denoiser``) writes a derived
   DICOM series per input series.
3. Evaluate: ``ldct_tf.evaluate`` scores the model beside BM3D (or non-local means when the optional ``bm3d``
   package is missing) and the low-dose input itself, and writes ``report.md`` with figures.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ldct_tf.errors import LdctError


REPO = Path(__file__).resolve().parents[2]  # ldct_tf/demo/__init__.py -> the checkout
DEFAULT_MODEL = REPO / "saved_models" / "ldct_denoiser"
#: The development patient v3 never trained on (its validation patient).  The test patient L286 is read once, by
#: ``python -m experiments.v3 test``, and by nothing else, the demo included.
HELD_OUT_PATIENT = "L143"
DOSE_FRACTION = 0.25
#: Written into --out by the demo; lists what the demo wrote there, so a re-run deletes only that.
MARKER = ".ldct_tf_demo_output.json"
OUTPUTS = ("low_dose_dicom", "normal_dose_dicom", "denoised_dicom", "evaluation")


class DemoError(LdctError):
    """A problem with the demo's paths (an --out that overlaps an input or holds other files); one line, exit
    status 1 on the command line."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def prepare_out(work: Path, inputs: Sequence[Path]) -> None:
    """Make ``work`` ready for a run without ever deleting what the demo did not write.

    An --out that does not exist or is empty is used as is.  An --out that holds the marker of an earlier demo run
    loses only the entries that marker lists (the demo's own outputs); anything else in it (a user's file, an input)
    makes the demo refuse, as does an --out that contains an input or lies inside one.
    """
    for given in inputs:
        if _inside(given, work) or _inside(work, given):
            raise DemoError(f"--out {work}: overlaps the input {given}; choose a separate output folder")
    if work.exists() and not work.is_dir():
        raise DemoError(f"--out {work}: exists and is not a folder")
    if work.is_dir():
        entries = {p.name for p in work.iterdir()}
        ours: set[str] = set()
        if MARKER in entries:
            try:
                ours = set(json.loads((work / MARKER).read_text())["written"]) & set(OUTPUTS) & entries
            except (OSError, ValueError, KeyError, TypeError):
                raise DemoError(f"--out {work}: its {MARKER} is unreadable; choose an empty folder") from None
            ours.add(MARKER)
        foreign = entries - ours
        if foreign:
            raise DemoError(f"--out {work}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} the demo "
                            f"did not write; choose an empty or new folder (the demo never deletes what it did "
                            f"not create)")
        for name in sorted(ours - {MARKER}):
            target = work / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text(json.dumps({"tool": "ldct_tf.demo", "written": list(OUTPUTS)}) + "\n")


@dataclass
class SampleSlice:
    name: str
    hu: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    window: str = "abdomen"


#: Real CT that ships inside PyPI packages: (label, file name, display window).  The abdomen (pancreas) and neck
#: slices are body CT the model is for; the head slice shows what it does outside that, in a brain window.  None of
#: them is a training source of the shipped model (experiments/v3_data.py, DEMO_FILES).
PACKAGED = (("abdomen", "explicit_VR-UN.dcm", "abdomen"), ("neck", "bad_sequence.dcm", "abdomen"),
            ("small_phantomlike", "CT_small.dcm", "abdomen"), ("head", "693_UNCI.dcm", "brain"))


def packaged_ct() -> list[SampleSlice]:
    """Real CT slices that come with installed packages (no download, no shared data)."""
    from pydicom.data import get_testdata_file

    from ldct_tf import dicom

    found = []
    # pydicom-data installs as the module ``data_store``, which pydicom's data manager searches; without it
    # get_testdata_file would try to download, so only pydicom's own CT_small.dcm is used then.
    with_data = importlib.util.find_spec("data_store") is not None
    if not with_data:
        print("  (pydicom-data is not installed: only CT_small.dcm is used; `pip install pydicom-data` adds 3 slices)")
    for label, name, window in PACKAGED:
        if name != "CT_small.dcm" and not with_data:
            continue
        path = get_testdata_file(name)
        if not path:
            continue
        for index, (hu, info) in enumerate(dicom.read_slices(path)):
            # Some scanners store values below air outside the reconstruction circle (-3995 HU in 693_UNCI).
            found.append(SampleSlice(label if index == 0 else f"{label}_{index + 1}", np.maximum(hu, -1024.0),
                                     tuple(info.pixel_spacing_mm), window))
    return found


def simulated_input(work: Path, max_slices: Optional[int] = None) -> tuple[Path, list]:
    """Write simulated quarter-dose DICOM of the packaged CT; returns the folder and the evaluation pairs."""
    from ldct_tf import evaluate
    from ldct_tf.demo import sample_data

    identity = sample_data.Identity("DEMO-0001", "Demo^Patient")
    low_dir, normal_dir = work / "low_dose_dicom", work / "normal_dose_dicom"
    pairs = []
    slices = packaged_ct()[:max_slices]
    from tqdm import tqdm

    for i, item in enumerate(tqdm(slices, desc=f"simulating {DOSE_FRACTION:.0%} dose", unit="slice")):
        low = sample_data.simulated_low_dose_hu(item.hu, DOSE_FRACTION, seed=i,
                                                pixel_spacing_mm=float(np.mean(item.pixel_spacing_mm)))
        sample_data.write_series(low_dir / item.name, [low], identity, series_description=f"{item.name} quarter dose",
                                 ctdivol=3.0, pixel_spacing_mm=item.pixel_spacing_mm, signed=True)
        sample_data.write_series(normal_dir / item.name, [item.hu], identity,
                                 series_description=f"{item.name} normal dose", pixel_spacing_mm=item.pixel_spacing_mm,
                                 signed=True)
        # The pair as stored in DICOM (integer HU), so the scores describe exactly the files written.
        pairs.append(evaluate.Pair(item.name, np.round(low).astype(np.float32), np.round(item.hu).astype(np.float32),
                                   item.pixel_spacing_mm, item.window))
    return low_dir, pairs


def mayo_input(data_dir: Path, work: Path) -> tuple[Path, list]:
    """The held-out Mayo patient's real quarter-dose slices (linked into one folder) and their full-dose pairs."""
    from ldct_tf import evaluate

    mayo = data_dir / "mayo_pairs"
    low_dir = work / "low_dose_dicom" / HELD_OUT_PATIENT
    low_dir.mkdir(parents=True, exist_ok=True)
    with open(mayo / "pairs.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient"] == HELD_OUT_PATIENT]
    for row in rows:
        target = low_dir / Path(row["quarter_dose"]).name
        if not target.exists():
            os.symlink((mayo / row["quarter_dose"]).resolve(), target)
    pairs = evaluate.load_pairs_csv(mayo / "pairs.csv", patients=[HELD_OUT_PATIENT])
    return low_dir, pairs


HOW_TO_READ = """How to read this table: each row is one denoiser run on the same low-dose slices, scored against the
normal-dose slices of the same positions (the reference).  PSNR and SSIM in the abdomen window (W400/L40): higher is
closer to the reference; RMSE: lower is closer.  'none' is the low-dose input itself: a denoiser must beat it.  Noise
SD is measured in flat soft tissue; the normal-dose row shows how much noise the reference itself carries, so a
noise SD far below it means smoothing, not dose recovery.  The panels in the report show every slice in its own
window, with each output minus the reference below it."""


def print_table(summary: dict) -> None:
    columns = [("psnr_abdomen", "PSNR abd dB", 2), ("ssim_abdomen", "SSIM abd", 3), ("psnr_wide", "PSNR wide dB", 2),
               ("rmse_hu", "RMSE HU", 1), ("noise_sd_hu", "noise SD HU", 1), ("seconds", "s/slice", 2)]
    print(f"{'denoiser':<14}" + "".join(f"{title:>14}" for _, title, _ in columns))
    for name in summary["denoisers"]:
        figures = summary["metrics"][name]
        cells = []
        for key, _, digits in columns:
            mean = figures[key]["mean"]
            cells.append(f"{mean:>14.{digits}f}" if mean is not None else f"{'-':>14}")
        print(f"{name:<14}" + "".join(cells))
    reference = summary["reference"]["noise_sd_hu"]["mean"]
    if reference is not None:
        print(f"{'(normal dose)':<14}" + f"{'':>14}" * 4 + f"{reference:>14.1f}")


def run_demo(work: Path, model: str | Path = DEFAULT_MODEL, input_dir: Optional[str | Path] = None,
             reference: Optional[str | Path] = None, baseline: Optional[str] = None,
             max_slices: Optional[int] = None) -> dict:
    """The three steps into ``work`` (input, denoise, evaluate), printing each as it goes; returns the folders and the
    report written (``low_dir``, ``denoised_dir``, ``report``: None without a reference).  Raises :class:`DemoError`
    for an unusable ``work`` folder and :class:`ldct_tf.denoise.DenoiseError` for an unusable model."""
    inputs = [Path(p).resolve() for p in (input_dir, reference, model) if p]
    prepare_out(work, inputs)
    # Heavy stages (TensorFlow, the baselines), imported once the paths are known to be usable: a wrong --out fails
    # in a second.
    from ldct_tf import baselines, denoise, evaluate

    model_fn, model_info = denoise.load_saved_model(model)
    low_dir, pairs = _demo_input(work, input_dir, reference, max_slices, evaluate)
    print(f"Step 2/3: denoising with {model_info.name} version {model_info.version} (DICOM in, DICOM out)")
    denoised_dir = work / "denoised_dicom"
    summary_d = denoise.denoise(low_dir, denoised_dir, model_fn, model_info, progress=True)
    print("  " + summary_d.line())
    report = None
    if pairs:
        baseline = baseline or ("bm3d_adaptive" if baselines.bm3d_available() else "nlm")
        print(f"Step 3/3: evaluating {model_info.name} against {baseline} and the low-dose input")
        denoisers = {"ldct_tf": lambda hu: np.asarray(model_fn(hu), np.float32), baseline: baselines.get(baseline),
                     "none": baselines.get("none")}
        summary = evaluate.evaluate(pairs, denoisers, work / "evaluation", panel_slices=len(pairs),
                                    info={"model": f"{model_info.name} v{model_info.version}", "input": str(low_dir)})
        print()
        print_table(summary)
        print()
        print(HOW_TO_READ)
        report = summary["files"]["report"]
    else:
        print("Step 3/3: skipped (no reference images to score against; give --reference)")
    return {"low_dir": low_dir, "denoised_dir": denoised_dir, "report": report}


def _demo_input(work: Path, input_dir, reference, max_slices: Optional[int], evaluate) -> tuple[Path, list]:
    """Step 1: the user's series, else the held-out Mayo patient when the shared data is there, else packaged CT with
    a simulated quarter dose."""
    data_dir = os.environ.get("LDCT_DATA_DIR")
    pairs: list = []
    print("Step 1/3: input")
    if input_dir:
        low_dir = Path(input_dir).resolve()
        if reference:
            pairs = evaluate.load_pair_dirs(low_dir, Path(reference).resolve())
        print(f"  your low-dose DICOM in {low_dir}")
    elif data_dir and (Path(data_dir) / "mayo_pairs" / "pairs.csv").exists():
        low_dir, pairs = mayo_input(Path(data_dir).resolve(), work)
        print(f"  real AAPM-Mayo quarter-dose slices of patient {HELD_OUT_PATIENT} (never trained on; v3's validation patient), "
              f"full dose as the reference: {len(pairs)} slices")
    else:
        low_dir, pairs = simulated_input(work, max_slices)
        print(f"  {len(pairs)} real CT slices from installed packages, {DOSE_FRACTION:.0%} dose simulated by "
              f"ldct_tf.simulate, written as DICOM to {low_dir}")
    return low_dir, pairs
