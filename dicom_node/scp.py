"""The Storage SCP: C-ECHO and C-STORE into the durable spool.

Shaped like pynetdicom's storescp: build the AE, add the contexts, bind small handlers.
A C-STORE handler does one thing - make the encoded dataset as received durable in the spool
(written there as it arrived, SpooledDataSet) and record its job - and returns a status code;
it never decodes pixels, never touches the model (this module must not import torch) and never
raises into the association. Each association is adopted when its connection opens (its
socket, its two threads' waits, its data sets, its store responses): see _on_connection_open.
"""
from __future__ import annotations

import queue
import select
import socket
import sqlite3
import ssl
import struct
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import structlog
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
    HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from dicom_node import audit
from dicom_node.config import NodeSettings
from dicom_node.jobs import JobQueue
from dicom_node.monitor import STORE_SECONDS
from dicom_node.spool import AtomicFile, Spool

_config.LOG_HANDLER_LEVEL = "none"  # no per-PDU debug handlers: they cost throughput

log = structlog.get_logger("dicom_node.scp")

#: What we accept: uncompressed, deflate, the JPEG family, JPEG-LS, JPEG 2000, RLE.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K,
    RLELossless,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The File Meta Information group (PS3.10 section 7.1), Explicit VR Little Endian, as
    pynetdicom's `encode_file_meta(event.file_meta)` encodes it (the same bytes, tested) but
    without building and validating a pydicom dataset for every image (0.35 ms of 7)."""
    def element(number: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":  # PS3.5 7.1.2: 2 reserved bytes and a 32-bit length
            return struct.pack("<HH2s2xI", 0x0002, number, vr, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, number, vr, len(value)) + value

    def text(value: str, pad: bytes) -> bytes:  # PS3.5 6.2: even length; UI pads with NUL
        encoded = (value or "").encode("latin-1")  # pydicom's default character set; None: empty
        return encoded + pad * (len(encoded) % 2)

    group = b"".join([
        element(0x0001, b"OB", b"\x00\x01"),
        element(0x0002, b"UI", text(sop_class_uid, b"\0")),
        element(0x0003, b"UI", text(sop_instance_uid, b"\0")),
        element(0x0010, b"UI", text(transfer_syntax, b"\0")),
        element(0x0012, b"UI", text(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        element(0x0013, b"SH", text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ])
    return element(0x0000, b"UL", struct.pack("<I", len(group))) + group


def file_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """What precedes the data set as received in a DICOM file (PS3.10 7.1): the preamble,
    "DICM" and the file meta."""
    return b"\x00" * 128 + b"DICM" + file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax)


def store_response_command(message_id: int, sop_class_uid: str | None, sop_instance_uid: str | None,
                           status: int) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2) carrying a status and nothing else, in
    Implicit VR Little Endian (PS3.7 6.3.1), as pynetdicom's own encoding gives it (the same
    bytes, tested) without building and encoding a pydicom dataset for every store."""
    def element(number: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, number, len(value)) + value

    def uid(value: str) -> bytes:  # PS3.5 6.2: even length, padded with NUL
        encoded = value.encode("ascii")
        return encoded + b"\0" * (len(encoded) % 2)

    group = b"".join([
        *([element(0x0002, uid(sop_class_uid))] if sop_class_uid else []),
        element(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
        element(0x0120, struct.pack("<H", message_id)),
        element(0x0800, struct.pack("<H", 0x0101)),  # Command Data Set Type: no data set
        element(0x0900, struct.pack("<H", status)),
        *([element(0x1000, uid(sop_instance_uid))] if sop_instance_uid else []),
    ])
    return element(0x0000, struct.pack("<I", len(group))) + group


def answer_stores_directly(assoc) -> None:
    """A C-STORE-RSP that carries a status only is encoded by `store_response_command` and
    queued as one P-DATA, as pynetdicom's `send_msg` would: 0.3 ms of pydicom dataset work per
    store saved. Anything else (requests, other responses, an Error Comment, a PDU too small)
    goes through pynetdicom. pynetdicom's EVT_DIMSE_SENT is not triggered for these responses
    (the node binds no handler to it)."""
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def send(primitive, context_id: int) -> None:
        if (type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None
                or primitive.ErrorComment is not None or primitive.OffendingElement is not None):
            return send_msg(primitive, context_id)
        command = store_response_command(primitive.MessageIDBeingRespondedTo, primitive.AffectedSOPClassUID,
                                         primitive.AffectedSOPInstanceUID, primitive.Status)
        if dimse.maximum_pdu_size and len(command) > dimse.maximum_pdu_size - 6:
            return send_msg(primitive, context_id)
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command, last fragment
        dimse.dul.send_pdu(pdata)
    dimse.send_msg = send


def _file_writer(event: evt.Event):
    """Writes what `event.encoded_dataset()` returns (preamble, file meta, the dataset as
    received) without first joining a copy of the whole dataset in memory."""
    request = event.request
    head = file_head(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, event.context.transfer_syntax)
    stream = request.DataSet

    def write(f) -> None:
        f.write(head)
        with stream.getbuffer() as body:  # released at once: pynetdicom closes the stream
            f.write(body)
    return write


class SpooledDataSet(BytesIO):
    """A DIMSE message's data set as pynetdicom's DUL thread decodes it, fragment by fragment.

    A C-STORE's goes straight into an incoming file of the spool, behind the preamble and the
    file meta, while the rest of it is still arriving (a 2 MB image comes in 16 PDUs from
    storescu): the handler is left the fsync and the rename, not a 2 MB write, and the image
    is never held in memory. Any other message's data set stays in memory, as pynetdicom keeps
    it. Nothing may raise in the DUL thread: an error is kept for the handler, which refuses the
    store (a write error 0xA700, another 0xC000). `keep` and `discard` are the handler's (and
    the end of an association's, for a message that never completed).
    """

    def __init__(self, spool: Spool, message: DIMSEMessage, assoc):
        super().__init__()
        self._spool, self._message, self._assoc = spool, message, assoc
        self._incoming: AtomicFile | None = None
        self._spooled: bool | None = None  # None until the first fragment says what it is
        self.error: Exception | None = None

    @property
    def spooled(self) -> bool:
        return bool(self._spooled)

    def write(self, data) -> int:
        if self._spooled is None:
            self._spooled = isinstance(self._message, C_STORE_RQ)
            if self._spooled:
                self._open()
        if not self._spooled:
            return super().write(data)
        if self._incoming is not None:
            try:
                self._incoming.file.write(data)
            except Exception as exc:
                self._fail(exc)
        return len(data)

    def _open(self) -> None:
        try:
            command = self._message.command_set
            syntax = self._assoc._accepted_cx[self._message.context_id].transfer_syntax[0]
            self._incoming = self._spool.open_received()
            self._incoming.file.write(file_head(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, syntax))
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.error = self.error or exc
        self.discard()  # the rest of the data set is read and dropped

    def keep(self, sop_instance_uid: str) -> Path:
        """The complete file, durable under its final name (the folder's fsync is the caller's);
        raises the write error, if there was one."""
        if self.error is not None:
            raise self.error
        return self._incoming.keep(self._spool.received_path(sop_instance_uid))

    def discard(self) -> None:
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None


def _discard(data_set) -> None:
    if isinstance(data_set, SpooledDataSet):
        data_set.discard()  # nothing once kept


def spool_data_sets(assoc, spool: Spool) -> None:
    """Each DIMSE message the association receives decodes its data set into a SpooledDataSet.
    A file is discarded unless the handler kept it: after pynetdicom served its message (the
    handler may never have run: an unknown SOP class, an invalid request), when the association
    ends with messages still queued (a peer that sent several stores, then released or aborted),
    and when the DUL thread ends mid-message (an abort mid-store)."""
    dimse, dul = assoc.dimse, assoc.dul
    receive = dimse.receive_primitive

    def receive_primitive(primitive) -> None:
        if dimse.message is None:  # as pynetdicom starts a message, with our data set
            dimse.message = DIMSEMessage()
            dimse.message.data_set = SpooledDataSet(spool, dimse.message, assoc)
        receive(primitive)
    dimse.receive_primitive = receive_primitive
    serve = assoc._serve_request

    def serve_request(msg, context_id) -> None:
        try:
            serve(msg, context_id)
        finally:
            _discard(getattr(msg, "DataSet", None))
    assoc._serve_request = serve_request
    run_association, run_dul = assoc.run, dul.run

    def run_then_discard_what_was_not_served() -> None:
        try:
            run_association()
        finally:  # its loop ends after kill(): the DUL has stopped, nothing more is queued
            while True:
                try:
                    _, msg = dimse.msg_queue.get_nowait()
                except queue.Empty:
                    break
                _discard(getattr(msg, "DataSet", None))
    assoc.run = run_then_discard_what_was_not_served  # the association thread starts after EVT_CONN_OPEN

    def run_then_discard_an_incomplete_message() -> None:
        try:
            run_dul()
        finally:
            if dimse.message is not None:
                _discard(dimse.message.data_set)
    dul.run = run_then_discard_an_incomplete_message


class _WakingQueue(queue.Queue):
    """A queue whose every put also wakes the thread that waits for it: the DUL's primitives to
    send (the handler's C-STORE response among them), the association's decoded DIMSE messages
    and its DUL primitives (A-RELEASE, A-ABORT)."""

    wake: Callable[[], None]

    def put(self, item, block=True, timeout=None) -> None:
        super().put(item, block, timeout)
        self.wake()


class PduSocket(AssociationSocket):
    """pynetdicom's association socket, with two changes for the DUL thread that reads it.

    Reading: each PDU goes into one buffer of its length as the kernel delivers it, instead of
    a Python loop of 4 KiB `recv` calls and copies (0.7 -> 0.2 ms of CPU per 2 MB image on a
    2-core VM). Same contract: the bytes asked for, fewer only when the peer closed; timeouts
    and TLS as the wrapped socket has them. Past FIRST_BUFFER the buffer grows (doubling) as
    bytes arrive rather than to the length the PDU header claims: a peer that announces 4 GiB
    and sends nothing must not make the node reserve 4 GiB.

    Waiting: pynetdicom's DUL polls - it sleeps 1 ms whenever the socket had nothing - so every
    PDU that arrives, and every response the handler queues, waits up to 1 ms (1.5 ms of a
    6 ms store of a 2 MB image). Here `ready` blocks in select() on the socket and on a wake
    pair that a queued response writes to, so the DUL wakes as soon as there is work, and at
    least every LONGEST_WAIT to check its timers (ARTIM, stop); idle, it wakes 20 times a
    second instead of 1,000.
    """

    FIRST_BUFFER = 1 << 22  # 4 MiB: a usual PDU is read into one allocation
    LONGEST_WAIT = 0.05  # s: how late the DUL may see its ARTIM timer expire or a stop

    _wake_pair: tuple[socket.socket, ...] = ()  # set by `adopt`; without it, pynetdicom's polling

    @classmethod
    def adopt(cls, assoc) -> None:
        """Turn the association's freshly accepted socket into ours and let its DUL wait on it."""
        sock, dul = assoc.dul.socket, assoc.dul
        sock.__class__ = cls
        sock._wake_pair = socket.socketpair()
        sock._wake_lock = threading.Lock()  # a wake never writes to a closed pair's reused fd
        for end in sock._wake_pair:
            end.setblocking(False)
        dul.to_provider_queue.__class__ = _WakingQueue
        dul.to_provider_queue.wake = sock._wake
        dul._run_loop_delay = 0  # the DUL's own sleep between polls: the wait is in `ready`
        run = dul.run

        def run_then_close_the_wake_pair() -> None:  # the pair lives as long as the DUL thread
            try:
                run()
            finally:
                with sock._wake_lock:
                    for end in sock._wake_pair:
                        end.close()
        dul.run = run_then_close_the_wake_pair  # the DUL thread starts after EVT_CONN_OPEN

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_pair[1].send(b"\0")
            except OSError:  # closed, or already a wake pending (buffer full): either way fine
                pass

    @property
    def ready(self) -> bool:
        if not self._wake_pair:
            return super().ready
        if self.socket is None or self._is_connected is False:
            return False
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True  # TLS may hold decrypted bytes select() does not see
        dul = self.assoc.dul
        # no wait while the DUL has an event or a primitive in hand: it loops once per event
        busy = dul.event_queue.qsize() or dul.to_provider_queue.qsize() or dul._kill_thread
        waker = self._wake_pair[0]
        try:
            readable, _, _ = select.select([self.socket, waker], [], [], 0 if busy else self.LONGEST_WAIT)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: transport connection closed
            return False
        if waker in readable:
            try:
                while waker.recv(4096):
                    pass
            except OSError:  # drained (BlockingIOError) or closed
                pass
        return self.socket in readable

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(min(nr_bytes, self.FIRST_BUFFER))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
            with memoryview(buffer) as view:  # released before the buffer may grow
                count = self.socket.recv_into(view[received:])
            if not count:
                break
            received += count
        del buffer[received:]
        return buffer


def wait_for_messages(assoc) -> None:
    """Let the association's thread wait for its next message instead of polling for it.

    pynetdicom's acceptor loop sleeps 1 ms, then looks for a decoded DIMSE message, an A-RELEASE
    or an A-ABORT: a C-STORE whose last byte arrived waits up to 1 ms before its handler runs,
    and an idle association wakes 1,000 times a second. Here its non-blocking look waits, while
    both queues are empty, until one of their puts rings, and at most PduSocket.LONGEST_WAIT
    (its other checks: a stop, the DUL thread's end, the idle timer). The loop's own 1 ms sleep
    stays, after each turn: a message that arrives while the loop waits on the bell (the usual
    case: an image takes longer than 1 ms to arrive) is served at once."""
    dimse, dul = assoc.dimse, assoc.dul
    bell = threading.Event()
    for messages in (dimse.msg_queue, dul.to_user_queue):
        messages.__class__ = _WakingQueue
        messages.wake = bell.set
    look = dimse.get_msg

    def get_msg(block: bool = False):
        if not block:
            bell.clear()  # before looking: a put after the look rings again
            if dimse.msg_queue.empty() and dul.to_user_queue.empty() and not assoc._kill:
                bell.wait(PduSocket.LONGEST_WAIT)
        return look(block)
    dimse.get_msg = get_msg


def _on_connection_open(event: evt.Event, spool: Spool) -> None:
    # EVT_CONN_OPEN comes after pynetdicom wrapped the accepted socket and before the
    # association's DUL thread starts reading from it (and before its own loop starts).
    PduSocket.adopt(event.assoc)
    wait_for_messages(event.assoc)
    spool_data_sets(event.assoc, spool)
    answer_stores_directly(event.assoc)


def association_label(assoc) -> str:
    """`CALLING@address:port`: unique per association while it lives, readable in logs."""
    peer = assoc.requestor
    return f"{peer.ae_title}@{peer.address}:{peer.port}"


class StoreHandler:
    """EVT_C_STORE: spool the encoded dataset, record the job, then answer success."""

    def __init__(self, spool: Spool, queue: JobQueue, on_stored: Callable[[], None] = lambda: None):
        self.spool, self.queue, self.on_stored = spool, queue, on_stored

    def __call__(self, event: evt.Event) -> int:
        started = time.perf_counter()
        try:
            return self._store(event)
        finally:
            STORE_SECONDS.observe(time.perf_counter() - started)  # /metrics

    def _store(self, event: evt.Event) -> int:
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID)
        association = association_label(event.assoc)
        with structlog.contextvars.bound_contextvars(association=association, sop_instance_uid=sop_uid):
            path = job_id = None
            stream = request.DataSet
            try:
                # file: tmp + fsync + rename; job: SQLite commit; then the folder fsync that
                # makes the rename durable. All of it before we answer. The commit is not
                # fsynced (the node's queue is synchronous=NORMAL): the durable file is the
                # journal, and a job a power cut took is rebuilt from it at start.
                if isinstance(stream, SpooledDataSet) and stream.spooled:  # written as it arrived
                    path = stream.keep(sop_uid)
                else:
                    path = self.spool.store_received(_file_writer(event), sop_uid, sync_dir=False)
                job_id, superseded = self.queue.add(
                    sop_uid, str(request.AffectedSOPClassUID), path,
                    calling_aet=event.assoc.requestor.ae_title, association=association)
                self.spool.sync_incoming()
                if superseded:  # the older copy's file goes only once its job is durably done
                    self.queue.sync()
            except (OSError, sqlite3.Error) as exc:
                log.error("not stored, answered out of resources", error=repr(exc))
                self._discard_uncommitted(path, job_id)
                self._audit(event, sop_uid, association, job_id, f"refused 0xA700: {exc}")
                return OUT_OF_RESOURCES
            except Exception as exc:  # never raise into the association
                log.exception("not stored, answered cannot understand", error=repr(exc))
                self._discard_uncommitted(path, job_id)
                self._audit(event, sop_uid, association, job_id, f"refused 0xC000: {exc}")
                return CANNOT_UNDERSTAND
            if superseded:
                self._discard(*superseded)
                log.info("superseded an earlier copy still waiting", job_id=job_id)
            log.info("received", job_id=job_id, bytes=path.stat().st_size,
                     sop_class_uid=str(request.AffectedSOPClassUID))
            self._audit(event, sop_uid, association, job_id, "stored")
            self.on_stored()
            return SUCCESS

    @staticmethod
    def _audit(event, sop_uid: str, association: str, job_id, outcome: str) -> None:
        try:
            audit.record("received", association=association, calling_ae=event.assoc.requestor.ae_title,
                         address=event.assoc.requestor.address, sop_instance_uid=sop_uid,
                         sop_class_uid=str(event.request.AffectedSOPClassUID), job_id=job_id, outcome=outcome)
        except Exception:  # the audit file must never fail a store
            log.exception("audit line not written")

    def _discard_uncommitted(self, path, job_id) -> None:
        """A file whose job is committed stays: the worker delivers it even if we said failure.
        (One still being written goes once the message is served: spool_data_sets.)"""
        if job_id is None:
            self._discard(path)

    def _discard(self, *paths) -> None:
        try:
            self.spool.remove(*(p for p in paths if p is not None))
        except OSError:
            pass


