"""Known-failure benchmark of the per-slice change audit, and lesion detectability of the denoisers.

``python -m benchmarks.audit [--calibrate] [--lesions-per-slice 3] [--bm3d-stride 1]``

1. Cases: on every Mayo development pair (``$LDCT_DATA_DIR/mayo_pairs/pairs.csv``) up to ``--lesions-per-slice``
   liver-lesion-like discs (5-15 mm, 10-40 HU, hypo- and hyperdense alternating) are inserted into the FULL-dose
   slice, then quarter dose is simulated with ``ldct_tf.simulate.simulate_low_dose`` at the kernel's calibrated noise
   (``configs/audit.yaml`` ``simulation``), with and without the lesions, same seed.  Cached (outside the repository:
   ``--cache``, default ``~/.cache/ldct_tf/audit_cases``), because each slice costs two simulations.
2. Audit (``ldct_tf.audit.scores``) of four denoisers: ``oracle`` (returns the noise-free simulated slice: removes
   exactly the noise and nothing else), the shipped ``model`` (saved_models/ldct_denoiser, SavedModel), ``median``
   (a 11x11 median filter: erases small lesions) and ``painter`` (the model's output plus one painted disc per slice).
3. ``--calibrate``: thresholds chosen on patients L096 and L143 ONLY (never L286, the test patient): each criterion's
   threshold is the most permissive value at which the ``oracle`` (the null: pure noise removed) has at most
   ``--budget`` flagged patches per slice away from lesions.  Written with its provenance into configs/audit.yaml.
4. Scores with the config's thresholds, per denoiser, on development and test slices separately: share of lesions
   whose patch is flagged (inserted lesions; painted discs for ``painter``), false flags per slice (flagged patches
   that contain no lesion or painted disc), share of slices flagged.
5. Detectability (``ldct_tf.evaluate.detectability``) of input, model, BM3D, NLM and the median: NPW d', CNR, contrast kept.
6. Cost: audit seconds per slice beside the model's inference seconds per slice, same run.

Writes ``benchmarks/results/audit.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "configs" / "audit.yaml"
DEV_PATIENTS = ("L096", "L143")
TEST_PATIENT = "L286"
AUDITED = ("oracle", "model", "median", "painter")
CRITERIA = ("frc", "blob", "anatomy")


def data_root() -> Path:
    return Path(os.environ.get("LDCT_DATA_DIR", REPO.parent / "shared" / "data"))


def build_cases(rows: list[dict], per_slice: int, cache: Path, config: dict) -> list:
    from ldct_tf import dicom
    from ldct_tf.evaluate import lesions

    cache.mkdir(parents=True, exist_ok=True)
    dose = float(config.get("simulation", {}).get("dose_fraction", 0.25))
    cases = []
    for index, row in enumerate(rows):
        normal, info = dicom.read_slice(str(data_root() / "mayo_pairs" / row["full_dose"]))
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


def patch_table(result, spacing: float, targets: Sequence) -> np.ndarray:
    """For each scored patch: the index of the first target whose disc lies wholly inside it, else -1."""
    hit = np.full(len(result.corners), -1)
    p = result.patch_px
    for k, lesion in enumerate(targets):
        r = lesion.radius_px(spacing)
        inside = ((result.corners[:, 0] <= lesion.row - r) & (result.corners[:, 0] + p >= lesion.row + r)
                  & (result.corners[:, 1] <= lesion.col - r) & (result.corners[:, 1] + p >= lesion.col + r))
        hit[inside & (hit < 0)] = k
    return hit


def near_any(result, spacing: float, targets: Sequence) -> np.ndarray:
    """Patches that overlap any target disc at all (these are never counted as false flags)."""
    near = np.zeros(len(result.corners), bool)
    p = result.patch_px
    for lesion in targets:
        r = lesion.radius_px(spacing)
        near |= ((result.corners[:, 0] <= lesion.row + r) & (result.corners[:, 0] + p >= lesion.row - r)
                 & (result.corners[:, 1] <= lesion.col + r) & (result.corners[:, 1] + p >= lesion.col - r))
    return near


def flags_for(s: dict, t) -> np.ndarray:
    return np.stack([s["frc"] < t.frc_min, (s["blob_z"] > t.blob_z_max) & (s["blob_hu"] > t.blob_hu_min),
                     (s["corr"] > t.anatomy_corr_max) & (s["structure"] > t.anatomy_hu_min)], axis=1)


def calibrate(records: list[dict], thresholds, budget: float) -> dict:
    """Thresholds from the oracle's background patches on development slices (see the module docstring)."""
    null = [r for r in records if r["denoiser"] == "oracle" and r["split"] == "dev"]
    n_slices = len(null)
    allowed = int(np.floor(budget * n_slices))
    bg = {k: np.concatenate([r["scores"][k][~r["near"]] for r in null]) for k in
          ("frc", "blob_z", "blob_hu", "corr", "structure")}

    def edge(values: np.ndarray, low_is_bad: bool) -> float:
        ordered = np.sort(values) if low_is_bad else -np.sort(-values)
        if len(ordered) <= allowed:
            return float(ordered[-1])
        return float(ordered[allowed])  # at most `allowed` values strictly beyond it

    frc_min = edge(bg["frc"], True)
    blob_z = edge(bg["blob_z"][bg["blob_hu"] > thresholds.blob_hu_min], False)
    corr = edge(bg["corr"][bg["structure"] > thresholds.anatomy_hu_min], False)
    return {"frc_min": round(frc_min - 1e-3, 3), "blob_z_max": round(blob_z + 1e-2, 2),
            "anatomy_corr_max": round(corr + 1e-3, 3), "null_slices": n_slices, "allowed_per_criterion": allowed}


