"""The SCP's association socket: pynetdicom's `recv` contract, kept while reading faster."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from dicom_node.scp import PduSocket, start_scp

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes


def received_by(socket_class: type[AssociationSocket]) -> list[bytearray]:
    """What `recv` returns for a PDU-like read pattern while the peer sends in small pieces,
    then closes before the last read is complete."""
    sender, receiver = socket.socketpair()
    wrapped = socket_class(Association(AE(), "acceptor"), client_socket=receiver)

    def send() -> None:
        for start in range(0, len(PAYLOAD), 1000):
            sender.sendall(PAYLOAD[start:start + 1000])
        sender.close()
    thread = threading.Thread(target=send)
    thread.start()
    try:
        return [wrapped.recv(6), wrapped.recv(len(PAYLOAD) - 10), wrapped.recv(10)]
    finally:
        thread.join(10)
        receiver.close()


@pytest.mark.timeout(30)
def test_the_pdu_socket_returns_what_pynetdicoms_socket_returns():
    ours = received_by(PduSocket)
    assert ours == received_by(AssociationSocket)
    assert [bytes(part) for part in ours] == [PAYLOAD[:6], PAYLOAD[6:-4], b"tail"]  # the last one short: closed
    assert all(type(part) is bytearray for part in ours)


@pytest.mark.timeout(30)
def test_a_pdu_that_claims_4_gib_and_sends_10_bytes_costs_no_4_gib():
    import tracemalloc

    sender, receiver = socket.socketpair()
    wrapped = PduSocket(Association(AE(), "acceptor"), client_socket=receiver)
    sender.sendall(b"0123456789")
    sender.close()
    tracemalloc.start()
    try:
        got = wrapped.recv(1 << 32)  # what a PDU header's length may claim
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        receiver.close()
    assert bytes(got) == b"0123456789"
    assert peak <= PduSocket.FIRST_BUFFER + (1 << 20)  # grown as bytes arrive, not to the claimed length


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.1" + "0" * 36])
def test_the_file_meta_is_encoded_as_pynetdicom_encodes_it(sop_instance_uid):
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_node.scp import TRANSFER_SYNTAXES, file_meta_bytes

    for sop_class_uid in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.12.1"):  # even, odd
        for syntax in TRANSFER_SYNTAXES:
            expected = encode_file_meta(create_file_meta(
                sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID(sop_instance_uid), transfer_syntax=syntax))
            assert file_meta_bytes(sop_class_uid, sop_instance_uid, syntax) == expected, (sop_class_uid, syntax)


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", None])
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xB007])
def test_a_store_response_is_encoded_as_pynetdicom_encodes_it(sop_instance_uid, status):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.scp import store_response_command

    for sop_class_uid in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.12.1", None):  # even, odd, none
        for message_id in (1, 65535):
            response = C_STORE()
            response.MessageIDBeingRespondedTo, response.Status = message_id, status
            response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = sop_class_uid, sop_instance_uid
            message = C_STORE_RSP()
            message.primitive_to_message(response)
            [pdata] = message.encode_msg(1, 16384)
            [(context_id, pdv)] = pdata.presentation_data_value_list
            assert pdv == b"\x03" + store_response_command(message_id, sop_class_uid, sop_instance_uid, status)


def dataset_bytes(path) -> bytes:
    """What follows the File Meta Information (PS3.10 7.1: preamble, DICM, then the group whose
    first element, (0002,0000) UL, gives its length)."""
    data = Path(path).read_bytes()
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


@pytest.mark.timeout(60)
def test_a_second_copy_of_a_waiting_instance_replaces_the_first_in_the_spool(tmp_path):
    import pydicom

    from dicom_node.config import NodeSettings
    from dicom_node.node import open_queue
    from dicom_node.spool import Spool
    from support.helpers import phantom_dataset
    from support.node_peers import free_port, storescu

    sent = tmp_path / "cr.dcm"
    phantom_dataset(rows=64, cols=48, bits=12, seed=3).save_as(sent, enforce_file_format=True)
    spool = Spool(tmp_path / "spool").create()
    queue = open_queue(spool)
    settings = NodeSettings(port=free_port())
    ae, server = start_scp(settings, spool, queue)
    try:
        first = storescu([sent], settings.port)
        second = storescu([sent], settings.port)
    finally:
        server.shutdown()
        ae.shutdown()
    assert "Received Store Response (Success)" in first.stderr and "(Success)" in second.stderr

    (kept,) = spool.received_files()  # the first copy's file is gone
    (waiting,) = queue.jobs("received")
    (superseded,) = queue.jobs("done")
    assert waiting.path == kept and "superseded" in superseded.last_error
    assert dataset_bytes(kept) == dataset_bytes(sent)  # the data set exactly as sent
    assert pydicom.dcmread(kept).file_meta.MediaStorageSOPInstanceUID == pydicom.dcmread(sent).SOPInstanceUID
    queue.close()


@pytest.mark.timeout(30)
def test_a_pdu_longer_than_the_first_buffer_arrives_whole():
    sender, receiver = socket.socketpair()
    wrapped = PduSocket(Association(AE(), "acceptor"), client_socket=receiver)
    payload = bytes(range(256)) * (3 * PduSocket.FIRST_BUFFER // 256) + b"end"

    def send() -> None:
        sender.sendall(payload)
        sender.close()
    thread = threading.Thread(target=send)
    thread.start()
    try:
        assert bytes(wrapped.recv(len(payload))) == payload
    finally:
        thread.join(10)
        receiver.close()


# --- the DUL waits on its socket and a wake pair instead of polling ---------------------------

@pytest.fixture
def scp_server(tmp_path):
    """The node's SCP in this process on a free port; yields (port, spool)."""
    from dicom_node.config import NodeSettings
    from dicom_node.node import open_queue
    from dicom_node.spool import Spool
    from support.node_peers import free_port

    spool = Spool(tmp_path / "spool").create()
    queue = open_queue(spool)
    settings = NodeSettings(port=free_port())
    ae, server = start_scp(settings, spool, queue)
    try:
        yield settings.port, spool
    finally:
        server.shutdown()
        ae.shutdown()
        queue.close()


