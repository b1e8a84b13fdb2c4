"""What an admin does with a held (failed) job: `dicom-node retry` (and the status page's
button) queue it again; `forward` queues it to be sent as received, without enhancement;
`discard` moves its files to discarded/ with the reason and ends the job."""
from __future__ import annotations

import time
from dataclasses import dataclass

from dicom_node.jobs import Job, JobQueue, iso_utc
from dicom_node.spool import Spool


@dataclass(frozen=True)
class RetryResult:
    requeued: list[Job]    # queued again, as they were before (last_error: why they had failed)
    superseded: list[Job]  # not retried: the instance was received again since
    unknown: list[int]     # asked for, but not failed (or no such job)


def retry_failed(spool: Spool, queue: JobQueue, job_ids: list[int] | None, as_received: bool = False) -> RetryResult:
    """Requeue these failed jobs (None: every one); `as_received`: to be sent as received, never
    enhanced (`dicom-node forward`). Their reason files go first, so that a new failure cannot
    lose its fresh reason; the reason stays in the job's last error until done."""
    wanted = None if job_ids is None else set(job_ids)
    chosen = [j for j in queue.jobs("failed", limit=1_000_000) if wanted is None or j.id in wanted]
    stays = queue.superseded([j.id for j in chosen])  # held as they are, reason file and all
    for job in chosen:
        if job.id not in stays:
            spool.remove(job.path.with_name(job.path.name + ".reason.txt"))
    requeued = queue.requeue_failed([j.id for j in chosen], as_received=as_received)
    again = {j.id for j in requeued}
    return RetryResult(requeued=requeued, superseded=[j for j in chosen if j.id not in again],
                       unknown=sorted((wanted or set()) - {j.id for j in chosen}))


@dataclass(frozen=True)
class DiscardResult:
    discarded: list[tuple[Job, str]]  # the job as it was, and where its file is kept now
    unknown: list[int]                # asked for, but not failed (or no such job)


def discard_failed(spool: Spool, queue: JobQueue, job_ids: list[int], why: str) -> DiscardResult:
    """End these failed jobs without sending them: each held file and its reason move to
    discarded/ (never deleted), with `why` and the time added to the reason; the job is done."""
    failed = {j.id: j for j in queue.jobs("failed", limit=1_000_000)}
    discarded = []
    for job_id in job_ids:
        job = failed.get(job_id)
        if job is None:
            continue
        note = f"discarded {iso_utc(time.time())} (dicom-node discard): {why}; it had failed: {job.last_error}"
        kept = spool.discard_held(job.path, note)
        queue.mark_discarded(job.id, kept, note)
        discarded.append((job, str(kept)))
    return DiscardResult(discarded, sorted(set(job_ids) - {j.id for j, _ in discarded}))
