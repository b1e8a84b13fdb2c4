"""Destinations: a DICOM C-STORE SCU and a folder, behind one `send_batch` interface.

Every outcome is classified for the worker (DICOM PS3.4 B.2.3, PS3.7 C):

* delivered - Success 0x0000 or a Warning (0xB000, 0xB006, 0xB007);
* retry     - network errors, timeouts, aborts, association rejects, Out of Resources
              0xA7xx and other failures that may pass (0x0110 processing failure);
* failed    - Data Set does not match SOP Class 0xA9xx, Cannot Understand 0xCxxx,
              SOP class not supported / not authorised / invalid instance, or nothing
              the peer accepted can carry the file: retrying cannot help.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import Verification

from dicom_node.config import DicomDestination, FolderDestination, NodeSettings
from dicom_node.errors import NodeError
from dicom_node.spool import fsync_dir, place_copy, safe_name, write_atomic

_config.LOG_HANDLER_LEVEL = "none"
# Process-wide, so set once (destinations send in parallel threads): a file path given to
# send_c_store streams its bytes after the meta untouched; a Dataset (a transcoded copy) is
# encoded as usual either way.
_config.STORE_SEND_CHUNKED_DATASET = True

log = structlog.get_logger("dicom_node.forwarder")

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_PERMANENT_CODES = {0x0117, 0x0122, 0x0124, 0x0211, 0x0212}
_WARNING_CODES = {0xB000, 0xB006, 0xB007}


class EchoFailed(NodeError):
    """A destination did not answer a C-ECHO."""


class ItemKind(StrEnum):
    """What an item is to the job; the value is what the queue's deliveries, the logs and the
    audit lines say."""
    ORIGINAL = "original"              # the instance as received
    DERIVED = "derived"                # the enhanced instance made from it
    PARAMETRIC_MAP = "parametric-map"  # the maps behind the derived instance ([model] parametric_map)


@dataclass(frozen=True)
class Item:
    """One file to deliver: the original as received, the derived instance or its maps."""
    kind: ItemKind
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str

    def __post_init__(self):
        object.__setattr__(self, "kind", ItemKind(self.kind))  # ValueError names an unknown kind


@dataclass(frozen=True)
class Outcome:
    result: str  # "delivered" | "retry" | "failed"
    detail: str = ""

    @property
    def delivered(self) -> bool:
        return self.result == "delivered"


DELIVERED = Outcome("delivered")


def classify_status(status: int) -> Outcome:
    """The worker's view of a C-STORE response status."""
    if status == 0x0000:
        return DELIVERED
    if status in _WARNING_CODES:
        return Outcome("delivered", f"warning 0x{status:04X}")
    text = f"C-STORE status 0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return Outcome("retry", f"{text} (out of resources)")
    if 0xA900 <= status <= 0xA9FF:
        return Outcome("failed", f"{text} (data set does not match SOP class)")
    if 0xC000 <= status <= 0xCFFF:
        return Outcome("failed", f"{text} (cannot understand)")
    if status in _PERMANENT_CODES:
        return Outcome("failed", text)
    return Outcome("retry", text)


def _association_failure(assoc, where: str) -> str:
    if not getattr(assoc, "connected", True):
        return f"could not connect to {where} (refused, unreachable or timed out)"
    if assoc.is_rejected:
        return f"association rejected by {where}"
    if assoc.is_aborted:
        return f"association aborted by {where}"
    return f"no answer from {where} during association"


