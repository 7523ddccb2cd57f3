"""The audit-threshold calibration rule and its config writing (ldct_tf.audit.calibration)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ldct_tf.audit import calibration
from ldct_tf.audit.scores import AuditThresholds, load_config, load_thresholds

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Disc:
    row: float
    col: float
    radius: float

    def radius_px(self, spacing_mm: float) -> float:
        return self.radius / spacing_mm


@dataclass
class Grid:
    """Just what the geometry reads of a SliceAudit: patch corners and size."""
    corners: np.ndarray
    patch_px: int


def _null_slices(n_slices: int = 10, patches: int = 6, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"scores": {"frc": rng.uniform(0.1, 0.9, patches), "blob_z": rng.uniform(0, 8, patches),
                        "blob_hu": rng.uniform(0, 20, patches), "corr": rng.uniform(0, 0.5, patches),
                        "structure": rng.uniform(0, 6, patches)},
             "near": np.zeros(patches, bool)} for _ in range(n_slices)]


def _false_flags(slices: list[dict], thresholds: AuditThresholds) -> np.ndarray:
    """Background flags per criterion over all slices."""
    return sum(calibration.flags(s["scores"], thresholds)[~s["near"]].sum(axis=0) for s in slices)


def test_thresholds_are_the_most_permissive_within_the_false_flag_budget():
    slices, floors = _null_slices(), AuditThresholds()
    out = calibration.calibrate(slices, floors, budget=0.2)
    assert out["allowed_per_criterion"] == 2 and out["null_slices"] == 10
    calibrated = AuditThresholds(**{k: out[k] for k in calibration.CALIBRATED})
    assert (_false_flags(slices, calibrated) <= 2).all()
    # One step stricter on each criterion (to the next background value) breaks the budget: nothing more permissive
    # was possible.
    frc = np.sort(np.concatenate([s["scores"]["frc"] for s in slices]))
    assert _false_flags(slices, AuditThresholds(frc_min=frc[2] + 1e-9))[0] == 3
    blob = np.concatenate([s["scores"]["blob_z"][s["scores"]["blob_hu"] > floors.blob_hu_min] for s in slices])
    assert _false_flags(slices, AuditThresholds(blob_z_max=np.sort(blob)[-3] - 1e-9))[1] == 3
    assert out["blob_z_max"] > np.sort(blob)[-3]


def test_patches_near_lesions_and_below_the_physical_floors_do_not_move_the_thresholds():
    slices = _null_slices()
    base = calibration.calibrate(slices, AuditThresholds(), budget=0.1)
    for s in slices:  # a lesion in patch 0 of every slice: the oracle keeps it, so its patch scores as changed
        s["scores"]["frc"][0], s["scores"]["corr"][0], s["scores"]["structure"][0] = 0.0, 0.99, 10.0
        s["near"][0] = True
        s["scores"]["blob_z"][1], s["scores"]["blob_hu"][1] = 50.0, 1.0  # a strong z on a blob under 5 HU
    moved = calibration.calibrate(slices, AuditThresholds(), budget=0.1)
    unmoved = calibration.calibrate([{**s, "near": np.zeros_like(s["near"])} for s in slices], AuditThresholds(),
                                    budget=0.1)
    assert moved["blob_z_max"] < 50 and unmoved["frc_min"] < moved["frc_min"] <= base["frc_min"] + 1e-3
    assert unmoved["anatomy_corr_max"] > 0.99 > moved["anatomy_corr_max"]


def test_calibration_refuses_no_slices_and_a_negative_budget():
    with pytest.raises(ValueError, match="no null slices"):
        calibration.calibrate([], AuditThresholds(), 0.1)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        calibration.calibrate(_null_slices(), AuditThresholds(), -0.1)


def test_patch_geometry_tells_holding_from_touching():
    grid = Grid(corners=np.array([[0, 0], [0, 48], [48, 0]]), patch_px=48)
    inside, edge = Disc(row=24, col=24, radius=5), Disc(row=24, col=47, radius=4)
    assert calibration.patches_holding(grid, 1.0, [inside, edge]).tolist() == [0, -1, -1]
    assert calibration.patches_touching(grid, 1.0, [edge]).tolist() == [True, True, False]
    assert calibration.patches_touching(grid, 1.0, []).tolist() == [False, False, False]


def test_write_thresholds_sets_the_three_values_and_provenance_and_keeps_the_rest(tmp_path):
    config = tmp_path / "audit.yaml"
    shutil.copy(REPO / "configs" / "audit.yaml", config)
    before = load_config(config)
    record = calibration.provenance(0.1, 21, ["P1", "P2"], "P3", "python -m experiments.audit_thresholds")
    calibration.write_thresholds(config, {"frc_min": 0.123, "blob_z_max": 7.5, "anatomy_corr_max": 0.4}, record)
    after, thresholds = load_config(config), load_thresholds(config)
    assert (thresholds.frc_min, thresholds.blob_z_max, thresholds.anatomy_corr_max) == (0.123, 7.5, 0.4)
    assert {k: v for k, v in after["audit"].items() if k not in calibration.CALIBRATED} == \
        {k: v for k, v in before["audit"].items() if k not in calibration.CALIBRATED}
    assert after["simulation"] == before["simulation"]
    assert after["provenance"]["never_on"] == "P3" and after["provenance"]["slices"] == 21
    assert after["provenance"]["command"] == "python -m experiments.audit_thresholds"
    assert config.read_text().startswith("# Per-slice change audit")
