"""`dicom-node serve`, `status` and `echo`. Heavy imports stay inside the command bodies."""
from __future__ import annotations

import json
import logging
import sys
import time

import click

from dicom_node.config import DEFAULT_CONFIG
from dicom_node.jobs import iso_utc

_config_option = click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
    type=click.Path(dir_okay=False), help="The node's config.toml.")


@click.command()
@_config_option
@click.option("--host", default=None, help="Bind address, instead of [node] host.")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="Port, instead of [node] port.")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="Instead of [logging] level (the worker's too).")
def serve(config_path: str, host: str | None, port: int | None, log_level: str | None) -> None:
    """Run the node: receive, spool, enhance and forward until SIGTERM/SIGINT."""
    from dataclasses import replace

    from dicom_node.config import load_config
    from dicom_node.logs import configure_logging
    from dicom_node.node import Node

    config = load_config(config_path)
    config = replace(config, node=replace(config.node, host=host or config.node.host,
                                          port=config.node.port if port is None else port),
                     logging=replace(config.logging, level=log_level or config.logging.level))
    configure_logging(config.logging.format, config.logging.level)
    sys.exit(Node(config).serve())


@click.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", default=20, show_default=True, help="How many failed jobs to list.")
def status(config_path: str, as_json: bool, limit: int) -> None:
    """Jobs per state, the oldest pending job and the failed ones with their reasons.

    Reads the queue database only, so it works while the node runs.
    """
    from dicom_node.config import load_config
    from dicom_node.jobs import STATES, JobQueue
    from dicom_node.spool import Spool

    config = load_config(config_path)
    spool = Spool(config.spool.dir)
    now = time.time()
    delivered, not_enhanced = {}, []
    if spool.db_path.exists():
        queue = JobQueue(spool.db_path, readonly=True)
        counts, oldest, failed = queue.counts(), queue.oldest_pending(), queue.jobs("failed", limit)
        retrying = queue.retrying(limit)
        delivered = {j.id: queue.delivered_to(j.id) for j in failed}
        not_enhanced = queue.not_enhanced(limit)
    else:
        counts, oldest, failed, retrying = dict.fromkeys(STATES, 0), None, [], []
    # an empty queue and a spool that is not there read alike: say which (a wrong --config)
    missing = None if spool.db_path.exists() else (
        f"no queue at {spool.db_path}" if spool.root.exists() else f"the spool {spool.root} does not exist")

    report = {
        "spool": str(spool.root),
        "spool_missing": missing,
        "counts": counts,
        "oldest_pending": None if oldest is None else {
            "job_id": oldest.id, "sop_instance_uid": oldest.sop_instance_uid,
            "state": oldest.state, "received_at": iso_utc(oldest.received_at),
            "age_seconds": round(now - oldest.received_at, 1), "attempts": oldest.attempts,
            "next_attempt_at": iso_utc(oldest.next_attempt_at), "last_error": oldest.last_error},
        "retrying": [{"job_id": j.id, "sop_instance_uid": j.sop_instance_uid, "attempts": j.attempts,
                      "next_attempt_at": iso_utc(j.next_attempt_at), "last_error": j.last_error} for j in retrying],
        "failed": [{"job_id": j.id, "sop_instance_uid": j.sop_instance_uid,
                    "path": str(j.path), "reason": j.last_error, "delivered_to": delivered.get(j.id, [])}
                   for j in failed],
        "not_enhanced": [{"job_id": j.id, "sop_instance_uid": j.sop_instance_uid, "state": j.display_state,
                          "reason": reason, "detail": detail} for j, reason, detail in not_enhanced],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"spool: {spool.root}")
    if missing:
        click.echo(f"  {missing}: has a node run with this config ({config.path})?")
    for state in STATES:
        click.echo(f"  {state:<11} {counts[state]}")
    if oldest is None:
        click.echo("oldest pending: none")
    else:
        line = (f"oldest pending: job {oldest.id} ({oldest.state}) received {iso_utc(oldest.received_at)},"
                f" {now - oldest.received_at:.0f} s ago, attempts {oldest.attempts}")
        if oldest.last_error:
            line += f", next attempt {iso_utc(oldest.next_attempt_at)}, last error: {oldest.last_error}"
        click.echo(line)
    click.echo(f"retrying: {len(retrying)}" + (" (soonest first)" if retrying else ""))
    for job in retrying:
        click.echo(f"  job {job.id} {job.sop_instance_uid}: attempts {job.attempts}, next attempt"
                   f" {iso_utc(job.next_attempt_at)}, last error: {job.last_error}")
    click.echo(f"failed: {counts['failed']}" + (" (newest first)" if failed else ""))
    for job in failed:
        click.echo(f"  job {job.id} {job.sop_instance_uid}: {job.last_error}")
        click.echo(f"    held at {job.path}; already delivered to: {', '.join(delivered.get(job.id, [])) or 'none'}")
    click.echo(f"not enhanced: {len(not_enhanced)}" + (" (latest first)" if not_enhanced else ""))
    for job, reason, detail in not_enhanced:
        click.echo(f"  job {job.id} {job.sop_instance_uid} ({job.display_state}) {reason}: {detail}")


