"""ldct_tf.node's defences: who may connect (allow-lists, loopback by default), TLS (server and forward, with dcmtk's
echoscu / storescu / storescp on 127.0.0.1 and self-signed certificates made here), idle-connection timeouts and the
maximum slice size.

The node's SCP runs in-process here (the same ``build_ae`` + ``StorageHandlers`` the command starts, without loading
a model), so these tests take seconds; the command's own wiring of the options is checked by its refusals.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from ldct_tf.node import __main__ as cli
from ldct_tf.node.forward import Destination, ForwardError, send_series
from ldct_tf.node.scp import DATASET_DOES_NOT_MATCH, StorageHandlers, Timeouts, build_ae
from ldct_tf.node.security import AccessRules, client_tls_context, parse_networks, server_tls_context
from ldct_tf.node.spool import Spool
from ldct_tf.node.tracker import SeriesTracker
from tests.node.test_node_support import (CALLING, free_port, make_certificate, needs_dcmtk, wait_for,
                                          write_ct_small_series)


@contextmanager
def scp(root: Path, rules: AccessRules = AccessRules(), tls=None, timeouts: Timeouts = Timeouts(),
        max_associations: int = 10, max_slice_size: int = 2048) -> Iterator[tuple[int, Spool]]:
    """The node's SCP on 127.0.0.1 with a spool under ``root`` (series never complete: nothing is denoised)."""
    spool = Spool(root / "spool").open()
    handlers = StorageHandlers(spool, SeriesTracker(spool, quiet_s=3600), rules, max_slice_size)
    ae = build_ae("LDCT", rules.calling_ae_titles, timeouts, max_associations)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers.handlers(), ssl_context=tls)
    try:
        yield port, spool
    finally:
        server.shutdown()
        spool.close()


def dcmtk(tool: str, port: int, *extra: str, calling: str = CALLING, files=()) -> subprocess.CompletedProcess:
    command = [tool, "-aet", calling, "-aec", "LDCT", *extra, "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    done.output = done.stdout + done.stderr  # type: ignore[attr-defined]
    return done


def received(spool: Spool) -> int:
    return sum(1 for _ in spool.incoming.glob("*/*.dcm"))


# ------------------------------------------------------------------------------------------------ who may connect

def test_listens_on_loopback_by_default():
    assert cli.build_parser().parse_args([]).host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "pacs.example"])
def test_beyond_loopback_without_allow_list_refuses_to_start(tmp_path, capsys, host):
    code = cli.main(["--host", host, "--store", str(tmp_path / "store"), "--spool", str(tmp_path / "spool"),
                     "--model", str(tmp_path / "no_model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"--host {host} listens beyond this machine" in err[0], err
    assert "--allow-aet" in err[0] and not (tmp_path / "spool").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-ca", "ca.pem"], "--tls-ca (client certificates) needs --tls-cert"),
    (["--forward-tls-ca", "ca.pem"], "--forward-tls-ca without --forward"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "--tls-cert/--tls-key missing.pem missing.key"),
    (["--allow-host", "10.0.0.300"], "--allow-host '10.0.0.300': not an IP address or network"),
    (["--acse-timeout", "0"], "--acse-timeout 0.0: must be at least 0.1"),
    (["--max-slice-size", "0"], "--max-slice-size 0: must be at least 1"),
])
def test_bad_security_settings_fail_in_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--store", "out", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldct_tf.node: error:") and message in err[0], err


def test_access_rules():
    rules = AccessRules(("CT1", "PACS"), tuple(parse_networks(["10.0.0.0/24", "127.0.0.1"])))
    assert rules.refusal("CT1", "10.0.0.7") is None and rules.refusal("PACS ", "127.0.0.1") is None
    assert rules.refusal("STRANGER", "10.0.0.7") == (0x03, "calling AE title not on --allow-aet")
    assert rules.refusal("CT1", "10.0.1.7") == (0x01, "address not on --allow-host")
    assert AccessRules().refusal("ANYONE", "192.0.2.1") is None  # no lists: only allowed on loopback


