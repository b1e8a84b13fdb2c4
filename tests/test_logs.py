"""The node and its worker processes share one stderr: every JSON log line must reach it whole."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOGGING_PROCESS = """
import structlog
from dicom_node.logs import configure_logging
configure_logging("json", "info")
log = structlog.get_logger()
for i in range(500):
    log.info("worker stopped", pid=1234, i=i, process="worker-x")
"""


def test_json_lines_of_several_processes_on_one_stderr_stay_whole(tmp_path):
    shared = tmp_path / "node.log"
    with open(shared, "ab") as f:  # as the node's stderr is redirected to a file
        procs = [subprocess.Popen([sys.executable, "-c", LOGGING_PROCESS], stdout=f, stderr=f, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(4)]
        assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    lines = shared.read_text().splitlines()
    assert len(lines) == 4 * 500
    events = [json.loads(line) for line in lines]  # a line written in two pieces would not parse
    assert sorted(e["i"] for e in events) == sorted(list(range(500)) * 4)