def _on_echo(event: evt.Event) -> int:
    log.info("echo", association=association_label(event.assoc))
    return SUCCESS


def _on_rejected(event: evt.Event) -> None:
    log.warning("association rejected", association=association_label(event.assoc),
                called_ae=event.assoc.acceptor.ae_title)


def _on_accepted(event: evt.Event) -> None:
    log.info("association accepted", association=association_label(event.assoc))


def build_ae(settings: NodeSettings) -> AE:
    """The AE with our title, limits, timeouts, allowed callers and supported contexts."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = 0  # no limit: senders use big PDUs, far fewer Python round trips
    for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
        value = getattr(settings, name)
        if value is not None:
            setattr(ae, name, value)
    # Unknown callers are rejected during association negotiation: rejected-permanent,
    # service user, "calling AE title not recognised".
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    # A wrong called AE title is rejected the same way: "called AE title not recognised".
    ae.require_called_aet = settings.require_called_aet
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def start_scp(settings: NodeSettings, spool: Spool, queue: JobQueue,
              on_stored: Callable[[], None] = lambda: None):
    """Start serving in background threads; returns the (AE, server) pair."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_C_STORE, StoreHandler(spool, queue, on_stored)),
        (evt.EVT_C_ECHO, _on_echo),
        (evt.EVT_CONN_OPEN, _on_connection_open, [spool]),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
    ]
    ssl_context = None
    if settings.tls is not None:
        from dicom_node.tls import server_context

        # every connection is TLS; a plain one fails its handshake, a silent one its ARTIM timer
        ssl_context = server_context(settings.tls)
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers,
                             ssl_context=ssl_context)
    return ae, server