@needs_dcmtk
def test_unknown_calling_ae_and_address_are_rejected(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "ldct_tf.node")
    sent = write_ct_small_series(tmp_path / "in", n=2)
    with scp(tmp_path, AccessRules((CALLING,))) as (port, spool):
        assert dcmtk("echoscu", port).returncode == 0
        refused = dcmtk("echoscu", port, calling="STRANGER")
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.output
        stored = dcmtk("storescu", port, files=sent)  # plain TCP, an allowed calling AE: stored
        assert stored.returncode == 0 and received(spool) == 2, stored.output
        assert dcmtk("storescu", port, calling="STRANGER", files=sent).returncode != 0
        assert received(spool) == 2
    assert "association from STRANGER@127.0.0.1 rejected: calling AE title not on --allow-aet" in caplog.text
    with scp(tmp_path / "b", AccessRules((CALLING,), tuple(parse_networks(["10.0.0.0/8"])))) as (port, _):
        refused = dcmtk("echoscu", port)
        assert refused.returncode != 0 and "Association Rejected" in refused.output
    assert "rejected: address not on --allow-host" in caplog.text


# ------------------------------------------------------------------------------------------------ TLS

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    return {name: make_certificate(folder, name) for name in ("node", "client", "pacs")}


@needs_dcmtk
def test_tls_server_with_dcmtk_clients(tmp_path, certs):
    """With --tls-cert/--tls-key: echoscu and storescu over TLS (checking the node's certificate) work; a plain TCP
    client gets nothing."""
    node_cert, node_key = certs["node"]
    sent = write_ct_small_series(tmp_path / "in", n=2)
    with scp(tmp_path, AccessRules((CALLING,)), server_tls_context(str(node_cert), str(node_key))) as (port, spool):
        tls = ("--anonymous-tls", "+cf", str(node_cert))
        echo = dcmtk("echoscu", port, *tls)
        assert echo.returncode == 0, echo.output
        assert dcmtk("echoscu", port, "-to", "5").returncode != 0  # no TLS: refused
        stored = dcmtk("storescu", port, *tls, files=sent)
        assert stored.returncode == 0, stored.output
        assert received(spool) == 2
        wrong_ca = dcmtk("echoscu", port, "--anonymous-tls", "+cf", str(certs["pacs"][0]))
        assert wrong_ca.returncode != 0  # the node's certificate is not signed by that CA


@needs_dcmtk
def test_tls_client_certificates_required_with_tls_ca(tmp_path, certs):
    node_cert, node_key = certs["node"]
    client_cert, client_key = certs["client"]
    context = server_tls_context(str(node_cert), str(node_key), client_ca=str(client_cert))
    with scp(tmp_path, AccessRules((CALLING,)), context) as (port, _):
        anonymous = dcmtk("echoscu", port, "--anonymous-tls", "+cf", str(node_cert))
        assert anonymous.returncode != 0
        with_cert = dcmtk("echoscu", port, "+tls", str(client_key), str(client_cert), "-pw", "+cf", str(node_cert))
        assert with_cert.returncode == 0, with_cert.output