def write_config(calibrated: dict, budget: float, n_slices: int) -> None:
    """Rewrite the calibrated thresholds and their provenance in configs/audit.yaml (other keys kept)."""
    import yaml

    data = yaml.safe_load(CONFIG.read_text())
    for key in ("frc_min", "blob_z_max", "anatomy_corr_max"):
        data["audit"][key] = calibrated[key]
    data["provenance"] = {
        "status": "calibrated",
        "command": "python -m benchmarks.audit --calibrate",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "patients": list(DEV_PATIENTS), "never_on": TEST_PATIENT, "slices": n_slices,
        "null_denoiser": "oracle: the noise-free simulated slice (removes exactly the noise, nothing else)",
        "rule": (f"each criterion's threshold is the most permissive value at which the oracle has at most "
                 f"{budget} flagged patches per slice away from inserted lesions; blob_hu_min and anatomy_hu_min "
                 "are fixed physical floors, not tuned"),
        "budget_false_flags_per_slice_per_criterion": budget,
    }
    text = "".join(line for line in CONFIG.read_text().splitlines(True) if line.startswith("#"))  # header
    CONFIG.write_text(text.rstrip() + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


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
                f = flags_for(r["scores"], thresholds)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--calibrate", action="store_true", help="choose thresholds on L096/L143, write configs/audit.yaml")
    p.add_argument("--lesions-per-slice", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.1, help="oracle false flags per slice per criterion")
    p.add_argument("--bm3d-stride", type=int, default=1, help="detectability of BM3D on every k-th slice")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "ldct_tf" / "audit_cases"))
    p.add_argument("--limit", type=int, help="only the first N pairs (a quick look; not for results)")
    args = p.parse_args(argv)
    root = data_root()
    if not (root / "mayo_pairs" / "pairs.csv").exists():
        print(f"benchmarks.audit: error: {root}/mayo_pairs/pairs.csv not found (set LDCT_DATA_DIR)", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.pipeline import machine_info, versions
    from ldct_tf import baselines, metrics
    from ldct_tf.audit import scores as audit_scores
    from ldct_tf.evaluate import detectability
    from ldct_tf.evaluate import lesions
    from ldct_tf.export import SavedModelDenoiser

    with open(root / "mayo_pairs" / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))[: args.limit]
    config = audit_scores.load_config(CONFIG)
    cases = build_cases(rows, args.lesions_per_slice, Path(args.cache), config)
    model = SavedModelDenoiser(REPO / "saved_models" / "ldct_denoiser")
    permissive = audit_scores.load_thresholds(CONFIG)  # geometry from the config; flags recomputed below

    records, audit_seconds, model_seconds = [], [], []
    for index, (patient, kernel, normal, case) in enumerate(cases):
        split = "test" if patient == TEST_PATIENT else "dev"
        low = case.low_with
        start = time.perf_counter()
        model_out = model(low)
        model_seconds.append(time.perf_counter() - start)
        painter = lesions.DiscPainter(case.spacing_mm, n=1, seed=index, base=lambda hu, m=model_out: m)
        painter.avoid = case.lesions
        outputs = {"oracle": case.ref_with, "model": model_out, "median": lesions.median_eraser(11)(low),
                   "painter": painter(low)}
        for name in AUDITED:
            start = time.perf_counter()
            result = audit_scores.audit_slice(low, outputs[name], (case.spacing_mm,) * 2, permissive)
            audit_seconds.append(time.perf_counter() - start)
            targets = painter.painted if name == "painter" else case.lesions
            everything = list(case.lesions) + (painter.painted if name == "painter" else [])
            records.append({"denoiser": name, "split": split, "patient": patient, "targets": targets,
                            "hit": patch_table(result, case.spacing_mm, targets),
                            "near": near_any(result, case.spacing_mm, everything),
                            "scores": {"frc": result.frc_band, "blob_z": result.blob_z, "blob_hu": result.blob_hu,
                                       "corr": result.anatomy_corr, "structure": result.structure_hu}})

    calibration = None
    if args.calibrate:
        calibration = calibrate(records, permissive, args.budget)
        write_config(calibration, args.budget, calibration["null_slices"])
        print(f"calibrated on {', '.join(DEV_PATIENTS)}: {calibration}")
    thresholds = audit_scores.load_thresholds(CONFIG)
    flags = evaluate_flags(records, thresholds)

    detect_rows: dict = {"dev": {}, "test": {}}
    psnr: dict = {}
    fns = {"model": lambda hu: model(hu), "nlm": baselines.get("nlm"), "median": lesions.median_eraser(11)}
    have_bm3d = baselines.bm3d_available()
    for index, (patient, kernel, normal, case) in enumerate(cases):
        if not case.lesions:
            continue
        split = "test" if patient == TEST_PATIENT else "dev"
        use = dict(fns)
        if have_bm3d and index % max(1, args.bm3d_stride) == 0:
            use["bm3d"] = baselines.get("bm3d")
        per = detectability.run_case(case, use, normal, seed=index)
        for name, items in per.items():
            detect_rows[split].setdefault(name, []).extend(items)
        for name, fn in [("input", None), *use.items()]:
            out = case.low_with if fn is None else fn(case.low_with)
            psnr.setdefault(split, {}).setdefault(name, []).append(metrics.psnr(out, case.ref_with, "abdomen"))
        print(f"detectability {index + 1}/{len(cases)}", flush=True)

    result = {
        "benchmark": "audit",
        "command": "python -m benchmarks.audit" + (" --calibrate" if args.calibrate else ""),
        "machine": machine_info(), "versions": versions(),
        "data": {"pairs": len(rows), "lesions_per_slice": args.lesions_per_slice,
                 "dev_patients": list(DEV_PATIENTS), "test_patient": TEST_PATIENT,
                 "lesions": sum(len(c.lesions) for *_, c in cases)},
        "thresholds": thresholds.as_dict(), "calibration": calibration,
        "provenance": audit_scores.load_config(CONFIG).get("provenance"),
        "audit": flags,
        "detectability": {split: detectability.summarise(r) for split, r in detect_rows.items() if r},
        "psnr_abdomen_vs_noise_free": {split: {n: float(np.mean(v)) for n, v in d.items()}
                                       for split, d in psnr.items()},
        "cost": {"audit_seconds_per_slice_median": float(np.median(audit_seconds)),
                 "model_seconds_per_slice_median": float(np.median(model_seconds)),
                 "target_audit_seconds_per_slice": 1.0,
                 "met": bool(np.median(audit_seconds) < 1.0)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from ldct_tf.evaluate.report import jsonable as _jsonable

    (RESULTS / "audit.json").write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    print(json.dumps(_jsonable({"audit": flags, "detectability": result["detectability"],
                                "cost": result["cost"]}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