def _requestor(port: int):
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
    assert assoc.is_established
    return assoc


def _wait_for_no_associations(port: int) -> None:
    import time

    from support.node_peers import wait_until

    # the acceptor's threads end a moment after the release
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("AcceptorThread")], 10, 0.05,
               "the association threads to end")
    time.sleep(0.1)


@pytest.mark.timeout(60)
def test_an_idle_association_sleeps_in_select_instead_of_polling(scp_server, monkeypatch):
    import time

    import types

    import pynetdicom.association

    port, _ = scp_server
    checks, loops = [], []
    ready = PduSocket.ready.fget
    monkeypatch.setattr(PduSocket, "ready", property(lambda sock: checks.append(1) or ready(sock)))
    # the association's own loop sleeps 1 ms per turn: its turns are counted by its sleeps
    counting = types.SimpleNamespace(**vars(time))
    counting.sleep = lambda seconds: loops.append(threading.current_thread().name) or time.sleep(seconds)
    monkeypatch.setattr(pynetdicom.association, "time", counting)
    assoc = _requestor(port)
    try:
        before, loops_before = len(checks), len(loops)
        time.sleep(1.0)
        idle_checks = len(checks) - before
        idle_loops = sum(1 for name in loops[loops_before:] if name.startswith("AcceptorThread"))
        assert assoc.send_c_echo().Status == 0  # and it still answers at once
    finally:
        assoc.release()
    # about 1 / LONGEST_WAIT = 20 a second; pynetdicom's own loops look about 1,000 times a second
    assert idle_checks <= 2 / PduSocket.LONGEST_WAIT, idle_checks
    assert 0 < idle_loops <= 2 / PduSocket.LONGEST_WAIT, idle_loops


@pytest.mark.timeout(60)
def test_requests_and_responses_wake_the_dul_at_once(scp_server, monkeypatch, tmp_path):
    """With the longest wait at 5 s, a response or a PDU that did not wake the DUL would stall
    the exchange by seconds: association, 10 echoes, 2 stores and the release take well under."""
    import time

    import pydicom

    from support.helpers import phantom_dataset

    port, spool = scp_server
    monkeypatch.setattr(PduSocket, "LONGEST_WAIT", 5.0)
    ds = phantom_dataset(rows=256, cols=200, bits=12, seed=4)
    started = time.monotonic()
    assoc = _requestor(port)
    try:
        statuses = [assoc.send_c_echo().Status for _ in range(10)]
        for uid in ("1.2.3.41", "1.2.3.42"):
            ds.SOPInstanceUID = uid
            statuses.append(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
    elapsed = time.monotonic() - started
    assert statuses == [0] * 12
    assert elapsed < 4.0, f"{elapsed:.1f} s: a wait ran to its end"
    stored = sorted(pydicom.dcmread(p).SOPInstanceUID for p in spool.received_files())
    assert stored == ["1.2.3.41", "1.2.3.42"]


@pytest.mark.timeout(120)
def test_associations_leave_no_open_descriptors_behind(scp_server):
    """Each association's wake pair is closed with its socket."""
    import os

    port, _ = scp_server

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))
    assoc = _requestor(port)  # one first: pynetdicom's lazily opened things are open from here on
    assoc.release()
    _wait_for_no_associations(port)
    baseline = open_fds()
    for _ in range(20):
        assoc = _requestor(port)
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    _wait_for_no_associations(port)
    assert open_fds() <= baseline + 2  # 20 leaked pairs would be 40


# --- a C-STORE's data set goes into the spool as it arrives ------------------------------------