@click.command()
@click.argument("destination", required=False)
@_config_option
def echo(destination: str | None, config_path: str) -> None:
    """C-ECHO the configured DESTINATION (a name from [[destinations]]); without one, the node
    itself (is it up and answering as [node] ae_title?)."""
    from dicom_node.config import DicomDestination, TlsSettings, load_config
    from dicom_node.forwarder import make_target

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # our message says it once
    config = load_config(config_path)
    if destination is None:
        node, tls = config.node, config.node.tls
        host = "127.0.0.1" if node.host in ("", "0.0.0.0") else "::1" if node.host == "::" else node.host
        # our own node on its own address: its certificate is not checked (it is issued for the
        # name modalities use); ours is offered in case it requires one
        dest = DicomDestination(name="node", ae_title=node.ae_title, host=host, port=node.port,
                                tls=None if tls is None else TlsSettings(cert=tls.cert, key=tls.key, verify=False))
    else:
        dest = config.destination(destination)
    click.echo(make_target(dest, config.node).echo())


def _held_jobs(config_path: str):
    """(config, spool, queue) for a command on held jobs; a UsageError when there is no queue."""
    from dicom_node.config import load_config
    from dicom_node.jobs import JobQueue
    from dicom_node.spool import Spool

    config = load_config(config_path)
    spool = Spool(config.spool.dir)
    if not spool.db_path.exists():
        raise click.UsageError(f"no queue at {spool.db_path}: has the node run with this config?")
    return config, spool, JobQueue(spool.db_path)


def _requeue(job_ids: tuple[int, ...], all_failed: bool, config_path: str, as_received: bool) -> None:
    """`retry` and `forward`: failed jobs back in the queue, reported one line each."""
    from dicom_node import audit
    from dicom_node.retry import retry_failed

    if bool(job_ids) == all_failed:
        raise click.UsageError("give the failed jobs' ids, or --all")
    config, spool, queue = _held_jobs(config_path)
    result = retry_failed(spool, queue, None if all_failed else list(job_ids), as_received=as_received)
    what = "to be forwarded as received" if as_received else "queued again"
    for job in result.requeued:
        audit.append(config.logging.audit, "forward requested" if as_received else "retry requested",
                     calling_ae=job.calling_aet, sop_instance_uid=job.sop_instance_uid, job_id=job.id,
                     outcome=f"it had failed: {job.last_error}")
        click.echo(f"job {job.id} {job.sop_instance_uid}: {what} (it had failed: {job.last_error})")
    for job in result.superseded:
        click.echo(f"job {job.id} {job.sop_instance_uid}: not {'forwarded' if as_received else 'retried'},"
                   " the instance was received again since")
    if result.unknown:
        click.echo(f"not failed, or unknown: {', '.join(map(str, result.unknown))}", err=True)
        sys.exit(1)
    click.echo(f"{len(result.requeued)} job(s) {what}")


@click.command()
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--all", "all_failed", is_flag=True, help="Every failed job.")
@_config_option
def retry(job_ids: tuple[int, ...], all_failed: bool, config_path: str) -> None:
    """Put failed jobs (JOB_IDS from `status`, or --all) back in the queue; works while the node
    runs, whose worker takes them within a second. Their reason files are removed; the reason
    stays in each job's last error until it is done."""
    _requeue(job_ids, all_failed, config_path, as_received=False)


@click.command()
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--all", "all_failed", is_flag=True, help="Every failed job.")
@_config_option
def forward(job_ids: tuple[int, ...], all_failed: bool, config_path: str) -> None:
    """Send failed jobs (JOB_IDS from `status`, or --all) as they were received, without
    enhancement, to the destinations that take originals; works while the node runs."""
    _requeue(job_ids, all_failed, config_path, as_received=True)


@click.command()
@click.argument("job_ids", nargs=-1, type=int, required=True)
@click.option("--reason", required=True, help="Why they are discarded (kept with the files and in the audit log).")
@_config_option
def discard(job_ids: tuple[int, ...], reason: str, config_path: str) -> None:
    """End failed jobs (JOB_IDS from `status`) without sending them: each held file moves to
    <spool>/discarded/ with its reason file (yours added), never deleted."""
    from dicom_node import audit
    from dicom_node.retry import discard_failed

    config, spool, queue = _held_jobs(config_path)
    result = discard_failed(spool, queue, list(job_ids), reason)
    for job, kept in result.discarded:
        audit.append(config.logging.audit, "discarded", calling_ae=job.calling_aet,
                     sop_instance_uid=job.sop_instance_uid, job_id=job.id, path=kept,
                     outcome=f"{reason}; it had failed: {job.last_error}")
        click.echo(f"job {job.id} {job.sop_instance_uid}: discarded, kept at {kept}")
    if result.unknown:
        click.echo(f"not failed, or unknown: {', '.join(map(str, result.unknown))}", err=True)
        sys.exit(1)
