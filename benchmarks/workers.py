"""Images per second of the node's worker with 1 and with 2 worker processes ([worker] processes).

    .venv/bin/python -m benchmarks.workers [--n 24] [--rows 2500 --cols 2000] [--processes 1 2] [--repeats 2]
                                           [--threads 1 --pin]

The node's real path minus the SCP: real worker processes (`dicom_node.worker.main`, spawned as
the node spawns them, each with [worker] threads at its default, cores / processes), the real
spool and SQLite queue, the shipped model, a folder destination. Once every worker is ready
(holds its slot's lock, the model loaded), N synthetic 12-bit CR files are stored in the spool
and queued at once, as the SCP would, and the time until the last job is done is measured:
images/s = N / that time. The configurations are run in turn, `--repeats` rounds, and the
median of each is given; the figure is the ratio of 2 workers to 1 (target >= 1.6x) and the
images per day per core that go into the README's sizing paragraph.

With --pin every worker process (all its threads) is held to a core of its own (worker i on
core i): what a worker does with one core, and whether a second worker on a second core adds
as much, on a machine whose one worker would otherwise use every core (this one: 2 cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.stamp import cpu_description, git_commit
from dicom_node.config import available_cores, load_config
from dicom_node.jobs import JobQueue
from dicom_node.spool import Spool
from model import DEFAULT_WEIGHTS
from support.helpers import phantom_dataset, worker_processes, write_worker_config


def pin_to_cores(procs) -> None:
    """Every thread of worker process i onto core i alone (threads started later inherit it)."""
    cores = sorted(os.sched_getaffinity(0))
    for i, proc in enumerate(procs):
        for thread in os.listdir(f"/proc/{proc.pid}/task"):
            os.sched_setaffinity(int(thread), {cores[i % len(cores)]})


def run_once(folder: Path, sources: list[Path], weights: str, processes: int, threads: int,
             device: str = "cpu", batch: int = 0, pin: bool = False) -> tuple[float, float]:
    """Seconds for `processes` workers to work every file in `sources` (after they are ready),
    and the mean seconds per job of the worker's own enhancement (as /metrics reports it)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config_path = write_worker_config(folder, weights, processes, threads, level="error", device=device, batch=batch)
    config = load_config(config_path)
    spool = Spool(config.spool.dir).create()
    queue = JobQueue(spool.db_path)
    with worker_processes(config_path, processes, log_level="warning") as (procs, wake):
        time.sleep(1.0)  # past "worker ready": idle, waiting for work
        if pin:
            pin_to_cores(procs)
        blobs = [(path.read_bytes(), path.stem) for path in sources]
        started = time.perf_counter()
        for data, uid in blobs:  # as the SCP stores and queues a received instance
            path = spool.store_received(data, uid)
            queue.add(uid, "1.2.840.10008.5.1.4.1.1.1", path)
        wake.set()
        while True:
            counts = queue.counts()
            if counts["done"] + counts["failed"] == len(sources):
                break
            if time.perf_counter() - started > 1800:
                raise SystemExit(f"not done after 30 min: {counts}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        if counts["failed"]:
            raise SystemExit(f"{counts['failed']} jobs failed")
        if len(list((folder / "outbox").rglob("*.dcm"))) != 2 * len(sources):
            raise SystemExit("the outbox does not hold an original and a derived instance per image")
        _, count, total = queue.timing_histogram("enhance")[""]
        return elapsed, total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="images per run")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=0, help="[worker] threads (0: cores / processes)")
    parser.add_argument("--pin", action="store_true",
                        help="each worker process on a core of its own (with --threads 1 unless given)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the configurations")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--device", default="cpu", help="[model] device of the workers (cuda on a GPU machine)")
    parser.add_argument("--batch", type=int, nargs="+", default=[0],
                        help="[worker] batch, one configuration each (0: 8 on a GPU, 1 on the CPU)")
    args = parser.parse_args(argv)
    if args.pin and not args.threads:
        args.threads = 1  # one core each: more threads would only take turns on it

    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        tmp = Path(tmp)
        sources = []
        for i in range(args.n):
            ds = phantom_dataset(args.rows, args.cols, 12, seed=i)
            path = tmp / "sources" / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            sources.append(path)
        configurations = [(processes, batch) for batch in args.batch for processes in args.processes]
        times = {c: [] for c in configurations}
        per_job = {c: [] for c in configurations}
        for _ in range(args.repeats):
            for processes, batch in configurations:
                elapsed, enhance = run_once(tmp / "run", sources, args.weights, processes, args.threads,
                                            args.device, batch, args.pin)
                times[processes, batch].append(elapsed)
                per_job[processes, batch].append(enhance)
    rate = {c: args.n / statistics.median(t) for c, t in times.items()}
    best = {c: args.n / min(t) for c, t in times.items()}
    print(f"workers benchmark: commit {git_commit()}; {cpu_description()}; weights {Path(args.weights).name}; "
          f"device {args.device}")
    print(f"  {args.n} synthetic CR {args.rows}x{args.cols} 12-bit per run, voi, folder destination; "
          f"median of {args.repeats} runs each, in turn" + ("; each worker process on a core of its own" if args.pin else ""))
    for (processes, batch), t in times.items():
        threads = args.threads or max(1, cores // processes)
        used_cores = processes if args.pin else min(cores, processes * threads)
        per_day_core = rate[processes, batch] * 86400 / used_cores
        batch_note = f", [worker] batch {batch}" if args.batch != [0] else ""
        print(f"  {processes} worker(s) x {threads} thread(s){batch_note}: {rate[processes, batch]:6.2f} images/s median, "
              f"{best[processes, batch]:6.2f} best   (runs: {', '.join(f'{x:.1f}' for x in t)} s)   "
              f"{per_day_core:,.0f} images/day per core (median)")
        print(f"      the worker's own enhancement per job (decode, maps, remap, encode, spool write; "
              f"/metrics' dicom_node_enhance_seconds): {statistics.median(per_job[processes, batch]):.3f} s mean, "
              f"median of runs")
    for batch in args.batch:
        base = args.processes[0]
        for processes in args.processes[1:]:
            ratio = rate[processes, batch] / rate[base, batch]
            target = "  (target >= 1.6x: " + ("met)" if ratio >= 1.6 else "NOT met)") if (base, processes) == (1, 2) else ""
            print(f"  ratio {processes} workers / {base}: {ratio:.2f}x from the medians, "
                  f"{best[processes, batch] / best[base, batch]:.2f}x from the best runs{target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
