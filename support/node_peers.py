"""Real peers for the node tests and the ingest benchmark: our node as a subprocess, Orthanc,
DCMTK storescu/storescp. Loopback only, free ports, every process stopped by its owner."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # else ~40 ms stall per image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def storescu(files, port: int, calling: str = "MODALITY", called: str = "ENHANCE",
             extra: tuple[str, ...] = ("-xv",), timeout: float = 120) -> subprocess.CompletedProcess:
    """DCMTK storescu, one association for all `files`; -xv also proposes JPEG 2000 lossless."""
    cmd = ["storescu", "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def storescp(folder: Path, aet: str, port: int, fork: bool = False):
    """DCMTK's storescp writing what it receives into `folder` (made here), until the block ends.
    `fork`: a process per association (else it serves one at a time); the whole process group is
    stopped at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", *(["--fork"] if fork else []), "-aet", aet, "-od", str(folder), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: port_open(port), 15, what="storescp to listen")
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the forked children too
        proc.wait(10)


def copies_with_new_uids(source: Path, folder: Path, n: int, prefix: str = "img") -> list[Path]:
    """`n` copies of `source`, each a new instance (new SOP Instance UID) in one new series."""
    folder.mkdir(parents=True, exist_ok=True)
    series, paths = generate_uid(), []
    for i in range(n):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        path = folder / f"{prefix}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class NodeProcess:
    """`dicom-node serve` in its own process group (so kill -9 takes its worker too)."""

    def __init__(self, folder: Path, weights: Path, destinations: list[dict], *, port: int | None = None,
                 allowed: tuple[str, ...] = (), retry=(0.3, 1.0), forward_original: bool = True,
                 enhance: tuple[str, ...] = ("CR", "DX"), http_port: int | None = None,
                 admin_token: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = self.folder / "config.toml"
        self.log = self.folder / "node.log"
        self.spool = self.folder / "spool"
        self.proc: subprocess.Popen | None = None
        lines = [
            "[node]", 'ae_title = "ENHANCE"', 'host = "127.0.0.1"', f"port = {self.port}",
            f"allowed_calling_aets = {json.dumps(list(allowed))}", "max_associations = 10",
            "dimse_timeout = 10", "network_timeout = 10",  # acse_timeout: the default (5 s)
            "[spool]", 'dir = "spool"',
            "[model]", f"weights = {json.dumps(str(weights))}", 'device = "cpu"', 'mode = "voi"',
            f"enhance = {json.dumps(list(enhance))}",
            f"forward_original = {'true' if forward_original else 'false'}",
            "[retry]", f"initial_seconds = {retry[0]}", f"max_seconds = {retry[1]}", "give_up_hours = 1",
            "[logging]", 'format = "json"', 'level = "info"',
            "[http]", f"enabled = {'true' if http_port else 'false'}", f"port = {http_port or 0}",
            *([f"admin_token = {json.dumps(admin_token)}"] if admin_token else []),
        ]
        for dest in destinations:
            lines.append("[[destinations]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in dest.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args,
             "--config", str(self.config)],
            cwd=REPO, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)})

    def start(self) -> NodeProcess:
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve",
             "--config", str(self.config)],
            cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 30,
                   what="the node to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited at start:\n{self.log.read_text()}")
        return self

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log_file.close()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(10)
        try:  # the worker is in the same group; make sure nothing outlives the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log_file.close()
        return rc

    def status(self) -> dict:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_drained(self, expected_done: int | None = None, timeout: float = 60) -> dict:
        """Until nothing is received/processing (and `expected_done` jobs are done)."""
        def drained():
            report = self.status()
            c = report["counts"]
            idle = c["received"] == 0 and c["processing"] == 0
            if idle and (expected_done is None or c["done"] + c["failed"] >= expected_done):
                return report
            return None
        return wait_until(drained, timeout, 0.3, "the node's queue to drain")


class Orthanc:
    """A real Orthanc on loopback with its own storage; REST for assertions."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", record_stores: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stores_log = self.folder / "stores.txt"
        self.aet, self.dicom_port, self.http_port = aet, free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "node-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "StorageCompression": False,
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": aet,
            "DicomPort": self.dicom_port, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "Plugins": [], "ConcurrentJobs": 1,
            "HttpThreadsCount": 4, "DicomThreadsCount": 2, "SaveJobs": False,
        }
        if record_stores:  # every store, a repeated one too (Orthanc then overwrites), one line each
            script = self.folder / "record.lua"
            script.write_text('function OnStoredInstance(instanceId, tags, metadata, origin)\n'
                              f'  local f = io.open("{self.stores_log}", "a")\n'
                              '  f:write(tags["SOPInstanceUID"] .. "\\n")\n  f:close()\nend\n')
            config.update({"LuaScripts": [str(script)], "OverwriteInstances": True})
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps(config))

    @property
    def destination(self) -> dict:
        return {"name": "pacs", "type": "dicom", "ae_title": self.aet, "host": "127.0.0.1",
                "port": self.dicom_port}

    def start(self) -> Orthanc:
        self._log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self._alive(), 30, 0.2, "Orthanc to start")
        return self

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return port_open(self.dicom_port)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self._log.close()

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def sop_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance (one entry per stored instance)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")]

    def stores(self) -> list[str]:
        """SOP Instance UIDs of every store Orthanc took, repeats included (record_stores)."""
        return self.stores_log.read_text().split() if self.stores_log.exists() else []

    def instance_ids(self) -> dict[str, str]:
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in self.get("/instances?expand")}

    def dataset(self, orthanc_id: str) -> pydicom.Dataset:
        from io import BytesIO
        return pydicom.dcmread(BytesIO(self.get(f"/instances/{orthanc_id}/file")))

    def transfer_syntax(self, orthanc_id: str) -> str:
        return self.get(f"/instances/{orthanc_id}/metadata/TransferSyntax").decode()
