"""Helpers (no tests here) for tests/node/test_node.py and tests/node/test_node_recovery.py: series written for sending, the
node and dcmtk's tools as processes on 127.0.0.1.

The clients are Debian's dcmtk (echoscu, storescu, storescp): real DICOM implementations nobody here wrote, so a
test passing means the node speaks DICOM as others do, not just as pynetdicom does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "saved_models" / "ldct_denoiser"
DCMTK = all(shutil.which(tool) for tool in ("echoscu", "storescu", "storescp"))
# Skipped without dcmtk on a developer's machine, failed in CI (CI=true), where .ci/run installs it.
needs_dcmtk = pytest.mark.skipif(not DCMTK and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
                                 reason="dcmtk (echoscu, storescu, storescp) not installed: apt-get install dcmtk")
CALLING = "NODETEST"  # the calling AE title the tests' node allows
FAKE_NAME, FAKE_ID, FAKE_BIRTH, FAKE_ACCESSION = "NODE^TESTPATIENT", "PID-NODE-4711", "19370412", "ACC-NODE-0815"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _identify(ds: pydicom.Dataset, study: str, series: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = FAKE_NAME, FAKE_ID, FAKE_BIRTH, \
        FAKE_ACCESSION
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series


def write_ct_small_series(folder: Path, n: int = 4) -> list[Path]:
    """``n`` slices of pydicom's bundled CT_small.dcm (128x128), one new series, each slice shifted in z and rolled
    (so that slices differ), with fake patient identifiers that must never reach a log."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = source.copy()
        _identify(ds, study, series)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 5.0 * i]
        ds.SliceLocation = -75.7 + 5.0 * i
        ds.PixelData = np.roll(source.pixel_array, 5 * i, axis=1).astype(source.pixel_array.dtype).tobytes()
        path = folder / f"slice{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_abdomen_series(shared_data: Path, folder: Path) -> list[Path]:
    """The 20 real JPEG 2000 abdomen slices as a scanner would send them: the shared copies have blank SOP Class,
    SOP Instance, Study and Series UIDs (no SCU can send an object without a SOP class), so they are filled in (from
    the file meta / new UIDs); the pixel data stays JPEG 2000 as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for source in sorted(p for p in (shared_data / "abdomen_series" / "dicom").iterdir() if p.is_file()):
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        _identify(ds, study, series)
        path = folder / f"{len(paths):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, files: list[Path], *extra: str, calling: str = CALLING, wait: bool = True):
    """Send files with dcmtk's storescu (JPEG 2000 lossless proposed too, as a scanner with such files would)."""
    command = ["storescu", "-xv", "-aet", calling, "-aec", "LDCT", *extra, "127.0.0.1", str(port),
               *map(str, files)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def echoscu(port: int, calling: str = CALLING, called: str = "LDCT") -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, proc: Optional[subprocess.Popen] = None,
             log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}\n{tail}")


class Node:
    """``python -m ldct_tf.node`` as a child process, logging to ``log``; the shipped model unless ``--server``."""

    def __init__(self, root: Path, port: int, *args: str):
        self.root, self.port, self.args = root, port, args
        self.spool = root / "spool"
        self.log = root / f"node-{port}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180.0) -> "Node":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   TF_CPP_MIN_LOG_LEVEL="2")
        model = [] if "--server" in self.args else ["--model", str(MODEL)]
        command = [sys.executable, "-m", "ldct_tf.node", "--ae-title", "LDCT", "--port", str(self.port),
                   "--host", "127.0.0.1", *model, "--spool", str(self.spool), "--allow-aet", CALLING, *self.args]
        with open(self.log, "a") as handle:
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=self.root)
        wait_for(lambda: echoscu(self.port).returncode == 0, timeout, "the node to answer C-ECHO", self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def text(self) -> str:
        return self.log.read_text()


@contextmanager
def storescp(folder: Path, port: int) -> Iterator[Path]:
    """dcmtk's storescp as the forward destination, storing into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: echoscu(port, called="DEST").returncode == 0, 30, "storescp to listen", proc)
        yield folder
    finally:
        proc.terminate()
        proc.wait(10)


def derived_of(destination: Path, sent: list[Path]) -> list[pydicom.Dataset]:
    """The objects in ``destination`` derived from the files in ``sent`` (by their SourceImageSequence)."""
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
    found = []
    for path in sorted(p for p in destination.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # storescp still writing it
            continue
        refs = ds.get("SourceImageSequence") or []
        if refs and str(refs[0].ReferencedSOPInstanceUID) in sources:
            found.append(ds)
    return found


def wait_for_derived(destination: Path, sent: list[Path], timeout: float, node: Node) -> list[pydicom.Dataset]:
    result: list[pydicom.Dataset] = []

    def complete() -> bool:
        result[:] = derived_of(destination, sent)
        return len(result) >= len(sent)

    wait_for(complete, timeout, f"{len(sent)} derived instance(s) at the destination", node.proc, node.log)
    return result


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (its own CA) and its unencrypted key, as PEM files:
    ``(cert, key)``.  Made with the ``cryptography`` package (a dependency of the TLS stack it is installed beside)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