class DicomTarget:
    """C-STORE SCU to one configured PACS; one association per batch."""

    def __init__(self, dest: DicomDestination, node: NodeSettings):
        self.dest, self.node = dest, node
        self.where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
        self.tls_args = None
        if dest.tls is not None:
            from dicom_node.tls import client_context

            self.tls_args = (client_context(dest.tls, dest.name), dest.tls.server_hostname or dest.host)

    @property
    def name(self) -> str:
        return self.dest.name

    def _ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            value = getattr(self.node, name)
            if value is not None:
                setattr(ae, name, value)
        return ae

    def _associate(self, ae: AE, contexts):
        opened = []
        assoc = ae.associate(self.dest.host, self.dest.port, contexts=contexts,
                             ae_title=self.dest.ae_title, tls_args=self.tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(1))])
        assoc.connected = bool(opened)  # tells "refused" apart from "aborted" in messages
        return assoc

    def echo(self) -> str:
        """C-ECHO the destination; EchoFailed with a clear message when it does not answer."""
        ae = self._ae()
        assoc = self._associate(ae, [build_context(Verification)])
        if not assoc.is_established:
            raise EchoFailed(f"echo {_association_failure(assoc, self.where)}")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if "Status" not in status:
            raise EchoFailed(f"echo to {self.where}: no response (timeout or abort)")
        if status.Status != 0x0000:
            raise EchoFailed(f"echo to {self.where}: status 0x{status.Status:04X}")
        return f"{self.where}: C-ECHO success"

    @staticmethod
    def _contexts(items: Sequence[Item]):
        """Per SOP class: the files' own transfer syntaxes, and uncompressed separately so
        a peer that refuses the compressed syntax can still accept the class."""
        contexts, seen = [], set()
        for item in items:
            ts = UID(item.transfer_syntax)
            keys = [(item.sop_class_uid, "uncompressed")]
            if ts not in UNCOMPRESSED:
                keys.insert(0, (item.sop_class_uid, str(ts)))
            for key in keys:
                if key not in seen:
                    seen.add(key)
                    syntaxes = UNCOMPRESSED if key[1] == "uncompressed" else [key[1]]
                    contexts.append(build_context(key[0], syntaxes))
        return contexts[:128]

    def send_batch(self, items: Sequence[Item], on_delivered: Callable[[Item], None] | None = None) -> list[Outcome]:
        """One association for the batch; `on_delivered(item)` right after each success."""
        if not items:
            return []
        ae = self._ae()
        assoc = self._associate(ae, self._contexts(items))
        if not assoc.is_established:
            outcome = Outcome("retry", _association_failure(assoc, self.where))
            return [outcome] * len(items)
        outcomes: list[Outcome] = []
        try:
            for item in items:
                if not assoc.is_established:
                    outcomes.append(Outcome("retry", f"association with {self.where} lost"))
                    continue
                outcomes.append(self._send_one(assoc, item))
                if outcomes[-1].delivered and on_delivered is not None:
                    on_delivered(item)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    def _send_one(self, assoc, item: Item) -> Outcome:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        ts = UID(item.transfer_syntax)
        exact = (item.sop_class_uid, ts) in accepted
        uncompressed = any((item.sop_class_uid, t) in accepted for t in UNCOMPRESSED)
        try:
            if exact:
                status = assoc.send_c_store(item.path)  # the file's bytes, untouched
            elif uncompressed:
                status = assoc.send_c_store(_transcoded(item.path))
            else:
                return Outcome("failed", f"{self.where} accepted no transfer syntax for "
                                         f"{UID(item.sop_class_uid).name}")
        except OSError as exc:  # reading the spool file or the socket: may pass
            return Outcome("retry", f"cannot send to {self.where}: {exc}")
        except (ValueError, AttributeError, RuntimeError, NotImplementedError) as exc:
            if not assoc.is_established:  # the peer went away between the check and the send
                return Outcome("retry", f"association with {self.where} lost: {exc}")
            return Outcome("failed", f"cannot send to {self.where}: {exc}")
        if "Status" not in status:
            return Outcome("retry", f"no response from {self.where} (timeout or abort)")
        outcome = classify_status(int(status.Status))
        if outcome.detail:
            outcome = Outcome(outcome.result, f"{self.where}: {outcome.detail}")
        return outcome


def _transcoded(path: Path):
    """The file re-encoded as Explicit VR Little Endian (pixels decoded when compressed)."""
    ds = dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        ds.decompress(generate_instance_uid=False)  # the same instance, only re-encoded
    elif ts != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class FolderTarget:
    """Writes Patient/Study/Series/SOP.dcm under a folder, each file atomically.

    `link`: each file may be a hard link to the spool's file (spool.place_copy) - only for the
    node's one destination. With others, a job's spool file may still be sent elsewhere after the
    folder has it, and whatever reads the folder must not be able to change it (a consumer that
    rewrites a file in place would rewrite the spool's)."""

    def __init__(self, dest: FolderDestination, link: bool = False):
        self.dest, self.link = dest, link

    @property
    def name(self) -> str:
        return self.dest.name

    def target_path(self, path: Path) -> Path:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                    "SOPInstanceUID"])
        return (self.dest.path / safe_name(ds.get("PatientID")) / safe_name(ds.get("StudyInstanceUID"))
                / safe_name(ds.get("SeriesInstanceUID")) / f"{safe_name(ds.get('SOPInstanceUID'))}.dcm")

    def echo(self) -> str:
        try:
            self.dest.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.dest.path / ".echo", b"")
            (self.dest.path / ".echo").unlink()
        except OSError as exc:
            raise EchoFailed(f"{self.dest.name}: folder {self.dest.path} is not writable: {exc}") from None
        return f"{self.dest.name}: folder {self.dest.path} is writable"

    def send_batch(self, items: Sequence[Item], on_delivered: Callable[[Item], None] | None = None) -> list[Outcome]:
        """Each file placed atomically (spool.place_copy: with `link` a hard link to the spool's
        file where it can, else a copy: tmp + fsync + rename); then one fsync per touched folder
        (including the parents of folders made for a new patient/study/series) for the whole
        batch. (`on_delivered` is not needed here: writing a file again is harmless.)"""
        outcomes, folders = [], set()
        for item in items:
            try:
                target = self.target_path(item.path)
                folders.update(_make_dirs(target.parent))
                place_copy(item.path, target, link=self.link)
                outcomes.append(DELIVERED)
            except OSError as exc:  # disk full, permissions: may pass
                outcomes.append(Outcome("retry", f"{self.dest.name}: cannot write: {exc}"))
            except Exception as exc:  # the file itself is unreadable
                outcomes.append(Outcome("failed", f"{self.dest.name}: cannot file it: {exc}"))
        try:
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)
        except OSError as exc:
            retry = Outcome("retry", f"{self.dest.name}: cannot sync {exc.filename}: {exc}")
            outcomes = [retry if o.delivered else o for o in outcomes]
        return outcomes


def _make_dirs(folder: Path) -> set[Path]:
    """mkdir -p; returns the folders whose entries changed and need an fsync."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
    touched = {m.parent for m in missing}
    touched.add(missing[0] if missing else folder)
    return touched


def make_target(dest, node: NodeSettings, only_destination: bool = False):
    """The sender for one [[destinations]] entry; `only_destination`: it is the node's one
    destination (a folder may then hard-link the spool's files, FolderTarget)."""
    if isinstance(dest, FolderDestination):
        return FolderTarget(dest, link=only_destination)
    return DicomTarget(dest, node)
