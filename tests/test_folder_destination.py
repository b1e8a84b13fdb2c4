"""The folder destination: each file placed atomically. As the node's one destination, a hard link
to the spool's file where the folder is on the spool's file system, a copy where it is not; with
other destinations, always a copy (the folder's reader must not be able to change a spool file
another destination may still be sent)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import FolderDestination, NodeSettings
from dicom_node.forwarder import Item, ItemKind, make_target
from dicom_node.spool import Spool
from support.helpers import phantom_dataset


def _received(spool: Spool, seed: int) -> Item:
    ds = phantom_dataset(64, 48, seed=seed)
    path = spool.store_received(lambda f: ds.save_as(f, enforce_file_format=True), ds.SOPInstanceUID)
    return Item(ItemKind.ORIGINAL, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))


def _deliver(folder: Path, items: list[Item], only_destination: bool = True) -> list[Path]:
    target = make_target(FolderDestination(name="archive", path=folder), NodeSettings(), only_destination)
    outcomes = target.send_batch(items)
    assert [o.delivered for o in outcomes] == [True] * len(items), outcomes
    return [target.target_path(item.path) for item in items]


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".partial-")]


def test_on_the_spools_file_system_the_file_is_a_hard_link_that_outlives_the_spool_file(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    items = [_received(spool, seed) for seed in range(3)]
    sent = {item.path: item.path.read_bytes() for item in items}
    placed = _deliver(tmp_path / "outbox", items)
    for item, path in zip(items, placed):
        assert os.path.samefile(path, item.path)  # no copy made
    placed_again = _deliver(tmp_path / "outbox", items)  # delivered again (a retry): replaced, same bytes
    assert placed_again == placed
    spool.remove(*(item.path for item in items))  # the job is done
    for item, path in zip(items, placed):
        assert path.read_bytes() == sent[item.path]
        assert pydicom.dcmread(path).SOPInstanceUID == item.sop_instance_uid
        assert os.stat(path).st_nlink == 1
    assert _partials(tmp_path / "outbox") == []


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm: no second file system to try")
def test_on_another_file_system_the_file_is_copied(tmp_path):
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same file system as the spool here")
    spool = Spool(tmp_path / "spool").create()
    items = [_received(spool, seed) for seed in range(2)]
    outbox = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="outbox-"))
    try:
        placed = _deliver(outbox, items)
        for item, path in zip(items, placed):
            assert not os.path.samefile(path, item.path)
            assert path.read_bytes() == item.path.read_bytes()
        assert _partials(outbox) == []
    finally:
        shutil.rmtree(outbox)


def test_beside_other_destinations_the_file_is_a_copy_that_rewriting_leaves_the_spool_alone(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    (item,) = [_received(spool, 7)]
    sent = item.path.read_bytes()
    (placed,) = _deliver(tmp_path / "outbox", [item], only_destination=False)
    assert not os.path.samefile(placed, item.path)
    with open(placed, "r+b") as f:  # a reader of the folder that rewrites in place
        f.truncate(100)
    assert item.path.read_bytes() == sent  # what a PACS still to be sent to gets
    assert _partials(tmp_path / "outbox") == []
