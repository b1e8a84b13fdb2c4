"""Ingest benchmark: the same N files sent by DCMTK storescu to DCMTK storescp and to our
node (enhancement off, then on), in one run, on loopback.

Printed per receiver: throughput (images/s, MB/s) and mean per-image acknowledgement
latency (C-STORE request sent -> response received, from storescu's millisecond log), as
ratios to storescp; for the node also the end-to-end time from the first byte sent until
the last (enhanced) image is in the folder destination. Target: node ingest >= 0.5x the
throughput of storescp.

    .venv/bin/python benchmarks/ingest.py [--n 100] [--size 1024] [--weights PATH]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from support.node_peers import (  # noqa: E402
    DCMTK_ENV, NodeProcess, copies_with_new_uids, free_port, port_open, wait_until,
)

LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %m%n
"""
_LINE = re.compile(r"^(\d+\.\d+) (Sending Store Request|Received Store Response \((\w+))")


def send(files: list[Path], port: int, called: str, log_config: Path) -> tuple[float, float, float]:
    """storescu, one association; returns (start, seconds, mean ack latency in s)."""
    started = time.time()
    t0 = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-lc", str(log_config), "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
         *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    sent, latencies, failures = None, [], 0
    for line in (result.stdout + result.stderr).splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        if match.group(2).startswith("Sending"):
            sent = float(match.group(1))
        elif sent is not None:
            latencies.append(float(match.group(1)) - sent)
            failures += match.group(3) != "Success"
            sent = None
    if result.returncode != 0 or failures or len(latencies) != len(files):
        raise RuntimeError(f"storescu to {called} failed ({failures} failures, "
                           f"{len(latencies)} responses):\n{result.stderr[-2000:]}")
    return started, seconds, sum(latencies) / len(latencies)


def count_files(folder: Path, exclude_series: str | None = None) -> int:
    return sum(1 for p in folder.rglob("*.dcm") if not p.name.startswith(".")
               and (exclude_series is None or p.parent.name != exclude_series))


def run_storescp(files, work: Path, log_config: Path):
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "--output-directory", str(out), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 10, 0.05, "storescp")
        _, seconds, latency = send(files, port, "STORESCP", log_config)
    finally:
        proc.terminate()
        proc.wait(10)
    return seconds, latency


def run_node(files, work: Path, log_config: Path, weights: Path, enhance: bool, series_uid: str):
    folder = work / ("node-enhance" if enhance else "node-plain")
    shutil.rmtree(folder, ignore_errors=True)
    outbox = folder / "outbox"
    node = NodeProcess(folder, weights, [{"name": "archive", "type": "folder", "path": str(outbox)}],
                       enhance=("CR", "DX") if enhance else ())
    node.config.write_text(node.config.read_text().replace('device = "cpu"', 'device = "auto"'))
    node.start()
    try:
        wait_until(lambda: "worker ready" in node.log.read_text(), 300, 0.1, "the worker")
        started, seconds, latency = send(files, node.port, "ENHANCE", log_config)
        # the last image in the destination: the originals, and for enhancement the
        # derived instances (which live in their own series)
        wait_until(lambda: count_files(outbox) >= (2 if enhance else 1) * len(files), 3600, 0.02,
                   "every image in the destination")
        end_to_end = time.time() - started
        derived = count_files(outbox, exclude_series=series_uid)
        assert derived == (len(files) if enhance else 0), derived
    finally:
        rc = node.stop()
    assert rc == 0, f"node exited with {rc}"
    return seconds, latency, end_to_end


