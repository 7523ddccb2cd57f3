"""ldct_tf.node: the DICOM node, driven by dcmtk's echoscu / storescu with storescp as the forward destination.

One node (the shipped model saved_models/ldct_denoiser, a calling-AE allow list, --store and --forward) serves the
whole module; every test sends its own new series and finds its derived instances at the destination by their
SourceImageSequence.  The last test stops the node with SIGTERM and checks its log for patient identifiers.
Settings-level behaviour (spool, tracker, argument errors) is tested in-process first, without dcmtk.
"""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pydicom
import pytest

from ldct_tf.node import __main__ as cli
from ldct_tf.audit import dicom_object
from ldct_tf.node.forward import Destination, parse_destination, sop_classes
from ldct_tf.node.spool import Spool, SpoolError
from ldct_tf.node.tracker import SeriesTracker
from ldct_tf.node.worker import derived_files
from tests.node.test_node_support import (FAKE_ACCESSION, FAKE_BIRTH, FAKE_ID, FAKE_NAME, Node, derived_of, echoscu,
                                     free_port, needs_dcmtk, storescp, storescu, wait_for, wait_for_derived,
                                     write_abdomen_series, write_ct_small_series)

#: every file this module sent to the shared node (the last test checks the log against their identifiers)
SENT: list = []
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
            "FrameOfReferenceUID", "StudyInstanceUID")

# ------------------------------------------------------------------------------------------------ no network


def test_parse_destination():
    assert parse_destination("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert parse_destination("A B@host.example:11112") == Destination("A B", "host.example", 11112)
    for bad in ("PACS@10.0.0.5", "10.0.0.5:104", "PACS@host:0", "PACS@host:70000", "SEVENTEEN_CHARS_AE@h:1"):
        with pytest.raises(ValueError, match="AET@HOST:PORT"):
            parse_destination(bad)


def test_spool_refuses_foreign_folder_and_second_node(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me\n")
    with pytest.raises(SpoolError, match="not a node spool"):
        Spool(tmp_path / "mine").open()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me\n"
    first = Spool(tmp_path / "spool").open()
    try:
        with pytest.raises(SpoolError, match="in use by another running node"):
            Spool(tmp_path / "spool").open()
    finally:
        first.close()
    Spool(tmp_path / "spool").open().close()  # free again once the first node is gone


def test_spool_recovery_and_tracker_rule(tmp_path):
    """Unacknowledged partial files go, acknowledged instances stay; a series is complete only once its association
    has ended and it was quiet for quiet_s; a claimed batch's half-written output is dropped on recovery."""
    now = [1000.0]
    spool = Spool(tmp_path / "spool").open()
    tracker = SeriesTracker(spool, quiet_s=5.0, clock=lambda: now[0])
    for i in range(3):
        tracker.receive(spool.write_instance(b"instance %d" % i), "series1", f"inst{i}", association=7)
    stray = spool.write_instance(b"half an instance")  # a receive that never got acknowledged
    now[0] += 60
    assert tracker.claim_ready() == []  # association 7 still open
    tracker.association_ended(7)
    now[0] += 4.9
    assert tracker.claim_ready() == []
    now[0] += 0.2
    [(series, batch, activity)] = tracker.claim_ready()
    assert series == "series1" and activity.instances == 3
    assert sorted(p.name for p in (spool.work / batch / "in").iterdir()) == ["inst0.dcm", "inst1.dcm", "inst2.dcm"]
    (spool.work / batch / "out.partial").mkdir()
    tracker.receive(spool.write_instance(b"late"), "series1", "inst9", association=8)  # after the claim: new folder
    spool.close()

    spool = Spool(tmp_path / "spool").open()
    series, batches = spool.recover()
    assert series == ["series1"] and batches == [batch]
    assert not stray.exists() and not (spool.work / batch / "out.partial").exists()
    assert spool.load_state(batch).instances == 3
    spool.close()


def test_derived_files_are_only_dicom(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "b.dcm").write_bytes(b"x")
    (tmp_path / "audit.json").write_text("{}")
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / dicom_object.OBJECT_NAME).write_bytes(b"x")
    assert derived_files(tmp_path) == [tmp_path / "a.dcm", tmp_path / "b.dcm",
                                       tmp_path / "audit" / dicom_object.OBJECT_NAME]  # the audit object last


def test_forward_proposes_the_sop_class_of_each_file(tmp_path):
    """CT images and the audit's Secondary Capture object go on one association: both classes are proposed."""
    [ct] = write_ct_small_series(tmp_path / "in", n=1)
    sc = tmp_path / "sc.dcm"
    ds = pydicom.dcmread(ct)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.save_as(sc, enforce_file_format=True)
    assert sop_classes([ct, sc, ct]) == [pydicom.uid.CTImageStorage, pydicom.uid.SecondaryCaptureImageStorage]
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    assert sop_classes([tmp_path / "junk.dcm"]) == [pydicom.uid.CTImageStorage]


@pytest.mark.parametrize("argv, message", [
    (["--port", "11112"], "pass --forward AET@HOST:PORT and/or --store DIR"),
    (["--forward", "PACS@host"], "expected AET@HOST:PORT"),
    (["--store", "x", "--retries", "0"], "--retries 0: must be at least 1"),
    (["--store", "x", "--ae-title", "MUCH_TOO_LONG_AE_TITLE"], "AE title has 1 to 16 characters"),
])
def test_bad_settings_fail_in_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldct_tf.node: error:") and message in err[0]
    assert not (tmp_path / cli.DEFAULT_SPOOL).exists()


def test_missing_model_fails_before_listening(tmp_path, capsys):
    assert cli.main(["--store", str(tmp_path / "store"), "--spool", str(tmp_path / "spool"), "--model",
                     str(tmp_path / "no_model")]) == 1
    assert "no exported model here" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing is created for a node that does not start


# ------------------------------------------------------------------------------------------------ one shared node

def audit_objects(destination, study: str) -> list[pydicom.Dataset]:
    """The Secondary Capture audit objects of ``study`` that reached ``destination``."""
    found = []
    for path in destination.iterdir():
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # storescp still writing it
            continue
        if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and str(ds.StudyInstanceUID) == study:
            found.append(ds)
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("node")
    dest_port, node_port = free_port(), free_port()
    with storescp(root / "destination", dest_port) as destination:
        node = Node(root, node_port, "--forward", f"DEST@127.0.0.1:{dest_port}", "--store", str(root / "store"),
                    "--quiet-time", "1", "--retry-delay", "1")
        node.start()
        try:
            yield node, destination, root
        finally:
            if node.proc.poll() is None:
                node.stop(signal.SIGKILL)


def check_derived(derived: list[pydicom.Dataset], sent: list) -> None:
    """Same count, one new series UID, geometry and patient/study tags kept, one source per derived instance."""
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): pydicom.dcmread(p) for p in sent}
    assert len(derived) == len(sent)
    [series_uid] = {str(ds.SeriesInstanceUID) for ds in derived}
    source_series = {str(ds.SeriesInstanceUID) for ds in sources.values()}
    assert series_uid not in source_series and pydicom.uid.UID(series_uid).is_valid
    assert len({str(ref.SourceImageSequence[0].ReferencedSOPInstanceUID) for ref in derived}) == len(sent)
    for ds in derived:
        src = sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        for keyword in GEOMETRY:
            assert ds.get(keyword) == src.get(keyword), keyword
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and "DERIVED" in ds.ImageType
        assert ds.PatientID == src.PatientID
        assert "ldct_denoiser" in ds.DerivationDescription
        assert not np.array_equal(ds.pixel_array, src.pixel_array)  # the model changed the image


