"""Failed jobs back into the queue: what `dicom-node retry` and the status page's button do."""
from __future__ import annotations

from dataclasses import dataclass

from dicom_node.jobs import Job, JobQueue
from dicom_node.spool import Spool


@dataclass(frozen=True)
class RetryResult:
    requeued: list[Job]    # queued again, as they were before (last_error: why they had failed)
    superseded: list[Job]  # not retried: the instance was received again since
    unknown: list[int]     # asked for, but not failed (or no such job)


def retry_failed(spool: Spool, queue: JobQueue, job_ids: list[int] | None) -> RetryResult:
    """Requeue these failed jobs (None: every one). Their reason files go first, so that a new
    failure cannot lose its fresh reason; the reason stays in the job's last error until done."""
    wanted = None if job_ids is None else set(job_ids)
    chosen = [j for j in queue.jobs("failed", limit=1_000_000) if wanted is None or j.id in wanted]
    stays = queue.superseded([j.id for j in chosen])  # held as they are, reason file and all
    for job in chosen:
        if job.id not in stays:
            spool.remove(job.path.with_name(job.path.name + ".reason.txt"))
    requeued = queue.requeue_failed([j.id for j in chosen])
    again = {j.id for j in requeued}
    return RetryResult(requeued=requeued, superseded=[j for j in chosen if j.id not in again],
                       unknown=sorted((wanted or set()) - {j.id for j in chosen}))