def durable_floor(files, work: Path) -> float:
    """Seconds for the spool alone to make `files` durable the way the SCP does (tmp file,
    fsync, rename, job commit with synchronous=FULL, folder fsync): no network, no DICOM.
    The node cannot acknowledge faster than this on this disk."""
    from dicom_node.jobs import JobQueue
    from dicom_node.spool import Spool

    folder = work / "floor"
    shutil.rmtree(folder, ignore_errors=True)
    spool = Spool(folder).create()
    queue = JobQueue(spool.db_path)
    blobs = [p.read_bytes() for p in files]
    t0 = time.perf_counter()
    for i, data in enumerate(blobs):
        path = spool.store_received(data, f"1.2.3.{i}", sync_dir=False)
        queue.add(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.1", path)
        spool.sync_incoming()
    seconds = time.perf_counter() - t0
    queue.close()
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="images sent to each receiver")
    parser.add_argument("--size", type=int, default=1024, help="rows = columns of the synthetic CR")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--weights", type=Path, default=REPO / "model" / "weights" / "default.pt")
    args = parser.parse_args(argv)

    import pydicom

    from support.helpers import make_constant_checkpoint, phantom_dataset

    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        weights, weights_note = args.weights, str(args.weights)
        if not weights.is_file():
            weights = make_constant_checkpoint(work / "constant.pt")
            weights_note = f"{args.weights} missing: support.helpers constant checkpoint (same code path, tiny net)"
        source = work / "source.dcm"
        phantom_dataset(rows=args.size, cols=args.size, bits=12, seed=7).save_as(source, enforce_file_format=True)
        files = copies_with_new_uids(source, work / "files", args.n, prefix="cr")
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        mb = sum(p.stat().st_size for p in files) / 1e6
        log_config = work / "log.cfg"
        log_config.write_text(LOG_CONFIG)

        # The receivers take turns, round after round, so that load from elsewhere on the
        # machine falls on all of them alike; the medians are reported.
        runs = {"storescp": [], "off": [], "on": []}
        floors = []
        for _ in range(args.rounds):
            runs["storescp"].append((*run_storescp(files, work, log_config), None))
            floors.append(durable_floor(files, work))
            runs["off"].append(run_node(files, work, log_config, weights, False, series_uid))
            runs["on"].append(run_node(files, work, log_config, weights, True, series_uid))
        (base_s, base_lat, _), (plain_s, plain_lat, plain_e2e), (enh_s, enh_lat, enh_e2e) = (
            tuple(statistics.median(r[i] for r in runs[k]) if k != "storescp" or i < 2 else None
                  for i in range(3)) for k in ("storescp", "off", "on"))

        print(f"ingest benchmark: {args.n} synthetic CR images {args.size}x{args.size} "
              f"({mb:.1f} MB), storescu (TCP_NODELAY=1) on loopback, one association each; "
              f"median of {args.rounds} alternating rounds")
        print(f"weights: {weights_note}; machine: {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the end")
        header = f"{'receiver':<28}{'images/s':>10}{'MB/s':>9}{'x storescp':>12}{'ack ms':>9}" \
                 f"{'x storescp':>12}{'end-to-end s':>14}"
        print(header)
        print("-" * len(header))
        for name, secs, lat, e2e in [("DCMTK storescp", base_s, base_lat, None),
                                     ("node, enhancement off", plain_s, plain_lat, plain_e2e),
                                     ("node, enhancement on", enh_s, enh_lat, enh_e2e)]:
            print(f"{name:<28}{args.n / secs:>10.1f}{mb / secs:>9.1f}{base_s / secs:>12.2f}"
                  f"{lat * 1000:>9.2f}{lat / base_lat:>12.2f}"
                  f"{'' if e2e is None else f'{e2e:.2f}':>14}")
        floor_s = statistics.median(floors)
        print(f"{'(spool alone, no network)':<28}{args.n / floor_s:>10.1f}{mb / floor_s:>9.1f}"
              f"{base_s / floor_s:>12.2f}{floor_s / args.n * 1000:>9.2f}{floor_s / args.n / base_lat:>12.2f}")
        print("  the last row is the durability floor: tmp file + fsync + rename + SQLite commit"
              " (synchronous=FULL) + folder fsync per image, the node's upper bound on this disk")
        ratio = min(base_s / plain_s, base_s / enh_s)
        print(f"target: node ingest >= 0.50x storescp throughput -> "
              f"{'met' if ratio >= 0.5 else 'NOT met'} (worst {ratio:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
