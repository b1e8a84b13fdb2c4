"""The worker's decisions without the worker: a job's verdict from its plan (settlement.settle)
and the items it sends (routing.Routing), on plain values."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from dicom_node.config import RetrySettings
from dicom_node.forwarder import Item, ItemKind, Outcome
from dicom_node.jobs import Job
from dicom_node.routing import Routing
from dicom_node.settlement import Done, Fail, Plan, Retry, backoff_seconds, settle

NOW = 1_800_000_000.0
RETRY = RetrySettings(initial_seconds=10.0, max_seconds=600.0, give_up_hours=24.0)


def job(attempts: int = 0, age_hours: float = 0.0) -> Job:
    return Job(id=7, sop_instance_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_aet="MOD",
               association="a1", path=Path("/spool/incoming/1.2.3.dcm"), state="processing", attempts=attempts,
               received_at=NOW - age_hours * 3600, next_attempt_at=NOW, last_error=None)


def item(kind: str, uid: str = "1.2.3") -> Item:
    return Item(kind, Path(f"/spool/{kind}.dcm"), "1.2.840.10008.5.1.4.1.1.1", uid, "1.2.840.10008.1.2.1")


def plan(*outcomes: tuple[str, Outcome], **fields) -> Plan:
    p = Plan(job(**{k: fields.pop(k) for k in ("attempts", "age_hours") if k in fields}), [item("original")],
             **fields)
    p.outcomes = [(dest, p.items[0], outcome) for dest, outcome in outcomes]
    return p


def test_every_destination_delivered_is_done_with_the_plans_note():
    verdict = settle(plan(("pacs", Outcome("delivered")), ("folder", Outcome("delivered", "warning 0xB000")),
                          note="not enhanced: too small"), RETRY, NOW)
    assert verdict == Done("not enhanced: too small")


def test_a_permanent_failure_wins_over_retries_and_names_its_destination():
    verdict = settle(plan(("pacs", Outcome("retry", "pacs: refused")), ("vna", Outcome("failed", "0xA900"))),
                     RETRY, NOW)
    assert verdict == Fail("vna: 0xA900")


def test_the_plans_own_failure_comes_first():
    verdict = settle(plan(("vna", Outcome("failed", "0xC000")), failure="not a complete DICOM file: torn"),
                     RETRY, NOW)
    assert verdict == Fail("not a complete DICOM file: torn; vna: 0xC000")


def test_a_retry_waits_the_backoff_and_names_each_reason_once():
    rng_seed = 3
    p = plan(("pacs", Outcome("retry", "pacs: refused")), ("pacs", Outcome("retry", "pacs: refused")),
             transient="enhancement failed: RuntimeError()", attempts=2)
    verdict = settle(p, RETRY, NOW, random.Random(rng_seed))
    delay = backoff_seconds(3, RETRY, random.Random(rng_seed))
    assert verdict == Retry("enhancement failed: RuntimeError(); pacs: refused", NOW + delay, 3, delay)
    assert 0.8 * 40 <= delay <= 1.2 * 40  # 10 s doubled twice, +-20 %


def test_backoff_is_capped():
    assert settle(plan(("pacs", Outcome("retry", "down")), attempts=20), RETRY, NOW).delay == 600.0


def test_a_retry_past_give_up_hours_fails_saying_how_long_it_tried():
    verdict = settle(plan(("pacs", Outcome("retry", "pacs: refused")), attempts=41, age_hours=24.0), RETRY, NOW)
    assert verdict == Fail("gave up after 42 attempts over 24.0 h: pacs: refused")
    assert isinstance(settle(plan(("pacs", Outcome("retry", "x")), age_hours=23.9), RETRY, NOW), Retry)


def test_settle_reads_only_the_plan():
    p = plan(("pacs", Outcome("retry", "down")))
    before = (list(p.outcomes), list(p.items))
    settle(p, RETRY, NOW, random.Random(0))
    assert (p.outcomes, p.items) == before


# --- routing ------------------------------------------------------------------------------

CR = "1.2.840.10008.5.1.4.1.1.1"


def test_item_kinds_are_the_strings_the_queue_and_audit_store():
    assert [str(k) for k in ItemKind] == ["original", "derived", "parametric-map"]
    assert item("derived").kind is ItemKind.DERIVED
    with pytest.raises(ValueError, match="'thumbnail' is not a valid ItemKind"):
        item("thumbnail")


def test_routing_sends_derived_then_maps_then_original():
    routing = Routing(frozenset({CR}), parametric_map=True, forward_original=True)
    original, derived, maps = item("original"), item("derived", "9.1"), item("parametric-map", "9.2")
    assert routing.enhances(CR) and not routing.enhances("1.2.840.10008.5.1.4.1.1.2")
    assert routing.items(original, derived, maps) == [derived, maps, original]
    assert Routing(frozenset({CR})).items(original, derived, None) == [derived, original]


def test_forward_original_off_sends_only_the_derived_instance():
    routing = Routing(frozenset({CR}), forward_original=False)
    original, derived = item("original"), item("derived", "9.1")
    assert routing.items(original, derived) == [derived]
    assert routing.items(original) == [original]  # nothing was to be enhanced: as it is


def test_forward_original_off_still_sends_the_original_when_there_is_no_derived_instance():
    """An image that could not be enhanced is never held back for it (issue 22)."""
    assert Routing(frozenset({CR}), forward_original=False).items(item("original")) == [item("original")]


def test_routing_validates_its_arguments():
    with pytest.raises(TypeError, match="enhance_classes"):
        Routing("1.2.840.10008.5.1.4.1.1.1")
    with pytest.raises(ValueError, match="original must be an original item"):
        Routing().items(item("derived"))
