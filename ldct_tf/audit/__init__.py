"""Per-slice change audit of a denoised series: what did the denoiser change, and where should a reader look?

    python -m ldct_tf.audit LOW_SERIES DENOISED_SERIES --out DIR [--config configs/audit.yaml]

``ldct_tf.denoise`` runs it on every series it writes (``--no-audit`` skips it) and puts the result in the series'
``audit/`` folder; the CLI audits any pair of series (the low-dose input and a denoised version of it, matched by the
derived files' Source Image Sequence, else by slice position).  Per series it writes:

- ``audit.json``: the thresholds and their provenance, and per slice its scores (``ldct_tf.audit.scores``: the
  anatomy-band FRC of the denoised vs the input patches, the method-noise blob z and anatomy correlation, residual
  SD and mean) and every flagged patch with its box ``[top, left, height, width]`` in pixels and why it was flagged;
- ``slice_NNNN.png`` for each flagged slice: input and output side by side (liver window) with the flagged patches
  boxed, and the removed residual.

Slices are named by their index in the series and their InstanceNumber, never by patient data or file names.
How a reader should use it: docs/audit.md.
"""

from __future__ import annotations

import sys

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ldct_tf.audit.scores import (AuditConfigError, AuditThresholds, SliceAudit,  # noqa: F401 (re-export)
                                  audit_slice, load_config, load_thresholds)
from ldct_tf.errors import LdctError
from ldct_tf.jsonio import jsonable

SIDECAR = "audit.json"
AUDIT_FOLDER = "audit"


@dataclass
class SeriesAudit:
    """Collects one series' slice audits, writes a PNG per flagged slice as it goes and the JSON sidecar at the end.

    ``folder`` None computes without writing (``evaluate`` uses it that way).
    """

    folder: Optional[Path]
    thresholds: AuditThresholds = field(default_factory=load_thresholds)
    provenance: dict = field(default_factory=dict)
    slices: list[dict] = field(default_factory=list)
    figures: bool = True

    def add(self, low_hu: np.ndarray, denoised_hu: np.ndarray, pixel_spacing_mm: Sequence[float],
            instance: Optional[int] = None, sop_instance_uid: Optional[str] = None) -> SliceAudit:
        index = len(self.slices)
        result = audit_slice(low_hu, denoised_hu, pixel_spacing_mm, self.thresholds)
        entry = {"index": index, "instance": instance, "sop_instance_uid": sop_instance_uid, **result.summary(),
                 "flagged": result.n_flagged > 0, "patches_flagged": result.flagged_patches()}
        if result.n_flagged and self.folder is not None and self.figures:
            entry["figure"] = write_figure(self.folder / f"slice_{index:04d}.png", low_hu, denoised_hu, result,
                                           title=f"slice {index} (instance {instance})").name
        self.slices.append(entry)
        return result

    def report(self) -> dict:
        flagged = [s for s in self.slices if s["flagged"]]
        return {
            "what": "ldct_tf per-slice change audit (reference-free: denoised vs its own low-dose input)",
            "thresholds": self.thresholds.as_dict(), "provenance": self.provenance,
            "slices": len(self.slices), "flagged_slices": len(flagged),
            "flagged_patches": int(sum(s["flagged_patches"] for s in self.slices)),
            "per_slice": self.slices,
        }

    def write(self) -> Optional[Path]:
        if self.folder is None:
            return None
        path = self.folder / SIDECAR
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(jsonable(self.report()), indent=1, allow_nan=False) + "\n")
        except OSError as exc:
            raise AuditWriteError(path, exc) from None
        return path


class AuditWriteError(LdctError):
    """The audit's sidecar or a PNG could not be written (a full disk, a read-only folder).  Why its own error: it used
    to escape as a bare OSError traceback mid-series (issue 27); ``ldct_tf.denoise`` turns it into one line and
    writes nothing of the series."""

    def __init__(self, path: Path, exc: OSError) -> None:
        self.path = path
        self.reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        super().__init__(f"{path}: cannot write the audit ({self.reason})")


