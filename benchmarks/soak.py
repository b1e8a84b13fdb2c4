"""Soak: does the node ever lose or duplicate an image? Counted in a real Orthanc.

N instances (a third real CR, enhanced; the rest CT and MR, passed through) are sent by DCMTK
storescu from 3 parallel senders, each an association of up to 25 files at a time; a file
whose store was not acknowledged is sent again, as a modality does. Meanwhile the node is
`kill -9`ed (with its worker) K times and restarted, and Orthanc is stopped for S seconds, at
random moments of the run's progress (half the share acknowledged, half the share of the
originals in Orthanc: faults land while images arrive and while the worker enhances and
forwards them). Orthanc records every store it takes (a Lua hook; a repeat overwrites), so

    sent N acked N delivered N lost 0 duplicated D

counts by SOP Instance UID: acked = acknowledged instances, delivered = acknowledged ones in
Orthanc, lost = acknowledged and not delivered, duplicated = instances Orthanc was sent more
than once (delivery is at least once: a kill between a send and its record sends again; the
PACS keeps one instance). For the CRs: each has exactly one enhanced instance in Orthanc, and
no two enhanced instances share a source.

    .venv/bin/python benchmarks/soak.py [--n 1000] [--kills 3] [--outage 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.stamp import cpu_description, git_commit  # noqa: E402
from model import DEFAULT_WEIGHTS  # noqa: E402
from support.node_peers import DCMTK_ENV, NodeProcess, Orthanc, copies_with_new_uids, wait_until  # noqa: E402

_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


def small_cr(folder: Path) -> Path:
    """pydicom-data's real chest RG1 at a quarter of its size (a real CR, quick to enhance)."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    small = ds.pixel_array[::4, ::4].astype(ds.pixel_array.dtype)
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = np.ascontiguousarray(small).tobytes()
    path = folder / "cr-small.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def acknowledged(files: list[Path], port: int) -> set[Path]:
    """storescu of `files` in one association; the files it got Success for."""
    run = subprocess.run(["storescu", "-v", "-aet", "MODALITY", "-aec", "ENHANCE", "127.0.0.1", str(port),
                          *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
    done, current = set(), None
    for line in (run.stdout + run.stderr).splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            if m.group(1) == "Success":
                done.add(current)
            current = None
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--outage", type=float, default=60.0, help="seconds Orthanc is down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        n_cr = args.n // 3
        from pydicom.data import get_testdata_file

        files = copies_with_new_uids(small_cr(tmp), tmp / "cr", n_cr, "cr")
        rest = args.n - n_cr
        files += copies_with_new_uids(Path(get_testdata_file("CT_small.dcm")), tmp / "ct", rest // 2, "ct")
        files += copies_with_new_uids(Path(get_testdata_file("MR_small.dcm")), tmp / "mr", rest - rest // 2, "mr")
        rng.shuffle(files)
        uid = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        cr_uids = {uid[p] for p in files if p.parent.name == "cr"}

        orthanc = Orthanc(tmp / "orthanc", record_stores=True).start()
        node = NodeProcess(tmp / "node", Path(args.weights), [orthanc.destination], retry=(0.5, 5.0)).start()
        acked: set[Path] = set()
        lock = threading.Lock()
        queues = [files[i::3] for i in range(3)]
        events: list[str] = []

        def sender(todo: list[Path]):
            while todo:
                batch, todo[:] = todo[:25], todo[25:]
                got = acknowledged(batch, node.port)
                with lock:
                    acked.update(got)
                missed = [p for p in batch if p not in got]
                if missed:  # the node was down: send those again, as a modality does
                    todo.extend(missed)
                    time.sleep(0.5)

        in_pacs_count = [0]

        def progress() -> float:
            """Half receiving (acknowledged), half delivering (originals in Orthanc): kills land
            while images arrive and while the worker enhances and forwards them."""
            if orthanc.proc is not None and orthanc.proc.poll() is None:
                try:
                    in_pacs_count[0] = len(set(orthanc.sop_uids()) & set(uid.values()))
                except OSError:
                    pass
            with lock:
                return (len(acked) + in_pacs_count[0]) / (2 * len(files))

        def chaos():
            kill_at = sorted(rng.uniform(0.1, 0.9) for _ in range(args.kills))
            outage_at = rng.uniform(0.2, 0.4)
            outage_done = False
            while kill_at or not outage_done:
                share = progress()
                if kill_at and share >= kill_at[0]:
                    kill_at.pop(0)
                    node.kill9()
                    events.append(f"kill -9 at {share:.0%}")
                    time.sleep(rng.uniform(0.5, 2.0))
                    node.start()
                if not outage_done and share >= outage_at:
                    orthanc.stop()
                    events.append(f"Orthanc down at {share:.0%}")
                    threading.Timer(args.outage, orthanc.start).start()
                    outage_done = True
                if share >= 1:
                    break
                time.sleep(0.5)

        senders = [threading.Thread(target=sender, args=(q,)) for q in queues]
        chaos_thread = threading.Thread(target=chaos)
        for t in [*senders, chaos_thread]:
            t.start()
        for t in senders:
            t.join()
        sent_seconds = time.time() - started
        chaos_thread.join()
        wait_until(lambda: orthanc.proc is not None and orthanc.proc.poll() is None and orthanc._alive(),
                   args.outage + 60, 1.0, "Orthanc back")
        node.wait_drained(timeout=1800)
        in_pacs = set(orthanc.sop_uids())
        acked_uids = {uid[p] for p in acked}
        stores = Counter(orthanc.stores())
        lost = acked_uids - in_pacs
        duplicated = sum(1 for u, c in stores.items() if c > 1)
        # the enhanced instances: what is in Orthanc beyond what was sent
        sent_uids = set(uid.values())
        derived = {u: i for u, i in orthanc.instance_ids().items() if u not in sent_uids}
        sources = Counter()
        for orthanc_id in derived.values():
            tags = orthanc.get(f"/instances/{orthanc_id}/tags?simplify")
            sources[tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]] += 1
        derived_uids = set(derived)
        derived_repeats = sum(1 for u in derived_uids if stores[u] > 1)
        missing_enhanced = len(cr_uids & acked_uids) - sum(1 for u in cr_uids if sources[u] >= 1)
        shared = sum(1 for u, c in sources.items() if c > 1)
        node.stop()
        orthanc.stop()
    line = (f"sent {len(files)} acked {len(acked_uids)} delivered {len(acked_uids & in_pacs)} "
            f"lost {len(lost)} duplicated {duplicated}")
    print(f"soak: commit {git_commit()}; {cpu_description()}; {args.n} instances ({n_cr} CR enhanced, the rest CT/MR), "
          f"3 parallel storescu, {args.kills} x kill -9, Orthanc down {args.outage:g} s; seed {args.seed}")
    print("events: " + "; ".join(events))
    print(line)
    print(f"CR {len(cr_uids)}: enhanced in Orthanc {len(cr_uids) - missing_enhanced}, without one {missing_enhanced}, "
          f"sources with two enhanced {shared}, enhanced sent twice {derived_repeats}")
    print(f"sending took {sent_seconds:.0f} s, all in Orthanc after {time.time() - started:.0f} s")
    return 0 if not lost and not missing_enhanced and not shared else 1


if __name__ == "__main__":
    sys.exit(main())