@needs_dcmtk
def test_echo_and_association_rules(setup):
    node, _, _ = setup
    assert echoscu(node.port).returncode == 0
    refused = echoscu(node.port, calling="STRANGER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    wrong = echoscu(node.port, called="NOTLDCT")
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr


@needs_dcmtk
def test_non_ct_object_is_refused(setup, tmp_path):
    """MR, and Enhanced CT (the derived-series writer cannot write multi-frame objects back), are refused at
    negotiation: storescu reports no presentation context and nothing reaches the spool."""
    node, _, _ = setup
    from pydicom.data import get_testdata_file

    before = sorted(p.name for p in (node.spool / "incoming").iterdir())
    done = storescu(node.port, [get_testdata_file("MR_small.dcm")])  # storescu proposes all its storage classes
    assert done.returncode != 0 and "No presentation context for: (MR)" in done.stdout + done.stderr
    only = storescu(node.port, [get_testdata_file("MR_small.dcm")], "-R")  # propose only the MR context
    assert only.returncode != 0 and "No Acceptable Presentation Contexts" in only.stdout + only.stderr
    enhanced = get_testdata_file("eCT_Supplemental.dcm")  # from pydicom-data (the demo extra), where installed
    if enhanced is not None:
        done = storescu(node.port, [enhanced])
        assert done.returncode != 0 and "No presentation context for: (CTe)" in done.stdout + done.stderr, \
            done.stdout + done.stderr
    assert sorted(p.name for p in (node.spool / "incoming").iterdir()) == before


@needs_dcmtk
def test_ct_without_series_uid_is_refused_with_a_status(setup, tmp_path):
    """A CT object on the CT context but without a SeriesInstanceUID cannot be put into a series: the C-STORE is
    answered 0xA900 (dataset does not match SOP class) and nothing is kept."""
    node, _, _ = setup
    [path] = write_ct_small_series(tmp_path / "in", n=1)
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = ""
    ds.save_as(path, enforce_file_format=True)
    SENT.append(path)
    before = sorted(p.name for p in (node.spool / "incoming").iterdir())
    done = storescu(node.port, [path], "-v")
    assert done.returncode != 0 and "Error: DataSetDoesNotMatchSOPClass" in done.stdout + done.stderr  # 0xA900
    assert sorted(p.name for p in (node.spool / "incoming").iterdir()) == before
    assert "refused: no SeriesInstanceUID" in node.text()


@needs_dcmtk
def test_ct_small_series_in_derived_series_out(setup, tmp_path):
    node, destination, root = setup
    sent = write_ct_small_series(tmp_path / "in", n=4)
    SENT.extend(sent)
    done = storescu(node.port, sent)
    assert done.returncode == 0, done.stdout + done.stderr
    derived = wait_for_derived(destination, sent, 120, node)
    check_derived(derived, sent)
    # the audit travels with the series: a Secondary Capture summary in the derived study, forwarded and stored
    study = str(derived[0].StudyInstanceUID)
    wait_for(lambda: len(audit_objects(destination, study)) > 0, 60, "the audit object at the destination",
             node.proc, node.log)
    [audit_object] = audit_objects(destination, study)
    assert audit_object.Manufacturer == "ldct_tf" and "ldct_denoiser" in audit_object.DerivationDescription
    assert audit_object.SeriesInstanceUID != derived[0].SeriesInstanceUID
    # --store got the same series and its audit object; the spool keeps nothing of a delivered series
    stored = [pydicom.dcmread(p) for p in (root / "store").rglob("*.dcm")]
    assert {str(ds.SOPInstanceUID) for ds in derived} <= {str(ds.SOPInstanceUID) for ds in stored}
    assert str(audit_object.SOPInstanceUID) in {str(ds.SOPInstanceUID) for ds in stored}
    assert re.search(r"audit flagged \d+ of 4 slice\(s\)", node.text())  # the flags are in the node's log
    time.sleep(0.5)
    assert list((node.spool / "work").iterdir()) == [] and list((node.spool / "failed").iterdir()) == []


@needs_dcmtk
def test_unusable_instances_are_kept_with_their_reason(setup, tmp_path):
    """A scout (ImageType LOCALIZER) inside a series: the other slices are denoised and delivered, the scout is kept
    in failed/<batch>-unused with the reason; a series of nothing but scouts fails at once (no retry can help)."""
    node, destination, _ = setup
    sent = write_ct_small_series(tmp_path / "in", n=4)
    scout = pydicom.dcmread(sent[3])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(sent[3], enforce_file_format=True)
    only_scouts = write_ct_small_series(tmp_path / "scouts", n=2)
    for path in only_scouts:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path, enforce_file_format=True)
    SENT.extend(sent + only_scouts)
    for files in (sent, only_scouts):
        done = storescu(node.port, files)
        assert done.returncode == 0, done.stdout + done.stderr
    derived = wait_for_derived(destination, sent[:3], 120, node)
    assert len(derived) == 3
    failed = node.spool / "failed"
    wait_for(lambda: len(list(failed.glob("*/state.json"))) >= 2, 60, "both failure records", node.proc, node.log)
    records = [json.loads(p.read_text()) for p in failed.glob("*/state.json")]
    unused = [r for r in records if r["failed_reason"].startswith("not denoised")]
    given_up = [r for r in records if "no usable CT slices" in r["failed_reason"]]
    assert len(unused) == 1 and unused[0]["instances"] == 1 and "localizer" in unused[0]["skipped"][0]
    assert len(given_up) == 1 and given_up[0]["attempts"] == 1 and given_up[0]["instances"] == 2
    assert sum(1 for _ in failed.glob("*/in/*.dcm")) == 3  # the scout and the two scouts, all kept


