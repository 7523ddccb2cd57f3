"""Known-failure benchmark of the per-slice change audit, and lesion detectability of the denoisers.

``python -m benchmarks.audit [--lesions-per-slice 3] [--bm3d-stride 1] [--config configs/audit.yaml]``

1. Cases: on every Mayo development pair (``$LDCT_DATA_DIR/mayo_pairs/pairs.csv``) up to ``--lesions-per-slice``
   liver-lesion-like discs (5-15 mm, 10-40 HU, hypo- and hyperdense alternating) are inserted into the FULL-dose
   slice, then quarter dose is simulated with ``ldct_tf.simulate.simulate_low_dose`` at the kernel's calibrated noise
   (``configs/audit.yaml`` ``simulation``), with and without the lesions, same seed.  Cached (outside the repository:
   ``--cache``, default ``~/.cache/ldct_tf/audit_cases``), because each slice costs two simulations.
2. Audit (``ldct_tf.audit.scores``) of four denoisers: ``oracle`` (returns the noise-free simulated slice: removes
   exactly the noise and nothing else), the shipped ``model`` (saved_models/ldct_denoiser, SavedModel), ``median``
   (a 11x11 median filter: erases small lesions) and ``painter`` (the model's output plus one painted disc per slice).
3. Scores with the config's thresholds, per denoiser, on development and test slices separately: share of lesions
   whose patch is flagged (inserted lesions; painted discs for ``painter``), false flags per slice (flagged patches
   that contain no lesion or painted disc), share of slices flagged.
4. Detectability (``ldct_tf.evaluate.detectability``) of input, model, BM3D, NLM and the median: NPW d', CNR,
   contrast kept.
5. Cost: audit seconds per slice beside the model's inference seconds per slice, same run.

It measures with the thresholds it is given and never changes them: ``python -m experiments.audit_thresholds``
calibrates them (``ldct_tf.audit.calibration``, on the same cases) and writes ``configs/audit.yaml``.

Writes ``benchmarks/results/audit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from benchmarks import harness
from ldct_tf.audit import calibration

REPO = harness.REPO
CONFIG = REPO / "configs" / "audit.yaml"
DEFAULT_CACHE = Path.home() / ".cache" / "ldct_tf" / "audit_cases"
DEV_PATIENTS = (harness.NORMAL_PATIENT, harness.LOW_PATIENT)
TEST_PATIENT = harness.TEST_PATIENT
AUDITED = ("oracle", "model", "median", "painter")
CRITERIA = ("frc", "blob", "anatomy")


def build_cases(rows: list[dict], per_slice: int, cache: Path, config: dict,
                patients: Optional[Sequence[str]] = None) -> list:
    """(patient, kernel, normal-dose HU, lesion case) per pairs.csv row (only ``patients``' rows when given).  A row's
    lesions, noise seed and cache file follow its index in ``rows``, so a subset reuses the same cases."""
    from ldct_tf import dicom
    from ldct_tf.evaluate import lesions

    cache.mkdir(parents=True, exist_ok=True)
    dose = float(config.get("simulation", {}).get("dose_fraction", 0.25))
    cases = []
    for index, row in enumerate(rows):
        if patients is not None and row["patient"] not in patients:
            continue
        normal, info = dicom.read_slice(str(harness.data_root() / "mayo_pairs" / row["full_dose"]))
        spacing = float(np.mean(info.pixel_spacing_mm))
        found = lesions.place_lesions(normal, spacing, per_slice, np.random.default_rng(1000 + index))
        settings = lesions.simulation_settings(row["kernel"], config)
        key = f"case{index:02d}_n{per_slice}_d{dose}_i{settings['i0']:.3g}_{settings['filter_name']}.npz"
        path = cache / key
        if path.exists():
            z = np.load(path)
            case = lesions.LesionCase(f"slice{index:02d}", found, spacing, z["low_with"], z["low_without"],
                                      z["ref_with"], z["ref_without"])
        else:
            case = lesions.simulate_case(f"slice{index:02d}", normal, spacing, found, row["kernel"], seed=index,
                                         dose_fraction=dose, config=config)
            np.savez(path, low_with=case.low_with, low_without=case.low_without, ref_with=case.ref_with,
                     ref_without=case.ref_without)
        cases.append((row["patient"], row["kernel"], normal, case))
        print(f"case {index + 1}/{len(rows)}: {row['patient']} {row['kernel']}, {len(found)} lesion(s)", flush=True)
    return cases


def evaluate_flags(records: list[dict], thresholds) -> dict:
    out: dict = {}
    for name in AUDITED:
        for split in ("dev", "test"):
            rs = [r for r in records if r["denoiser"] == name and r["split"] == split]
            if not rs:
                continue
            targets = detected = 0
            false_flags = 0
            flagged_slices = 0
            by_criterion = {c: 0 for c in CRITERIA}
            by_size = {"5-8 mm": [0, 0], "8-11 mm": [0, 0], "11-15 mm": [0, 0]}
            for r in rs:
                f = calibration.flags(r["scores"], thresholds)
                any_flag = f.any(axis=1)
                flagged_slices += bool(any_flag.any())
                false_flags += int((any_flag & ~r["near"]).sum())
                for k, lesion in enumerate(r["targets"]):
                    hit = bool(any_flag[r["hit"] == k].any())
                    targets += 1
                    detected += hit
                    for c, col in zip(CRITERIA, f.T):
                        by_criterion[c] += bool(col[r["hit"] == k].any())
                    bucket = "5-8 mm" if lesion.diameter_mm < 8 else "8-11 mm" if lesion.diameter_mm < 11 \
                        else "11-15 mm"
                    by_size[bucket][0] += 1
                    by_size[bucket][1] += hit
            out.setdefault(name, {})[split] = {
                "slices": len(rs), "targets": targets,
                "detection_rate": detected / targets if targets else None,
                "detected_by_criterion": by_criterion,
                "detection_by_size": {k: (v[1] / v[0] if v[0] else None) for k, v in by_size.items()},
                "false_flags_per_slice": false_flags / len(rs), "flagged_slice_share": flagged_slices / len(rs),
            }
    return out


def audit_records(cases: list, thresholds, model=None, audited: Sequence[str] = AUDITED) -> tuple[list, list, list]:
    """Audit every case's output of each denoiser in ``audited`` (``model`` needed for all but ``oracle``); returns
    (one record per slice and denoiser: split, targets, the patches holding and touching them, the scores; the audit's
    seconds per slice; the model's seconds per slice)."""
    from ldct_tf.audit import scores as audit_scores
    from ldct_tf.evaluate import lesions

    records, audit_seconds, model_seconds = [], [], []
    for index, (patient, kernel, normal, case) in enumerate(cases):
        outputs, painter = {"oracle": case.ref_with}, None
        if model is not None:
            start = time.perf_counter()
            model_out = model(case.low_with)
            model_seconds.append(time.perf_counter() - start)
            painter = lesions.DiscPainter(case.spacing_mm, n=1, seed=index, base=lambda hu, m=model_out: m)
            painter.avoid = case.lesions
            outputs.update({"model": model_out, "median": lesions.median_eraser(11)(case.low_with),
                            "painter": painter(case.low_with)})
        for name in audited:
            start = time.perf_counter()
            result = audit_scores.audit_slice(case.low_with, outputs[name], (case.spacing_mm,) * 2, thresholds)
            audit_seconds.append(time.perf_counter() - start)
            targets = painter.painted if name == "painter" else case.lesions
            everything = list(case.lesions) + (painter.painted if name == "painter" else [])
            records.append({"denoiser": name, "split": "test" if patient == TEST_PATIENT else "dev",
                            "patient": patient, "targets": targets,
                            "hit": calibration.patches_holding(result, case.spacing_mm, targets),
                            "near": calibration.patches_touching(result, case.spacing_mm, everything),
                            "scores": calibration.slice_scores(result)})
    return records, audit_seconds, model_seconds


def detectability_rows(cases: list, model, bm3d_stride: int) -> tuple[dict, dict]:
    """NPW detectability per split and denoiser, and abdomen PSNR against the noise-free slice."""
    from ldct_tf import baselines, metrics
    from ldct_tf.evaluate import detectability, lesions

    detect_rows: dict = {"dev": {}, "test": {}}
    psnr: dict = {}
    fns = {"model": lambda hu: model(hu), "nlm": baselines.get("nlm"), "median": lesions.median_eraser(11)}
    have_bm3d = baselines.bm3d_available()
    for index, (patient, kernel, normal, case) in enumerate(cases):
        if not case.lesions:
            continue
        split = "test" if patient == TEST_PATIENT else "dev"
        use = dict(fns)
        if have_bm3d and index % max(1, bm3d_stride) == 0:
            use["bm3d"] = baselines.get("bm3d")
        per = detectability.run_case(case, use, normal, seed=index)
        for name, items in per.items():
            detect_rows[split].setdefault(name, []).extend(items)
        for name, fn in [("input", None), *use.items()]:
            out = case.low_with if fn is None else fn(case.low_with)
            psnr.setdefault(split, {}).setdefault(name, []).append(metrics.psnr(out, case.ref_with, "abdomen"))
        print(f"detectability {index + 1}/{len(cases)}", flush=True)
    return detect_rows, psnr


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="audit config with the thresholds to measure "
                                                         "(default %(default)s)")
    p.add_argument("--lesions-per-slice", type=int, default=3)
    p.add_argument("--bm3d-stride", type=int, default=1, help="detectability of BM3D on every k-th slice")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--limit", type=int, help="only the first N pairs (a quick look; not for results)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = harness.data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"benchmarks.audit: error: {root}/mayo_pairs/pairs.csv not found (set LDCT_DATA_DIR)", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ldct_tf.audit import scores as audit_scores

    try:
        config, thresholds = audit_scores.load_config(args.config), audit_scores.load_thresholds(args.config)
    except audit_scores.AuditConfigError as exc:
        print(f"benchmarks.audit: error: {exc}", file=sys.stderr)
        return 1
    from ldct_tf.evaluate import detectability  # heavy (TensorFlow): after the input checks
    from ldct_tf.export import SavedModelDenoiser
    rows = harness.pair_rows(root)[: args.limit]
    cases = build_cases(rows, args.lesions_per_slice, Path(args.cache), config)
    model = SavedModelDenoiser(REPO / "saved_models" / "ldct_denoiser")
    records, audit_seconds, model_seconds = audit_records(cases, thresholds, model)
    flags = evaluate_flags(records, thresholds)
    detect_rows, psnr = detectability_rows(cases, model, args.bm3d_stride)
    result = {
        "benchmark": "audit",
        "command": "python -m benchmarks.audit",
        "machine": harness.machine_info(), "versions": harness.versions("scikit-image", "bm3d"),
        "data": {"pairs": len(rows), "lesions_per_slice": args.lesions_per_slice,
                 "dev_patients": list(DEV_PATIENTS), "test_patient": TEST_PATIENT,
                 "lesions": sum(len(c.lesions) for *_, c in cases)},
        "thresholds": thresholds.as_dict(), "provenance": config.get("provenance"),
        "audit": flags,
        "detectability": {split: detectability.summarise(r) for split, r in detect_rows.items() if r},
        "psnr_abdomen_vs_noise_free": {split: {n: float(np.mean(v)) for n, v in d.items()}
                                       for split, d in psnr.items()},
        "cost": {"audit_seconds_per_slice_median": float(np.median(audit_seconds)),
                 "model_seconds_per_slice_median": float(np.median(model_seconds)),
                 "target_audit_seconds_per_slice": 1.0,
                 "met": bool(np.median(audit_seconds) < 1.0)},
    }
    harness.write_result(result, indent=1)
    from ldct_tf.evaluate.report import jsonable

    print(json.dumps(jsonable({"audit": flags, "detectability": result["detectability"], "cost": result["cost"]}),
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
