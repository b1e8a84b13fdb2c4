"""derivation.Derivation with the real enhancer (the constant checkpoint) on a real CR image:
what lands in the spool, and that a retry reuses it instead of enhancing again."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom.sop_class import ParametricMapStorage

from dicom_node.derivation import Derivation
from dicom_node.enhancer import Enhancer
from dicom_node.forwarder import ItemKind
from dicom_node.jobs import Job
from dicom_node.spool import Spool


def cr_job(path: Path) -> Job:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Job(id=5, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), calling_aet="MOD",
               association="a1", path=path, state="processing", attempts=0, received_at=0.0, next_attempt_at=0.0,
               last_error=None)


@pytest.mark.timeout(120)
def test_derive_writes_the_instance_and_its_map_once_and_reuses_them(tmp_path, constant_weights):
    source = Path(get_testdata_file("RG1_UNCR.dcm"))
    spool = Spool(tmp_path / "spool").create()
    derivation = Derivation(spool, Enhancer(constant_weights, device="cpu"), with_maps=True)
    job, timings = cr_job(source), []

    first = derivation.derive(job, pydicom.dcmread(source), timings)

    derived, maps = pydicom.dcmread(spool.derived_path(5)), pydicom.dcmread(spool.maps_path(5))
    assert spool.maps_path(5) == spool.derived / "5.maps.dcm"
    assert (first.instance.kind, first.instance.path) == (ItemKind.DERIVED, spool.derived_path(5))
    assert first.instance.sop_instance_uid == str(derived.SOPInstanceUID) != job.sop_instance_uid
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == job.sop_instance_uid
    assert (first.maps.kind, first.maps.sop_class_uid) == (ItemKind.PARAMETRIC_MAP, ParametricMapStorage)
    assert first.maps.sop_instance_uid == str(maps.SOPInstanceUID)
    assert [(t[0], t[1], t[2]) for t in timings] == [(5, "enhance", "")]

    again = derivation.derive(job, pydicom.dcmread(source), timings)  # a retry: the spool has both files

    assert again == first
    assert len(timings) == 1, "a retry must not enhance again"


@pytest.mark.parametrize("thumbnails", [True, False])
def test_thumbnails_are_drawn_only_when_asked_for(tmp_path, constant_weights, thumbnails):
    from PIL import Image

    from dicom_node.thumbnails import thumbnail_path

    source = Path(get_testdata_file("RG3_UNCR.dcm"))
    spool = Spool(tmp_path / "spool").create()
    derivation = Derivation(spool, Enhancer(constant_weights, device="cpu"), thumbnails=thumbnails)
    derivation.derive(cr_job(source), pydicom.dcmread(source), [])
    pictures = [thumbnail_path(spool, 5, side) for side in ("before", "after")]
    if thumbnails:  # [http] thumbnails = true: both drawn, as viewer-sized 8-bit PNGs
        assert all(max(Image.open(p).size) <= 256 for p in pictures)
    else:  # false: no patient picture anywhere in the spool
        assert not any(p.exists() for p in pictures) and not list(spool.root.rglob("*.png"))


def test_a_derivation_needs_a_spool_and_an_enhancer(tmp_path):
    with pytest.raises(TypeError, match="spool must be a Spool"):
        Derivation(tmp_path, object())
    with pytest.raises(ValueError, match="needs an enhancer"):
        Derivation(Spool(tmp_path), None)
