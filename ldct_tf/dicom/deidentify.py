"""De-identify a derived CT object under the DICOM PS3.15 Basic Application Level Confidentiality Profile.

Why it is here: ``python -m ldct_tf.denoise --deidentify`` lets a site hand a denoised series to a research partner
without the patient's identity.  It is applied to the *derived* dataset only (never to the source), before the AI
marking (``ldct_tf.dicom.ai_marking``) is added, so the marking, which names no person, survives.

What :class:`Deidentifier` does, per attribute of Table E.1-1 (``ldct_tf.dicom.deid_profile``), recursively into sequences:

- X: removed.  Z: emptied (zero length), except Patient's Name and Patient ID, which get a pseudonym that is the same
  for the same patient throughout the run (``PSEUDO-`` + 12 hex digits of a keyed SHA-256 of the original ID).
- D: a dummy value of the attribute's VR (``ANONYMOUS``, 19000101, 0 ...).
- U: a new UID, the same new UID for the same original UID throughout the run (so a de-identified series keeps its
  study, frame of reference and source-image references together).  Well-known UIDs (SOP classes, transfer syntaxes)
  are never mapped.
- Every private attribute, every public attribute the dictionary does not know (nobody can say it is harmless) and
  the whole curve/overlay repeating groups are removed.
- Then: Patient Identity Removed = YES, De-identification Method (text) and its Code Sequence (DCM 113100, "Basic
  Application Confidentiality Profile"), and a Contributing Equipment item for the de-identifying equipment (DCM
  109104).

No option of the profile (retain dates, UIDs, device or institution identity, patient characteristics) is applied:
this is the plain basic profile.  Burned-in text is not a risk for CT slices from a scanner's reconstruction
(BurnedInAnnotation is kept as the source says; a source that says YES is refused).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from ldct_tf.dicom.deid_profile import REPEATING_GROUPS, basic_profile
from ldct_tf.errors import LdctError

PROFILE = basic_profile()
#: Attributes whose Z is filled with the run's pseudonym instead of an empty value.
PSEUDONYMISED = {0x00100010: "PatientName", 0x00100020: "PatientID"}
#: (code value, scheme, meaning) of DCM codes used here (PS3.16 CID 7050 and CID 7005).
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
DEIDENTIFYING_EQUIPMENT_CODE = ("109104", "DCM", "De-identifying Equipment")
METHOD_TEXT = "PS3.15 Basic Application Confidentiality Profile (ldct_tf)"  # LO: <= 64
#: Sequences the profile marks X/Z/U*: kept, with the UIDs inside them remapped (the derived image's own references).
KEEP_WITH_NEW_UIDS = {0x00082112, 0x00081140}  # SourceImageSequence, ReferencedImageSequence

_DUMMY_BY_VR = {
    "PN": "ANONYMOUS", "LO": "ANONYMOUS", "SH": "ANONYMOUS", "CS": "ANONYMOUS", "LT": "ANONYMOUS",
    "ST": "ANONYMOUS", "UT": "ANONYMOUS", "UC": "ANONYMOUS", "AE": "ANONYMOUS", "DA": "19000101",
    "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0",
}


class RefusedForDeidentification(LdctError, ValueError):
    """The object cannot be de-identified by this module (e.g. it says that text is burned into the pixels)."""


def code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def resolve_action(tag: int, action: str) -> str:
    """One action for a combined one such as ``X/Z`` (PS3.15 E.1.1: the stricter unless the IOD requires the
    attribute): the kept sequences of :data:`KEEP_WITH_NEW_UIDS` -> U; Z/D (Content Date/Time, type 2 in a CT image)
    -> Z; anything else with an X in it -> X."""
    if "/" not in action:
        return action
    if tag in KEEP_WITH_NEW_UIDS:
        return "U"
    if action == "Z/D":
        return "Z"
    return "X" if "X" in action else action.split("/")[0]


class Deidentifier:
    """Applies the basic profile to datasets, with pseudonyms and UID mappings consistent across every call.

    ``salt`` keys the pseudonyms: the same salt gives the same pseudonym for the same patient in another run (keep it
    secret, as it can confirm a guessed identity); None draws a random one, so the run's pseudonyms link nothing
    outside it.
    """

    def __init__(self, salt: Optional[str] = None):
        self._key = (salt if salt is not None else secrets.token_hex(16)).encode()
        self.uid_map: dict[str, str] = {}
        self.pseudonyms: dict[str, str] = {}

    # --------------------------------------------------------------------------------------------------- mappings
    def pseudonym(self, patient_id: str) -> str:
        if patient_id not in self.pseudonyms:
            digest = hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()
            self.pseudonyms[patient_id] = f"PSEUDO-{digest[:12].upper()}"
        return self.pseudonyms[patient_id]

    def new_uid(self, uid: str) -> str:
        uid = str(uid).strip()
        if not uid or uid in UID_dictionary:  # empty, or a well-known (class, syntax) UID: not an identifier
            return uid
        if uid not in self.uid_map:
            digest = hmac.new(self._key, b"uid:" + uid.encode(), hashlib.sha256).digest()
            self.uid_map[uid] = "2.25." + str(int.from_bytes(digest[:16], "big"))
        return self.uid_map[uid]

    # --------------------------------------------------------------------------------------------------- apply
    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (pass a copy you own) and return it."""
        if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
            raise RefusedForDeidentification("BurnedInAnnotation is YES: text in the pixels cannot be removed here")
        patient_id = str(ds.get("PatientID", "") or "")
        self._clean(ds, patient_id)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD_TEXT
        ds.DeidentificationMethodCodeSequence = [code_item(BASIC_PROFILE_CODE)]
        equipment = Dataset()
        equipment.Manufacturer = "ldct_tf"
        equipment.ManufacturerModelName = "ldct_tf.dicom.deidentify"
        equipment.ContributionDescription = METHOD_TEXT
        equipment.PurposeOfReferenceCodeSequence = [code_item(DEIDENTIFYING_EQUIPMENT_CODE)]
        ds.ContributingEquipmentSequence = [*ds.get("ContributingEquipmentSequence", []), equipment]
        if hasattr(ds, "file_meta") and "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = self.new_uid(ds.file_meta.MediaStorageSOPInstanceUID)
        return ds

    def _clean(self, ds: Dataset, patient_id: str) -> None:
        for element in list(ds):
            tag = int(element.tag)
            if element.tag.is_private or _in_repeating_group(tag) or not element.keyword:
                del ds[element.tag]  # private, overlay/curve, or a public tag nobody can say is harmless
                continue
            action = PROFILE.get(tag)
            if action is None:
                if element.VR == "SQ":
                    for item in element.value or []:
                        self._clean(item, patient_id)
                elif element.VR == "UI" and _is_instance_uid_keyword(element.keyword):
                    element.value = self._remap(element.value)
                continue
            action = resolve_action(tag, action)
            if action == "X":
                del ds[element.tag]
            elif tag in PSEUDONYMISED:
                element.value = self.pseudonym(patient_id)
            elif action == "Z":
                element.value = [] if element.VR == "SQ" else None
            elif action == "D":
                element.value = _dummy(element)
            elif action == "U":
                if element.VR == "SQ":
                    for item in element.value or []:
                        self._clean(item, patient_id)
                elif element.VR == "UI":
                    element.value = self._remap(element.value)
                else:  # an identifier that is not a UID: treat as D
                    element.value = _dummy(element)

    def _remap(self, value):
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            return [self.new_uid(v) for v in value]
        return self.new_uid(value) if value else value


def _in_repeating_group(tag: int) -> bool:
    group, elem = tag >> 16, tag & 0xFFFF
    return any((group & mask) == value and (element is None or elem == element)
               for mask, value, element in REPEATING_GROUPS)


def _is_instance_uid_keyword(keyword: str) -> bool:
    """UI attributes that are not in Table E.1-1 but still name instances (new ones appear in each edition)."""
    return keyword.endswith("InstanceUID") and not keyword.endswith("ClassUID")


def _dummy(element):
    vr = element.VR
    if vr == "SQ":
        return []
    if vr in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[vr]
    if vr == "UI":
        return str(pydicom.uid.generate_uid())
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    return None  # binary VRs (OB, OW, UN...): empty
