"""Send a derived series to the forward destination by C-STORE (the node acting as a Storage SCU).

The derived files are uncompressed (``ldct_tf.dicom.derived_dataset`` writes Explicit or Implicit VR Little
Endian), and so is the audit's Secondary Capture object; the node proposes each file's SOP class with both
uncompressed syntaxes and lets pynetdicom convert between them: any storage SCP
accepts one of the two.  One association per series; any instance the destination does not accept fails the whole
attempt (the worker retries it later, sending every instance again: the SOP Instance UIDs stay the same, so a
destination simply replaces what it already has).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ldct_tf.errors import LdctError

#: C-STORE statuses that mean "stored" (PS3.4 B.2.3: success and the three warnings, which still store the object).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class ForwardError(LdctError):
    """The destination could not be reached or did not store every instance (retried later)."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def parse_destination(text: str) -> Destination:
    """``AET@HOST:PORT`` -> :class:`Destination`; raises ValueError saying what is wrong."""
    match = _DESTINATION.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536 or not match["aet"].strip():
        raise ValueError(f"--forward {text!r}: expected AET@HOST:PORT (AE title of at most 16 characters, "
                         f"e.g. PACS@10.0.0.5:104)")
    return Destination(match["aet"].strip(), match["host"].strip("[]"), int(match["port"]))


def sop_classes(files: Sequence[Path]) -> list[str]:
    """The storage SOP classes to propose: those of ``files`` (CT images and the audit's Secondary Capture), read from
    their file meta; CT alone when none can be read (the send then reports the unreadable file)."""
    found = []
    for path in files:
        try:
            uid = str(read_file_meta_info(path).get("MediaStorageSOPClassUID", ""))
        except (OSError, ValueError, AttributeError, InvalidDicomError):
            continue
        if uid and uid not in found:
            found.append(uid)
    return found or [CTImageStorage]


def send_series(files: Sequence[Path], destination: Destination, calling_ae_title: str,
                timeout_s: float = 60.0, tls: Optional[ssl.SSLContext] = None) -> int:
    """C-STORE every file to ``destination`` (over TLS with ``tls``, checking the destination's certificate against
    its host name); returns how many were stored, raises :class:`ForwardError`."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sop_classes(files):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (tls, destination.host) if tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
        raise ForwardError(f"destination {destination} {what}")
    stored, problems = 0, []
    try:
        for path in files:
            try:
                status = assoc.send_c_store(path)
            except (ValueError, AttributeError, OSError) as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in STORED:
                stored += 1
            else:
                problems.append(f"{path.name}: " + ("no response (connection lost)" if code == -1
                                                    else f"status 0x{code:04X}"))
                if not assoc.is_established:
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    if problems:
        raise ForwardError(f"destination {destination} stored {stored} of {len(files)} instance(s); first problem: "
                           f"{problems[0]}")
    return stored