@contextmanager
def tls_storescp(folder: Path, port: int, cert: Path, key: Path, client_ca: Optional[Path]) -> Iterator[Path]:
    """dcmtk's storescp listening with TLS (requiring a client certificate signed by ``client_ca`` when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    peer = ["+cf", str(client_ca)] if client_ca else ["-ic"]
    proc = subprocess.Popen(["storescp", "-aet", "DEST", "+tls", str(key), str(cert), "-pw", *peer, "-od",
                             str(folder), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, 30, "storescp (TLS) to listen", proc)
        yield folder
    finally:
        proc.terminate()
        proc.wait(10)


@needs_dcmtk
def test_forward_over_tls_to_dcmtk_storescp(tmp_path, certs):
    """send_series with --forward-tls-ca (and the node's client certificate) delivers to a TLS storescp that
    requires client certificates; without TLS, or trusting another CA, it is refused (ForwardError)."""
    pacs_cert, pacs_key = certs["pacs"]
    node_cert, node_key = certs["node"]
    files = write_ct_small_series(tmp_path / "in", n=2)
    port = free_port()
    destination = Destination("DEST", "127.0.0.1", port)
    with tls_storescp(tmp_path / "dest", port, pacs_cert, pacs_key, client_ca=node_cert) as folder:
        tls = client_tls_context(str(pacs_cert), str(node_cert), str(node_key))
        assert send_series(files, destination, "LDCT", timeout_s=20, tls=tls) == 2
        assert len([p for p in folder.iterdir() if p.is_file()]) == 2
        with pytest.raises(ForwardError):
            send_series(files, destination, "LDCT", timeout_s=5)
        with pytest.raises(ForwardError):
            send_series(files, destination, "LDCT", timeout_s=5, tls=client_tls_context(str(certs["client"][0])))


# ------------------------------------------------------------------------------------------------ timeouts

def _echo(port: int, tls=None) -> bool:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="LDCT", tls_args=tls)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_idle_connections_time_out_and_free_their_slots(tmp_path):
    """Two raw TCP connections that never speak hold both slots of --max-associations 2 only until the ACSE timeout;
    then the node closes them and a real association gets in."""
    with scp(tmp_path, timeouts=Timeouts(acse=1.0), max_associations=2) as (port, _):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            time.sleep(0.3)
            assert not _echo(port)  # both slots held: "local limit exceeded"
            time.sleep(1.5)
            for sock in idle:
                sock.settimeout(5)
                assert sock.recv(1) == b""  # closed by the node
            assert _echo(port)
        finally:
            for sock in idle:
                sock.close()


def test_silent_client_does_not_stall_a_tls_server(tmp_path, certs):
    """A TLS server whose accept loop did the handshake would wait on a silent client forever, blocking everyone."""
    node_cert, node_key = certs["node"]
    context = server_tls_context(str(node_cert), str(node_key))
    with scp(tmp_path, tls=context, timeouts=Timeouts(acse=2.0)) as (port, _):
        silent = socket.create_connection(("127.0.0.1", port))
        try:
            time.sleep(0.3)
            started = time.monotonic()
            assert _echo(port, (client_tls_context(str(node_cert)), "127.0.0.1"))
            assert time.monotonic() - started < 4
        finally:
            silent.close()


def test_timeout_options_reach_the_application_entity():
    ae = build_ae("LDCT", (), Timeouts(acse=3.0, dimse=4.0, network=5.0))
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (3.0, 4.0, 5.0)
    args = cli.build_parser().parse_args(["--acse-timeout", "3", "--dimse-timeout", "4", "--network-timeout", "5"])
    assert (args.acse_timeout, args.dimse_timeout, args.network_timeout) == (3.0, 4.0, 5.0)


# ------------------------------------------------------------------------------------------------ slice size

def test_oversized_slice_is_refused_with_a_reason(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "ldct_tf.node")
    [path] = write_ct_small_series(tmp_path / "in", n=1)  # 128 x 128
    ds = pydicom.dcmread(path)
    with scp(tmp_path, max_slice_size=100) as (port, spool):
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="LDCT")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == DATASET_DOES_NOT_MATCH
        assert status.ErrorComment == "slice 128x128 over the node's limit 100"
        assert received(spool) == 0 and not any(spool.tmp.iterdir())
    assert "refused: slice 128x128 over the node's limit 100 (--max-slice-size)" in caplog.text
    assert str(ds.PatientID) not in caplog.text
    with scp(tmp_path / "b", max_slice_size=128) as (port, spool):  # at the limit: stored
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="LDCT")
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        assert received(spool) == 1