@pytest.mark.timeout(120)
def test_a_stored_data_set_is_written_into_the_spool_as_it_arrives_not_held_in_memory(scp_server, monkeypatch):
    """storescu sends a radiograph in 128 KiB PDUs: by the time the handler runs, the whole file
    (preamble, meta, data set) is in incoming/ as a partial file and nothing of it is in memory;
    the file kept is the image sent."""
    import pydicom
    from pydicom.data import get_testdata_file

    from dicom_node import scp
    from support.node_peers import storescu

    port, spool = scp_server
    seen = []
    store = scp.StoreHandler._store

    def observed(self, event):
        stream = event.request.DataSet
        partials = [p.stat().st_size for p in spool.incoming.glob(".partial-*")]
        seen.append((type(stream).__name__, stream.spooled, len(stream.getbuffer()), partials))
        return store(self, event)
    monkeypatch.setattr(scp.StoreHandler, "_store", observed)
    sent = [Path(get_testdata_file(name)) for name in ("RG3_UNCR.dcm", "CT_small.dcm")]

    result = storescu(sent, port)

    assert result.returncode == 0 and result.stderr.count("Received Store Response (Success)") == 2, result.stderr
    kept = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in spool.received_files()}
    assert not list(spool.incoming.glob(".partial-*"))
    for original, (kind, spooled, in_memory, partials) in zip(sent, seen):
        ds = pydicom.dcmread(original)
        copy = kept[str(ds.SOPInstanceUID)]
        assert (kind, spooled, in_memory) == ("SpooledDataSet", True, 0)
        assert partials == [copy.stat().st_size]  # the whole file was there before the handler ran
        again = pydicom.dcmread(copy)
        assert again.PixelData == ds.PixelData and again.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


@pytest.mark.timeout(120)
def test_a_store_cut_off_mid_data_set_leaves_no_partial_file_and_no_open_descriptor(scp_server, tmp_path):
    """The sender dies while its image is arriving: the association ends, and the partial file it
    was being written into is closed and removed (nothing was acknowledged)."""
    import os
    import subprocess

    import numpy as np

    from support.helpers import phantom_dataset
    from support.node_peers import DCMTK_ENV, wait_until

    port, spool = scp_server
    big = phantom_dataset(rows=256, cols=256, bits=12, seed=2)
    big.Rows = big.Columns = 7000  # 98 MB: it takes a while to send
    big.PixelData = np.zeros((7000, 7000), dtype=np.uint16).tobytes()
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))
    assoc = _requestor(port)  # pynetdicom's lazily opened things are open from here on
    assoc.release()
    _wait_for_no_associations(port)
    baseline = open_fds()

    sender = subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "ENHANCE", "127.0.0.1", str(port),
                               str(tmp_path / "big.dcm")], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: list(spool.incoming.glob(".partial-*")), 60, 0.001, "the data set to arrive")
    finally:
        sender.kill()
        sender.wait(10)
    _wait_for_no_associations(port)

    assert list(spool.incoming.iterdir()) == []
    assert open_fds() <= baseline + 2


def _encoded(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _store_request(encoded: bytes, uid: str, message_id: int, sop_class_uid: str):
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID, request.Priority = message_id, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class_uid, uid
    request.DataSet = BytesIO(encoded)
    return request


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ending", ["abort", "release"])
def test_stores_a_peer_queued_but_the_node_never_served_leave_no_partial_file_or_descriptor(scp_server, ending):
    """A peer sends four C-STOREs without waiting for the answers, then ends the association:
    pynetdicom serves one message per turn and stops at the A-ABORT or A-RELEASE. The files of the
    stores it never served (never acknowledged) are closed and removed."""
    import os

    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    from support.helpers import phantom_dataset

    port, spool = scp_server
    encoded = _encoded(phantom_dataset(rows=512, cols=512, bits=12, seed=1))
    assoc = _requestor(port)
    assoc.release()
    _wait_for_no_associations(port)
    baseline = len(os.listdir("/proc/self/fd"))

    assoc = _requestor(port)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == ComputedRadiographyImageStorage)
    for i in range(4):
        assoc.dimse.send_msg(_store_request(encoded, f"1.2.3.5{i}", i + 1, ComputedRadiographyImageStorage), context_id)
    assoc.abort() if ending == "abort" else assoc.release()
    _wait_for_no_associations(port)

    assert not list(spool.incoming.glob(".partial-*"))
    assert len(spool.received_files()) < 4  # some were never served: the case under test
    assert len(os.listdir("/proc/self/fd")) <= baseline + 2


@pytest.mark.timeout(60)
def test_a_store_the_handler_never_sees_leaves_no_partial_file(scp_server):
    """A C-STORE on an accepted CR context whose Affected SOP Class is no storage class:
    pynetdicom aborts without calling our handler; its file goes."""
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    from support.helpers import phantom_dataset

    port, spool = scp_server
    assoc = _requestor(port)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == ComputedRadiographyImageStorage)
    encoded = _encoded(phantom_dataset(rows=256, cols=256, bits=12, seed=3))
    assoc.dimse.send_msg(_store_request(encoded, "1.2.3.61", 1, "1.2.3.4.5.6"), context_id)
    _wait_for_no_associations(port)
    if assoc.is_established:
        assoc.abort()

    assert list(spool.incoming.iterdir()) == []