@pytest.mark.slow
@needs_dcmtk
def test_real_series_and_a_second_one_at_once(setup, shared_data, tmp_path):
    """The 20-slice JPEG 2000 abdomen series and a CT_small series from two associations at the same time: two
    derived series, each complete, neither mixed into the other."""
    node, destination, _ = setup
    abdomen = write_abdomen_series(shared_data, tmp_path / "abdomen")
    small = write_ct_small_series(tmp_path / "small", n=6)
    SENT.extend(abdomen + small)
    senders = [storescu(node.port, abdomen, wait=False), storescu(node.port, small, wait=False)]
    for sender in senders:
        output = sender.communicate(timeout=120)[0]
        assert sender.returncode == 0, output
    check_derived(wait_for_derived(destination, abdomen, 300, node), abdomen)
    check_derived(wait_for_derived(destination, small, 120, node), small)
    got = derived_of(destination, abdomen)
    assert got[0].file_meta.TransferSyntaxUID in (pydicom.uid.ExplicitVRLittleEndian,
                                                  pydicom.uid.ImplicitVRLittleEndian)
    assert (got[0].Rows, got[0].Columns) == (512, 512)


@pytest.mark.slow
@needs_dcmtk
def test_node_through_tf_serving(tmp_path):
    """--server: the same node with the shipped model behind TF Serving's REST API (the tests' loopback server)."""
    from ldct_tf.testing.model_server import serve
    from tests.node.test_node_support import REPO

    sent = write_ct_small_series(tmp_path / "in", n=3)
    with serve(REPO / "saved_models", "ldct_denoiser") as (rest_url, _):
        node = Node(tmp_path, free_port(), "--server", rest_url, "--store", str(tmp_path / "store"),
                    "--quiet-time", "0.5").start()
        try:
            done = storescu(node.port, sent)
            assert done.returncode == 0, done.stdout + done.stderr
            # a stored series appears by a rename of its hidden partial folder: complete once visible
            wait_for(lambda: len(list((tmp_path / "store").glob("[!.]*/*.dcm"))) == 3, 120, "3 stored slices",
                     node.proc, node.log)
        finally:
            assert node.stop() == 0
    derived = [pydicom.dcmread(p) for p in (tmp_path / "store").glob("[!.]*/*.dcm")]
    check_derived(derived, sent)
    assert all("via TF Serving" in ds.DerivationDescription for ds in derived)
    assert "via TF Serving" in node.text()