def new_series_audit(folder: Optional[Path], config: Optional[str | Path] = None, figures: bool = True
                     ) -> SeriesAudit:
    """A :class:`SeriesAudit` with the thresholds and provenance of ``config`` (default ``configs/audit.yaml``)."""
    data = load_config(config)
    return SeriesAudit(folder, load_thresholds(config), dict(data.get("provenance", {})), figures=figures)


def write_figure(path: Path, low_hu: np.ndarray, denoised_hu: np.ndarray, result: SliceAudit,
                 title: str = "") -> Path:
    """Input | output | removed residual, flagged patches boxed in red on all three."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a notebook's inline backend is kept
        matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    from ldct_tf import ct

    liver = ct.window("liver")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditWriteError(path, exc) from None
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.4))
    panels = [("low-dose input", low_hu, dict(cmap="gray", vmin=liver.low, vmax=liver.high)),
              ("denoised output", denoised_hu, dict(cmap="gray", vmin=liver.low, vmax=liver.high)),
              ("removed (input - output), +-60 HU", np.asarray(low_hu) - np.asarray(denoised_hu),
               dict(cmap="RdBu_r", vmin=-60, vmax=60))]
    for ax, (name, image, style) in zip(axes, panels):
        ax.imshow(image, **style)
        for top, left, h, w in result.boxes():
            ax.add_patch(plt.Rectangle((left, top), w, h, fill=False, edgecolor="red", linewidth=1.0))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}: {result.n_flagged} flagged patch(es), liver window W250/L80", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise AuditWriteError(path, exc) from None
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- auditing two series on disk
class AuditInputError(LdctError):
    """A pair of series that cannot be audited (one line naming the folder or slice; exit status 1 on the command
    line)."""


def _read_series(folder: Path) -> list:
    from ldct_tf import dicom

    if not folder.exists():
        raise AuditInputError(f"{folder}: not found")
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    slices = []
    for path in files:
        try:
            ds, hu, info = dicom.read_ct_dataset(path)
        except dicom.NotUsableCT:
            continue
        slices.append((ds, hu, info))
    if not slices:
        raise AuditInputError(f"{folder}: no usable CT slices")
    if len({info.series_key for _, _, info in slices}) > 1:
        raise AuditInputError(f"{folder}: holds more than one series; give one series folder")
    return sorted(slices, key=lambda s: (s[2].z_mm, s[2].instance))


def match_slices(low: list, denoised: list) -> list[tuple]:
    """Pairs (low, denoised): by the denoised files' SourceImageSequence when it names the low slices, else by order
    (equal counts needed)."""
    by_uid = {info.sop_uid: (ds, hu, info) for ds, hu, info in low}
    pairs = []
    for item in denoised:
        ref = item[0].get("SourceImageSequence")
        uid = str(ref[0].get("ReferencedSOPInstanceUID", "")) if ref else ""
        if uid not in by_uid:
            break
        pairs.append((by_uid[uid], item))
    else:
        return pairs
    if len(low) != len(denoised):
        raise AuditInputError(f"cannot match slices: {len(low)} low-dose and {len(denoised)} denoised slices and no "
                              "Source Image Sequence linking them")
    return list(zip(low, denoised))


def audit_series_folders(low: Path, denoised: Path, out: Path, config: Optional[str | Path] = None,
                         figures: bool = True) -> tuple[Path, dict]:
    """Audit the series in ``denoised`` against the low-dose series ``low`` into ``out``; returns the sidecar's path
    and the report.  Raises :class:`AuditInputError` (or :class:`AuditConfigError`) when they cannot be audited."""
    pairs = match_slices(_read_series(low), _read_series(denoised))
    if out.exists() and not out.is_dir():
        raise AuditInputError(f"{out}: exists and is not a folder")
    auditor = new_series_audit(out, config, figures=figures)
    for (_, low_hu, info), (ds, den_hu, _) in pairs:
        if low_hu.shape != den_hu.shape:
            raise AuditInputError(f"slice {info.instance}: shapes {low_hu.shape} and {den_hu.shape} differ")
        auditor.add(low_hu, den_hu, info.pixel_spacing_mm, info.instance, str(ds.get("SOPInstanceUID", "")))
    return auditor.write(), auditor.report()
