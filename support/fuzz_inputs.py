"""Mutated DICOM files for the fuzz scenario (tests/test_reliability.py, benchmarks/soak.py).

Each file keeps a readable file meta (so a C-STORE can be sent: pynetdicom streams the bytes
after the meta as they are, with STORE_SEND_CHUNKED_DATASET) and its own SOP Instance UID, so
every input can be accounted for by UID; what follows the meta is broken in one of the ways a
modality, a router or a disk breaks files.
"""
from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config

SEEDS = ["CT_small.dcm", "MR_small.dcm", "RG3_UNCR.dcm", "SC_rgb.dcm"]
KINDS = ("truncated", "flipped-header-bytes", "absurd-length", "wrong-transfer-syntax",
         "non-image-sop-class", "empty-dataset")


def _meta_and_body(ds: Dataset) -> tuple[bytes, bytes]:
    """The file's bytes split after its meta (preamble, DICM, group 2 | the data set)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) value, right after "DICM" + its header
    end = 144 + meta_length
    return data[:end], data[end:]


def _fresh(name: str) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def mutated_file(kind: str, rng: random.Random) -> tuple[Dataset | None, bytes]:
    """One mutated file's bytes, of `kind` (KINDS)."""
    ds = _fresh(rng.choice(SEEDS))
    if kind == "wrong-transfer-syntax":  # the meta says one encoding, the body is another
        _, body = _meta_and_body(ds)
        ds.file_meta.TransferSyntaxUID = rng.choice([ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
        meta = DicomBytesIO()
        meta.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        return ds, meta.getvalue() + body
    if kind == "non-image-sop-class":  # a valid object of a class the node does not enhance
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
        ds.SOPInstanceUID = generate_uid()
        ds.PatientID, ds.Modality = "FUZZ", "SR"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        meta, body = _meta_and_body(ds)
        return ds, meta + body
    meta, body = _meta_and_body(ds)
    if kind == "empty-dataset":
        return ds, meta
    if kind == "truncated":
        return ds, meta + body[:rng.randrange(1, max(2, len(body) - 1))]
    body = bytearray(body)
    if kind == "flipped-header-bytes":  # a few random bytes in the first elements
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(0, min(len(body), 512))
            body[i] ^= 1 << rng.randrange(8)
    elif kind == "absurd-length":  # one element's length field says ~4 GB
        i = rng.randrange(0, min(len(body), 256) - 8)
        body[i + 4:i + 8] = (0xFFFFFFF0 - rng.randrange(1000)).to_bytes(4, "little")
    return ds, meta + bytes(body)


def write_mutated_inputs(folder: Path, n: int, seed: int = 0) -> list[tuple[str, str, Path]]:
    """`n` mutated files under `folder`, the kinds in turn: [(kind, SOP Instance UID, path)]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    made = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ds, data = mutated_file(kind, rng)
        path = folder / f"{i:04d}-{kind}.dcm"
        path.write_bytes(data)
        made.append((kind, str(ds.file_meta.MediaStorageSOPInstanceUID), path))
    return made


def send_raw(port: int, path: Path) -> int | None:
    """C-STORE the file's bytes as they are (only its meta is read); the status, or None
    when the association or the store did not complete."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
    if not assoc.is_established:
        return None
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes after the meta go out untouched
    try:
        status = assoc.send_c_store(path)
    except Exception:  # noqa: BLE001 - a broken file may break the sender: then nothing was acked
        return None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if "Status" in status else None


def accounted_uids(outbox: Path, failed: Path) -> set[str]:
    """SOP Instance UIDs forwarded (the file meta the node wrote) or held in failed/ with a reason."""
    forwarded = {str(read_file_meta_info(p).MediaStorageSOPInstanceUID) for p in outbox.rglob("*.dcm")}
    held = set()
    for reason in failed.glob("*.reason.txt"):
        for line in reason.read_text().splitlines():
            if line.startswith("SOP Instance UID "):
                held.add(line.split(" ", 3)[3])
    return forwarded | held
