"""The node's DICOM service side: a Storage SCP for CT Image Storage plus Verification (C-ECHO), on pynetdicom.

What is accepted, and why:

- Abstract syntaxes: CT Image Storage and Verification only.  Enhanced / Legacy Enhanced CT are *not* offered:
  ``ldct_tf.dicom.read_ct_dataset`` cannot write a multi-frame object back, so accepting one would acknowledge data
  the node can never deliver.  A presentation context for any other SOP class is rejected at negotiation ("abstract
  syntax not supported", PS3.8 9.3.3.2), which is how storage SCUs learn not to send it; a C-STORE that still
  arrives with another SOP class is answered 0x0122 (SOP class not supported).
- Transfer syntaxes: every one whose pixel data the installed pydicom plugins can decode (asked from pydicom at
  start), so that a scanner's JPEG 2000 / JPEG-LS / JPEG lossless series is stored exactly as it was sent.
- Calling AE titles and addresses: those of ``--allow-aet`` / ``--allow-host`` (others are rejected at association
  time, see :mod:`ldct_tf.node.security`); the called AE title must be the node's own.
- Slice size: a slice of more than ``max_slice_size`` rows or columns is refused (0xA900 with an error comment), since
  its decoded pixels would be held in memory several times over while denoising.
- Timeouts: a connection must send its A-ASSOCIATE request within ``acse_timeout`` and an established association
  that stays silent for ``network_timeout`` is aborted, so idle TCP connections cannot hold every association slot.

A C-STORE is acknowledged (0x0000) only after the instance is fsync'ed in the spool; a spool that cannot be
written answers 0xA700 (out of resources) so that the sender keeps the instance and retries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import pydicom.uid
from pydicom.pixels import get_decoder
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from ldct_tf.node.security import REJECT_PERMANENT, SOURCE_SERVICE_USER, AccessRules
from ldct_tf.node.spool import Spool
from ldct_tf.node.tracker import SeriesTracker

log = logging.getLogger("ldct_tf.node")

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

#: rows or columns; CT is 512 (sometimes 768 or 1024); 5000x5000 would need about 9 GB while denoising
DEFAULT_MAX_SLICE_SIZE = 2048

UNCOMPRESSED = [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
                pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian]


def decodable_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes first (preferred), then every compressed one pydicom can decode here."""
    out = list(UNCOMPRESSED)
    for syntax in pydicom.uid.AllTransferSyntaxes:
        if syntax in out or not syntax.is_compressed:
            continue
        try:
            if get_decoder(syntax).is_available:
                out.append(syntax)
        except NotImplementedError:
            continue
    return out


class StorageHandlers:
    """The event handlers bound to every association: C-STORE into the spool, association end into the tracker."""

    def __init__(self, spool: Spool, tracker: SeriesTracker, rules: AccessRules = AccessRules(),
                 max_slice_size: int = DEFAULT_MAX_SLICE_SIZE):
        self.spool, self.tracker = spool, tracker
        self.rules, self.max_slice_size = rules, max_slice_size

    def on_requested(self, event) -> None:
        """Reject a peer not on the allow-lists before anything is negotiated."""
        requestor = event.assoc.requestor
        refusal = self.rules.refusal(requestor.primitive.calling_ae_title, requestor.address)
        if refusal is not None:
            diagnostic, reason = refusal
            log.warning("association from %s@%s rejected: %s", requestor.primitive.calling_ae_title.strip(),
                        requestor.address, reason)
            event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
            event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL send the A-ASSOCIATE-RJ first

    def _too_large(self, ds) -> Optional[Dataset]:
        """The refusal status of a slice larger than the node accepts (None: size fine)."""
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if max(rows, columns) <= self.max_slice_size:
            return None
        status = Dataset()
        status.Status = DATASET_DOES_NOT_MATCH
        status.ErrorComment = f"slice {rows}x{columns} over the node's limit {self.max_slice_size}"[:64]
        return status

    def on_store(self, event) -> int | Dataset:
        if event.context.abstract_syntax != CTImageStorage:
            return SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset
            series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID", "") or "").strip()
            sop_class = str(ds.get("SOPClassUID", "") or "").strip()
            too_large = self._too_large(ds)
        except Exception as exc:  # a dataset pydicom cannot parse
            log.warning("C-STORE from %s refused: cannot parse the dataset (%s)", _peer(event), type(exc).__name__)
            return CANNOT_UNDERSTAND
        if sop_class and sop_class != CTImageStorage:
            log.warning("C-STORE from %s refused: SOP class %s sent on a CT Image Storage context", _peer(event),
                        pydicom.uid.UID(sop_class).name)
            return DATASET_DOES_NOT_MATCH
        if not series_uid or not sop_uid:
            log.warning("C-STORE from %s refused: no SeriesInstanceUID or SOPInstanceUID", _peer(event))
            return DATASET_DOES_NOT_MATCH
        if too_large is not None:
            log.warning("C-STORE from %s refused: %s (--max-slice-size)", _peer(event), too_large.ErrorComment)
            return too_large
        tmp = None
        try:
            tmp = self.spool.write_instance(event.encoded_dataset(include_meta=True))
            self.tracker.receive(tmp, self.spool.key(series_uid), self.spool.key(sop_uid, 24), id(event.assoc))
        except OSError as exc:
            if tmp is not None:
                self.spool.discard(tmp)
            log.error("C-STORE from %s not stored: spool write failed (%s)", _peer(event), exc.strerror or exc)
            return OUT_OF_RESOURCES
        return SUCCESS

    def on_echo(self, event) -> int:
        return SUCCESS

    def on_established(self, event) -> None:
        log.info("association from %s established", _peer(event))

    def on_end(self, event) -> None:
        self.tracker.association_ended(id(event.assoc))

    def handlers(self) -> list:
        return [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_C_STORE, self.on_store),
                (evt.EVT_C_ECHO, self.on_echo), (evt.EVT_ESTABLISHED, self.on_established),
                (evt.EVT_RELEASED, self.on_end), (evt.EVT_ABORTED, self.on_end), (evt.EVT_CONN_CLOSE, self.on_end)]


def _peer(event) -> str:
    """Calling AE title and address: what an operator needs to find the sender; no patient data."""
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


@dataclass(frozen=True)
class Timeouts:
    """Seconds; see the module docstring.  ``acse``: connect -> A-ASSOCIATE request (and the answers to the node's
    own requests); ``dimse``: waiting for the rest of a DIMSE message; ``network``: an established association's
    silence before it is aborted (kept above a scanner's pause between slices)."""

    acse: float = 10.0
    dimse: float = 30.0
    network: float = 60.0


def build_ae(ae_title: str, allowed_calling: Optional[Sequence[str]] = None, timeouts: Timeouts = Timeouts(),
             max_associations: int = 10) -> AE:
    """The node's application entity (not yet listening); see the module docstring for what it accepts."""
    ae = AE(ae_title=ae_title)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(CTImageStorage, syntaxes)
    ae.add_supported_context(Verification, [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    ae.require_called_aet = True
    if allowed_calling:
        ae.require_calling_aet = list(allowed_calling)
    # an association idle this long is aborted, so a sender that hangs cannot keep its series from completing
    ae.network_timeout = timeouts.network
    ae.acse_timeout, ae.dimse_timeout = timeouts.acse, timeouts.dimse
    ae.maximum_associations = max_associations
    return ae
