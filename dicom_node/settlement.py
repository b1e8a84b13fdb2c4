"""What becomes of one job after a batch: a pure decision, applied by the worker.

`settle` reads the job's plan (what could not be prepared, what each destination answered)
and returns a verdict; it touches neither files nor the queue:

* a permanent failure anywhere     -> Fail, at once (failures win over retries);
* a transient failure              -> Retry after min(max, initial * 2**n) with jitter,
                                      until give_up_hours after receipt, then Fail;
* every destination has every item -> Done (with the plan's note, e.g. why not enhanced).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from dicom_node.config import RetrySettings
from dicom_node.forwarder import Item, Outcome
from dicom_node.jobs import Job


@dataclass
class Plan:
    """What one job must deliver, or why it cannot be delivered at all, and what came of it."""
    job: Job
    items: list[Item] = field(default_factory=list)
    failure: str | None = None     # permanent: straight to failed/
    transient: str | None = None   # retry later (e.g. a model error)
    note: str | None = None        # kept as the job's last_error (e.g. why not enhanced)
    outcomes: list[tuple[str, Item, Outcome]] = field(default_factory=list)  # (destination, item, outcome)

    @property
    def ready(self) -> bool:
        """Prepared, so there is something to send."""
        return self.failure is None and self.transient is None


@dataclass(frozen=True)
class Done:
    note: str | None = None


@dataclass(frozen=True)
class Retry:
    reason: str
    at: float          # epoch seconds of the next attempt
    attempt: int       # the attempt that just ended (1-based)
    delay: float       # at - now


@dataclass(frozen=True)
class Fail:
    reason: str


Verdict = Done | Retry | Fail


def backoff_seconds(attempt: int, retry: RetrySettings, rng: random.Random = random) -> float:
    """Delay before retry number `attempt` (1-based): doubled each time, +-20 % jitter, capped."""
    base = retry.initial_seconds * 2 ** min(attempt - 1, 30)
    return min(retry.max_seconds, base * rng.uniform(0.8, 1.2))


def settle(plan: Plan, retry: RetrySettings, now: float, rng: random.Random = random) -> Verdict:
    """The job's verdict after this attempt, from its plan alone."""
    job = plan.job
    failures = [f"{dest}: {o.detail}" for dest, _, o in plan.outcomes if o.result == "failed"]
    retries = [o.detail for _, _, o in plan.outcomes if o.result == "retry"]
    if plan.failure:
        failures.insert(0, plan.failure)
    if plan.transient:
        retries.insert(0, plan.transient)
    if failures:
        return Fail("; ".join(failures))
    if retries:
        reason = "; ".join(dict.fromkeys(retries))  # one destination down: its reason once, not per item
        age_hours = (now - job.received_at) / 3600
        if age_hours >= retry.give_up_hours:
            return Fail(f"gave up after {job.attempts + 1} attempts over {age_hours:.1f} h: {reason}")
        delay = backoff_seconds(job.attempts + 1, retry, rng)
        return Retry(reason, now + delay, job.attempts + 1, delay)
    return Done(plan.note)
