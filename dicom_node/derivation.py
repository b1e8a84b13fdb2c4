"""The derived instance of one job (and its Parametric Map), made once and kept in the spool.

The enhancer runs here; the files land in derived/ (spool.derived_path, spool.maps_path) and
stay there across retries until the job is done or failed, so a retry sends the same
instance again instead of enhancing it again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node import audit
from dicom_node.forwarder import Item, ItemKind
from dicom_node.jobs import Job
from dicom_node.spool import Spool, write_atomic
from dicom_node.thumbnails import write_thumbnails

log = structlog.get_logger("dicom_node.derivation")


@dataclass(frozen=True)
class Derived:
    instance: Item
    maps: Item | None  # the Parametric Map, when asked for


def item_of(kind: ItemKind, path, head: Dataset | None = None) -> Item:
    """An item for a file in the spool, described by its header (read when not given)."""
    head = dcmread(path, stop_before_pixels=True) if head is None else head
    return Item(kind, path, str(head.SOPClassUID), str(head.SOPInstanceUID), str(head.file_meta.TransferSyntaxUID))


class Derivation:
    """Enhances a job's instance into the spool: `enhancer` (dicom_node.enhancer.Enhancer),
    `with_maps` for [model] parametric_map, `thumbnails` for the status page ([http])."""

    def __init__(self, spool: Spool, enhancer, with_maps: bool = False, thumbnails: bool = False):
        if not isinstance(spool, Spool):
            raise TypeError(f"spool must be a Spool, not {type(spool).__name__}")
        if enhancer is None:
            raise ValueError("a derivation needs an enhancer")
        self.spool, self.enhancer = spool, enhancer
        self.with_maps, self.thumbnails = with_maps, thumbnails

    def derive(self, job: Job, ds: Dataset, timings: list) -> Derived:
        """The job's derived instance (and maps), from the spool when made before. The maps are
        written first, so a derived file in the spool means both are there. A new enhancement
        adds its (job_id, "enhance", "", seconds) to `timings`."""
        path, maps_path = self.spool.derived_path(job.id), self.spool.maps_path(job.id)
        head = None
        if not path.exists() or (self.with_maps and not maps_path.exists()):
            head = self._enhance(job, ds, timings)
        return Derived(item_of(ItemKind.DERIVED, path, head),
                       item_of(ItemKind.PARAMETRIC_MAP, maps_path) if self.with_maps else None)

    def _enhance(self, job: Job, ds: Dataset, timings: list) -> Dataset:
        """Runs the model, writes the files; returns the derived instance."""
        started = time.perf_counter()
        head, prediction = self.enhancer.enhance_with_prediction(ds)
        if self.with_maps:
            maps = self.enhancer.parametric_map(ds, prediction)
            write_atomic(self.spool.maps_path(job.id), lambda f: maps.save_as(f, enforce_file_format=True))
        write_atomic(self.spool.derived_path(job.id), lambda f: head.save_as(f, enforce_file_format=True))
        seconds = time.perf_counter() - started
        timings.append((job.id, "enhance", "", seconds))
        if self.thumbnails:  # the status page's before/after, as a viewer shows them
            try:
                write_thumbnails(self.spool, job.id, ds, head)
            except Exception as exc:  # a picture for the page is never worth the image
                log.warning("thumbnail not written", error=repr(exc))
        if prediction.guard:
            log.warning("window guard", derived_uid=str(head.SOPInstanceUID), detail=prediction.guard.describe())
        log.info("enhanced", derived_uid=str(head.SOPInstanceUID), seconds=round(seconds, 3))
        audit.record("derived", association=job.association, calling_ae=job.calling_aet,
                     sop_instance_uid=str(head.SOPInstanceUID), source_sop_instance_uid=job.sop_instance_uid,
                     job_id=job.id, outcome="guarded" if prediction.guard else "enhanced")
        return head
