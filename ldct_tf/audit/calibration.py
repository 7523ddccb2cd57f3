"""Calibration of the audit's thresholds from a null denoiser: the rule, and writing it into the audit config.

A threshold is only as good as its false-flag rate on outputs that changed nothing that matters.  The null denoiser
is an oracle that returns the noise-free slice, so it removes exactly the noise and nothing else; any patch it gets
flagged, away from an inserted lesion, is a false flag.  Each calibrated criterion's threshold is the most permissive
value at which the oracle has at most ``budget`` flagged patches per slice away from lesions (per criterion):

- ``frc_min``: the anatomy-band FRC below which a patch is flagged (low is bad);
- ``blob_z_max``: the band-passed residual's z above which a patch is flagged, among patches whose blob is stronger
  than ``blob_hu_min``;
- ``anatomy_corr_max``: the residual-anatomy correlation above which a patch is flagged, among patches whose residual
  structure is above ``anatomy_hu_min``.

``blob_hu_min`` and ``anatomy_hu_min`` are fixed physical floors, not tuned.  Calibrate on development patients only,
never on the patients a result is reported on.  ``experiments/audit_thresholds.py`` runs it on the AAPM-Mayo
development patients; a site recalibrating for another scanner, dose or kernel calls :func:`calibrate` on its own
null slices and :func:`write_thresholds`.

Geometry (:func:`patches_holding`, :func:`patches_touching`) takes any target with ``row``, ``col`` (pixels) and
``radius_px(spacing_mm)``, such as ``ldct_tf.evaluate.lesions.Lesion``, so this module imports no evaluation code.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ldct_tf.audit.scores import AuditThresholds, SliceAudit, load_config

#: The thresholds :func:`calibrate` sets; every other key of the audit config is fixed by hand.
CALIBRATED = ("frc_min", "blob_z_max", "anatomy_corr_max")
#: The per-patch scores a null slice must carry (:func:`slice_scores`).
SCORES = ("frc", "blob_z", "blob_hu", "corr", "structure")


def slice_scores(result: SliceAudit) -> dict:
    """The per-patch scores of one slice audit that the flags and the calibration read."""
    return {"frc": result.frc_band, "blob_z": result.blob_z, "blob_hu": result.blob_hu,
            "corr": result.anatomy_corr, "structure": result.structure_hu}


def patches_holding(result: SliceAudit, spacing_mm: float, targets: Sequence) -> np.ndarray:
    """For each scored patch: the index of the first target whose disc lies wholly inside it, else -1."""
    hit = np.full(len(result.corners), -1)
    p = result.patch_px
    for k, target in enumerate(targets):
        r = target.radius_px(spacing_mm)
        inside = ((result.corners[:, 0] <= target.row - r) & (result.corners[:, 0] + p >= target.row + r)
                  & (result.corners[:, 1] <= target.col - r) & (result.corners[:, 1] + p >= target.col + r))
        hit[inside & (hit < 0)] = k
    return hit


def patches_touching(result: SliceAudit, spacing_mm: float, targets: Sequence) -> np.ndarray:
    """Patches that overlap any target disc at all (never counted as false flags)."""
    near = np.zeros(len(result.corners), bool)
    p = result.patch_px
    for target in targets:
        r = target.radius_px(spacing_mm)
        near |= ((result.corners[:, 0] <= target.row + r) & (result.corners[:, 0] + p >= target.row - r)
                 & (result.corners[:, 1] <= target.col + r) & (result.corners[:, 1] + p >= target.col - r))
    return near


def flags(scores: Mapping[str, np.ndarray], thresholds: AuditThresholds) -> np.ndarray:
    """[patches, 3] bool: the FRC, blob and anatomy criteria at ``thresholds`` on one slice's ``scores``."""
    return np.stack([scores["frc"] < thresholds.frc_min,
                     (scores["blob_z"] > thresholds.blob_z_max) & (scores["blob_hu"] > thresholds.blob_hu_min),
                     (scores["corr"] > thresholds.anatomy_corr_max)
                     & (scores["structure"] > thresholds.anatomy_hu_min)], axis=1)


def _edge(values: np.ndarray, allowed: int, low_is_bad: bool) -> float:
    """The value with at most ``allowed`` of ``values`` strictly beyond it (on the bad side)."""
    ordered = np.sort(values) if low_is_bad else -np.sort(-values)
    if len(ordered) == 0:
        raise ValueError("no background patch to calibrate on")
    return float(ordered[-1]) if len(ordered) <= allowed else float(ordered[allowed])


def calibrate(null_slices: Sequence[Mapping], thresholds: AuditThresholds, budget: float) -> dict:
    """The calibration rule (module docstring) on the null denoiser's slices.

    ``null_slices``: one mapping per slice with ``scores`` (:func:`slice_scores`) and ``near`` (:func:`patches_touching`
    of its lesions); ``thresholds`` gives the fixed floors.  Returns the three calibrated thresholds (each nudged just
    past its edge value and rounded, so the edge patch itself is not flagged), the slice count and the false flags
    allowed per criterion over all slices.
    """
    if not null_slices:
        raise ValueError("no null slices to calibrate on")
    if budget < 0:
        raise ValueError(f"budget must be >= 0 false flags per slice, got {budget}")
    allowed = int(np.floor(budget * len(null_slices)))
    bg = {k: np.concatenate([np.asarray(s["scores"][k])[~np.asarray(s["near"])] for s in null_slices])
          for k in SCORES}
    frc_min = _edge(bg["frc"], allowed, low_is_bad=True)
    blob_z = _edge(bg["blob_z"][bg["blob_hu"] > thresholds.blob_hu_min], allowed, low_is_bad=False)
    corr = _edge(bg["corr"][bg["structure"] > thresholds.anatomy_hu_min], allowed, low_is_bad=False)
    return {"frc_min": round(frc_min - 1e-3, 3), "blob_z_max": round(blob_z + 1e-2, 2),
            "anatomy_corr_max": round(corr + 1e-3, 3), "null_slices": len(null_slices),
            "allowed_per_criterion": allowed}


def provenance(budget: float, n_slices: int, patients: Sequence[str], never_on: str, command: str) -> dict:
    """How the thresholds were calibrated, as the audit config records it beside them."""
    return {
        "status": "calibrated",
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "patients": list(patients), "never_on": never_on, "slices": n_slices,
        "null_denoiser": "oracle: the noise-free simulated slice (removes exactly the noise, nothing else)",
        "rule": (f"each criterion's threshold is the most permissive value at which the oracle has at most "
                 f"{budget} flagged patches per slice away from inserted lesions; blob_hu_min and anatomy_hu_min "
                 "are fixed physical floors, not tuned"),
        "budget_false_flags_per_slice_per_criterion": budget,
    }


def write_thresholds(config_path: Path, calibrated: Mapping, provenance_record: Mapping) -> None:
    """Set the calibrated thresholds and their provenance in the audit config at ``config_path``; its other keys and
    its leading comment lines are kept."""
    import yaml

    config_path = Path(config_path)
    data = load_config(config_path)
    for key in CALIBRATED:
        data["audit"][key] = calibrated[key]
    data["provenance"] = dict(provenance_record)
    header = "".join(line for line in config_path.read_text().splitlines(True) if line.startswith("#"))
    config_path.write_text(header.rstrip() + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
