"""Say, in the standard places of a derived CT image, that an AI model made it, which one, and that it is for research.

Why: a denoised series sits in PACS next to the original; a reader (or a later program) must be able to tell which
images a network produced and which network, without a side channel.  PS3.3 puts this in:

- Derivation Description (0008,2111): the human-readable derivation; APPENDED to the source's own (a source that was
  itself derived, e.g. "lossy compressed", keeps that history);
- Contributing Equipment Sequence (0018,A001): one item per device that processed the data; ours has purpose
  "Processing Equipment" (DCM 109102, CID 7005), the model's name and version in Manufacturer's Model Name and
  Software Versions, and a Contribution Description;
- Image Comments (0020,4000): the research-use statement, appended to any existing comment, where viewers show it.

The denoising strength used (0 = the input unchanged, 1 = the full network output; ``ldct_tf.saved_model``) is
written as ``strength S`` (:func:`strength_text`) in both the Derivation Description and the Contribution Description,
beside the model's name and version, so a reader can tell a "low" from a "high" series.

The text never names the patient: it comes from the model's name and version and this package's version only.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

from pydicom.dataset import Dataset

RESEARCH_USE = "FOR RESEARCH USE ONLY, NOT FOR DIAGNOSIS: denoised by an AI model (ldct_tf)"
PROCESSING_EQUIPMENT_CODE = ("109102", "DCM", "Processing Equipment")
_ST_MAX, _LT_MAX, _LO_MAX = 1024, 10240, 64


@dataclass(frozen=True)
class AIModel:
    """The network that produced a derived series."""

    name: str
    version: str
    software_version: str  # of ldct_tf
    where: str = "SavedModel"  # how it was run: SavedModel or TF Serving
    strength: Optional[float] = None  # None: the model's default, value not known here (a TF Serving model)

    def derivation_text(self) -> str:
        return (f"Denoised by AI model {self.name} version {self.version} (ldct_tf {self.software_version}, "
                f"denoising network, via {self.where}, {strength_text(self.strength)}; its model card says how it "
                f"was trained); {RESEARCH_USE}")


def strength_text(strength: Optional[float]) -> str:
    """``strength 0.5 (0 = input unchanged, 1 = full network output)``: how the derived files record the strength."""
    value = "the model's default" if strength is None else f"{strength:g}"
    return f"strength {value} (0 = input unchanged, 1 = full network output)"


def append_text(existing: Optional[str], addition: str, limit: int, separator: str = "; ") -> str:
    """``existing + separator + addition`` within ``limit`` characters: ``addition`` is kept whole, the existing text
    is shortened (with "...") when both do not fit."""
    existing = (existing or "").strip()
    if not existing:
        return addition[:limit]
    if addition in existing:  # already marked (re-processing a derived series)
        return existing[-limit:]
    room = limit - len(addition) - len(separator)
    if room <= 3:
        return addition[:limit]
    if len(existing) > room:
        existing = existing[:room - 3] + "..."
    return existing + separator + addition


def _code(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def mark(ds: Dataset, derivation_description: str, model: Optional[AIModel] = None) -> Dataset:
    """Append the derivation and (with ``model``) the AI equipment item and the research-use comment to ``ds``."""
    ds.DerivationDescription = append_text(ds.get("DerivationDescription"), derivation_description, _ST_MAX)
    if model is None:
        return ds
    item = Dataset()
    item.Manufacturer = "ldct_tf"
    item.ManufacturerModelName = model.name[:_LO_MAX]
    item.SoftwareVersions = [f"model {model.name} v{model.version}"[:_LO_MAX],
                             f"ldct_tf {model.software_version}"[:_LO_MAX]]
    item.ContributionDateTime = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = model.derivation_text()[:_ST_MAX]
    item.PurposeOfReferenceCodeSequence = [_code(PROCESSING_EQUIPMENT_CODE)]
    ds.ContributingEquipmentSequence = [*ds.get("ContributingEquipmentSequence", []), item]
    ds.ImageComments = append_text(ds.get("ImageComments"), RESEARCH_USE, _LT_MAX)
    return ds
