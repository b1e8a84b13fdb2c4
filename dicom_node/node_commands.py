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
    delivered = {}
    if spool.db_path.exists():
        queue = JobQueue(spool.db_path, readonly=True)
        counts, oldest, failed = queue.counts(), queue.oldest_pending(), queue.jobs("failed", limit)
        retrying = queue.retrying(limit)
        delivered = {j.id: queue.delivered_to(j.id) for j in failed}
    else:
        counts, oldest, failed, retrying = dict.fromkeys(STATES, 0), None, [], []

    report = {
        "spool": str(spool.root),
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
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"spool: {spool.root}")
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


@click.command()
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--all", "all_failed", is_flag=True, help="Every failed job.")
@_config_option
def retry(job_ids: tuple[int, ...], all_failed: bool, config_path: str) -> None:
    """Put failed jobs (JOB_IDS from `status`, or --all) back in the queue; works while the node
    runs, whose worker takes them within a second. Their reason files are removed; the reason
    stays in each job's last error until it is done."""
    from dicom_node.config import load_config
    from dicom_node.jobs import JobQueue
    from dicom_node.retry import retry_failed
    from dicom_node.spool import Spool

    if bool(job_ids) == all_failed:
        raise click.UsageError("give the failed jobs' ids, or --all")
    config = load_config(config_path)
    spool = Spool(config.spool.dir)
    if not spool.db_path.exists():
        raise click.UsageError(f"no queue at {spool.db_path}: has the node run with this config?")
    result = retry_failed(spool, JobQueue(spool.db_path), None if all_failed else list(job_ids))
    for job in result.requeued:
        click.echo(f"job {job.id} {job.sop_instance_uid}: queued again (it had failed: {job.last_error})")
    for job in result.superseded:
        click.echo(f"job {job.id} {job.sop_instance_uid}: not retried, the instance was received again since")
    if result.unknown:
        click.echo(f"not failed, or unknown: {', '.join(map(str, result.unknown))}", err=True)
        sys.exit(1)
    click.echo(f"{len(result.requeued)} job(s) queued again")