@needs_dcmtk
def test_sigterm_stops_cleanly_and_logs_carry_no_identifiers(setup):
    """Runs last: SIGTERM ends the node with status 0; nothing it logged or named holds the patient attributes or
    UIDs of what it received."""
    node, destination, root = setup
    assert node.stop(signal.SIGTERM, timeout=60) == 0
    log = node.text()
    assert "SIGTERM received" in log and log.rstrip().endswith("stopped")
    assert "batch" in log and "forwarded" in log  # the node did log the series it handled
    sent_uids = set()
    for path in SENT:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sent_uids |= {str(v) for v in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) if v}
    assert sent_uids  # the series sent by this module were found
    names = " ".join(str(p) for p in node.spool.rglob("*")) + " ".join(str(p) for p in (root / "store").rglob("*"))
    for secret in (FAKE_NAME, FAKE_ID, FAKE_BIRTH, FAKE_ACCESSION, "NODE^", *sent_uids):
        assert secret not in log, secret
        assert secret not in names, secret
    state_files = list(node.spool.rglob("state.json"))
    for path in state_files:
        text = json.dumps(json.loads(path.read_text()))
        assert FAKE_ID not in text and FAKE_NAME not in text


@needs_dcmtk
def test_worker_forwards_the_audit_object_and_logs_flags(tmp_path, caplog):
    """In-process (no TensorFlow: a blurring numpy denoiser, which the audit flags): the worker logs the flags, and
    storescp receives the CT series and then its audit object, a valid Secondary Capture in the same study."""
    from scipy import ndimage

    from ldct_tf import denoise
    from ldct_tf.node.worker import SeriesWorker, WorkerOptions
    from tests.node.test_node_support import free_port as port_for

    sent = write_ct_small_series(tmp_path / "in", n=3)
    now = [1000.0]
    spool = Spool(tmp_path / "spool").open()
    tracker = SeriesTracker(spool, quiet_s=1.0, clock=lambda: now[0])
    for i, path in enumerate(sent):
        tracker.receive(spool.write_instance(path.read_bytes()), "series1", f"inst{i}", association=1)
    tracker.association_ended(1)
    now[0] += 5
    [(_, batch, _)] = tracker.claim_ready()
    port = port_for()
    blur = lambda hu: ndimage.uniform_filter(hu, size=(1, 9, 9)).astype(np.float32)  # noqa: E731
    with storescp(tmp_path / "destination", port) as destination:
        worker = SeriesWorker(spool, tracker, blur, denoise.ModelInfo("blur", "1", "numpy"),
                              WorkerOptions(ae_title="LDCT", forward=Destination("DEST", "127.0.0.1", port),
                                            store=tmp_path / "store"))
        with caplog.at_level("INFO", logger="ldct_tf.node"):
            worker.process(batch)
        derived = derived_of(destination, sent)
        assert len(derived) == 3
        [audit_object] = audit_objects(destination, str(derived[0].StudyInstanceUID))
    spool.close()
    assert audit_object.ImageType == ["DERIVED", "SECONDARY"] and audit_object.ReferencedImageSequence
    assert list((tmp_path / "store").rglob(dicom_object.OBJECT_NAME))
    assert re.search(r"audit flagged 3 of 3 slice\(s\), \d+ patch\(es\).*flagged instance number\(s\) 1, 2, 3",
                     caplog.text)
    assert FAKE_ID not in caplog.text and FAKE_NAME not in caplog.text
