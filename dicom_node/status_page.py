"""The status page at GET /: server-rendered HTML, no script, from what the queue holds.

It shows the queue by state, each destination's health, the last 50 instances (with the
before/after thumbnails of enhanced ones) and the failed ones with their reasons and a retry
button. The button posts the job id and the admin token to /retry (monitor.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from pydicom.uid import UID

from dicom_node.jobs import STATES, Job, iso_utc


@dataclass(frozen=True)
class RecentInstance:
    job: Job
    thumbnails: bool  # before/after PNGs exist (enhanced by this node, recently enough)


@dataclass(frozen=True)
class StatusView:
    ae_title: str
    counts: dict[str, int]
    destinations: list[dict]  # as /health reports them
    recent: list[RecentInstance]
    failed: list[Job]
    delivered_to: dict[int, list[str]] = field(default_factory=dict)  # failed job id -> "dest (item)"
    notice: str | None = None  # the outcome of a retry just made
    retry_enabled: bool = False  # [http] admin_token is set


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
img { background: #000; max-width: 128px; max-height: 128px; margin-right: 4px; }
td.pictures { white-space: nowrap; }
.notice { background: #eef6ee; border: 1px solid #9c9; padding: 6px; }
.error { color: #a00; }
"""


def _class_name(sop_class_uid: str) -> str:
    name = UID(sop_class_uid).name
    return name if name and name != sop_class_uid else sop_class_uid


def _cell(value) -> str:
    return f"<td>{escape('' if value is None else str(value))}</td>"


def _queue_table(counts: dict[str, int]) -> str:
    rows = "".join(f'<tr data-state="{s}"><th>{s}</th><td class="count">{counts.get(s, 0)}</td></tr>'
                   for s in STATES)
    return f'<table id="queue">{rows}</table>'


def _destinations_table(destinations: list[dict]) -> str:
    rows = "".join(
        f'<tr data-destination="{escape(d["name"])}">' + _cell(d["name"]) + _cell(d["type"])
        + _cell(d.get("last_delivery") or "never") + _cell(d.get("last_error") or "") + "</tr>"
        for d in destinations)
    return ('<table id="destinations"><tr><th>destination</th><th>type</th><th>last delivery</th>'
            f'<th>last error</th></tr>{rows}</table>')


def _recent_table(recent: list[RecentInstance]) -> str:
    rows = []
    for item in recent:
        job = item.job
        pictures = "".join(
            f'<img class="{side}" alt="{side}" src="/thumbs/{job.id}/{side}.png">' for side in ("before", "after")
        ) if item.thumbnails else ""
        rows.append(f'<tr data-job="{job.id}" data-state="{job.state}">' + _cell(job.id)
                    + _cell(iso_utc(job.received_at)) + _cell(job.calling_aet)
                    + _cell(_class_name(job.sop_class_uid)) + _cell(job.sop_instance_uid) + _cell(job.state)
                    + _cell(job.attempts) + f'<td class="pictures">{pictures}</td></tr>')
    return ('<table id="recent"><tr><th>job</th><th>received</th><th>calling AE</th><th>SOP class</th>'
            '<th>SOP Instance UID</th><th>state</th><th>attempts</th><th>before / after</th></tr>'
            + "".join(rows) + "</table>")


def _retry_form(job_id: int) -> str:
    return ('<form method="post" action="/retry">'
            f'<input type="hidden" name="job" value="{job_id}">'
            '<input type="password" name="token" placeholder="admin token" autocomplete="off"> '
            '<button type="submit">retry</button></form>')


def _failed_table(failed: list[Job], delivered_to: dict[int, list[str]]) -> str:
    if not failed:
        return '<p id="failed">none</p>'
    rows = "".join(
        f'<tr data-job="{job.id}">' + _cell(job.id) + _cell(job.sop_instance_uid)
        + f'<td class="reason">{escape(job.last_error or "")}</td>'
        + _cell(", ".join(delivered_to.get(job.id, [])) or "none") + f"<td>{_retry_form(job.id)}</td></tr>"
        for job in failed)
    return ('<table id="failed"><tr><th>job</th><th>SOP Instance UID</th><th>reason</th>'
            f'<th>already delivered to</th><th></th></tr>{rows}</table>')


def render_status_page(view: StatusView) -> str:
    notice = f'<p class="notice" id="notice">{escape(view.notice)}</p>' if view.notice else ""
    token_note = "" if view.retry_enabled else (
        '<p class="error">Retry is off: set [http] admin_token in the config to enable it.</p>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicom-node {escape(view.ae_title)}</title>
<style>{_STYLE}</style></head><body>
<h1>dicom-node {escape(view.ae_title)}</h1>
{notice}
<h2>Queue</h2>
{_queue_table(view.counts)}
<h2>Destinations</h2>
{_destinations_table(view.destinations)}
<h2>Failed ({view.counts.get("failed", 0)})</h2>
{token_note}
{_failed_table(view.failed, view.delivered_to)}
<h2>Last {len(view.recent)} instances</h2>
{_recent_table(view.recent)}
</body></html>
"""
