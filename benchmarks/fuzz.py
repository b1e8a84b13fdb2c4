"""Fuzz, the full scenario: N mutated inputs (support/fuzz_inputs.py: truncated, flipped header
bytes, absurd lengths, a wrong transfer syntax in the meta, a non-image class, an empty data set)
sent raw with pynetdicom to a node with the bundled model and a folder destination; then a valid
CR. Prints one line:

    sent N acked A accounted A unaccounted 0 alive yes valid-cr enhanced

(accounted = acknowledged inputs forwarded or held in failed/ with a reason).

    .venv/bin/python benchmarks/fuzz.py [--n 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.stamp import cpu_description, git_commit  # noqa: E402
from dicom_node.writer import is_derived_by_us  # noqa: E402
from model import DEFAULT_WEIGHTS  # noqa: E402
from support.fuzz_inputs import accounted_uids, send_raw, write_mutated_inputs  # noqa: E402
from support.node_peers import NodeProcess, copies_with_new_uids, storescu  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # pydicom warns about every broken file read back
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        tmp = Path(tmp)
        outbox = tmp / "outbox"
        node = NodeProcess(tmp / "node", DEFAULT_WEIGHTS, [{"name": "archive", "type": "folder", "path": str(outbox)}],
                           retry=(0.2, 0.5)).start()
        try:
            inputs = write_mutated_inputs(tmp / "inputs", args.n, seed=args.seed)
            acked = {uid: kind for kind, uid, path in inputs if send_raw(node.port, path) == 0x0000}
            alive = node.proc.poll() is None
            node.wait_drained(timeout=600)
            unaccounted = set(acked) - accounted_uids(outbox, node.spool / "failed")
            (cr,) = copies_with_new_uids(Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm")), tmp / "valid", 1)
            sent = storescu([cr], node.port).returncode == 0
            node.wait_drained(timeout=120)
            source = str(pydicom.dcmread(cr, stop_before_pixels=True).SOPInstanceUID)
            enhanced = sent and any(
                is_derived_by_us(ds) and str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) == source
                for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in outbox.rglob("*.dcm")))
            alive = alive and node.proc.poll() is None
            kinds = Counter(acked.values())
        finally:
            node.stop()
    print(f"fuzz: commit {git_commit()}; {cpu_description()}; {args.n} mutated inputs, seed {args.seed}")
    print("acked by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"sent {args.n} acked {len(acked)} accounted {len(acked) - len(unaccounted)} unaccounted {len(unaccounted)} "
          f"alive {'yes' if alive else 'NO'} valid-cr {'enhanced' if enhanced else 'NOT enhanced'}")
    return 0 if alive and not unaccounted and enhanced else 1


if __name__ == "__main__":
    sys.exit(main())
