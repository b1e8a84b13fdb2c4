"""config.toml: parsed once into frozen dataclasses, validated with messages that name the key.

The key names are the contract (see the README). Relative paths resolve against the
directory of the config file, so a node started from any working directory finds its
spool, weights and outbox.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError

DEFAULT_CONFIG = "config.toml"
#: [model] output_transfer_syntax values (all lossless; dicom_node.writer.OUTPUT_SYNTAXES maps them to UIDs)
OUTPUT_TRANSFER_SYNTAXES = ("explicit", "jpeg2000-lossless", "rle", "jpeg-ls-lossless")
#: [model] on_failure: what becomes of an image the model could not enhance
ON_FAILURE = ("forward-original", "hold")


@dataclass(frozen=True)
class TlsSettings:
    """DICOM over TLS (PS3.15 B.1). On the node: its certificate and key, the CA its clients'
    certificates must chain to. On a destination: the CA the PACS's certificate must chain to
    (None: the system's), an optional client certificate, and the name to check."""
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False   # node only
    server_hostname: str | None = None  # destination only: default its host
    verify: bool = True  # destination only; False only for `echo` of the node itself


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "ENHANCE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 10
    # A connection that never sends an A-ASSOCIATE-RQ (a port probe) holds an association
    # slot until this ARTIM/ACSE timeout: seconds, not pynetdicom's 30.
    acse_timeout: float | None = 5.0
    dimse_timeout: float | None = None
    network_timeout: float | None = None
    tls: TlsSettings | None = None  # set: TLS only, a plain association is refused


@dataclass(frozen=True)
class SpoolSettings:
    dir: Path = Path("var/spool")


@dataclass(frozen=True)
class ModelSettings:
    weights: Path = Path("model/weights/default.pt")
    device: str = "auto"
    mode: str = "voi"
    enhance: tuple[str, ...] = ("CR", "DX")
    forward_original: bool = True
    parametric_map: bool = False  # also send the maps a, b, wc, ww as a DICOM Parametric Map
    max_burnt_out: float = 0.02  # window guard: widen the window where more of the anatomy would burn out (0 = off)
    output_transfer_syntax: str = "explicit"  # one of OUTPUT_TRANSFER_SYNTAXES
    on_failure: str = "forward-original"  # or "hold": an image that cannot be enhanced is held in failed/


@dataclass(frozen=True)
class WorkerSettings:
    processes: int = 1  # worker processes sharing the queue
    threads: int = 0    # torch (and remap) threads per worker process; 0 = cores // processes
    batch: int = 0      # same-size images per network call; 0 = 8 on a GPU, 1 on the CPU

    def threads_per_process(self, cores: int | None = None) -> int:
        """`threads`, or the cores this process may run on shared out among the processes
        (at least 1): all the workers together use no more threads than there are cores."""
        if self.threads:
            return self.threads
        return max(1, (cores or available_cores()) // self.processes)


def available_cores() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RetrySettings:
    initial_seconds: float = 2.0
    max_seconds: float = 300.0
    give_up_hours: float = 72.0


@dataclass(frozen=True)
class FolderDestination:
    name: str
    path: Path
    type: str = "folder"


@dataclass(frozen=True)
class DicomDestination:
    name: str
    ae_title: str
    host: str
    port: int
    type: str = "dicom"
    tls: TlsSettings | None = None


Destination = FolderDestination | DicomDestination


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default: the page, /health and /metrics say what the node holds
    port: int = 8080
    admin_token: str | None = None  # the status page's retry button needs it; None: retry refused
    thumbnails: bool = True  # before/after pictures on the status page (patient images: see docs/node.md)


@dataclass(frozen=True)
class LoggingSettings:
    format: str = "auto"
    level: str = "info"
    audit: Path | None = None  # JSON lines, one per instance received, derived, delivered (dicom_node.audit)
    audit_max_mb: float = 50.0  # rotated past this size
    audit_backups: int = 10     # rotated files kept


@dataclass(frozen=True)
class Config:
    path: Path
    node: NodeSettings = field(default_factory=NodeSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    destinations: tuple[Destination, ...] = ()
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

    def destination(self, name: str) -> Destination:
        """The destination called `name`; ConfigError listing the known names if none."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise ConfigError(f"{self.path}: no destination named {name!r} (configured: {known})")


# --- validation helpers ------------------------------------------------------------------

class _Section:
    """One TOML table being read: every get names `[section] key` in its error."""

    def __init__(self, source: Path, name: str, table: Any, allowed: set[str]):
        self.source, self.name = source, name
        if not isinstance(table, dict):
            self.fail(None, f"must be a table, got {table!r}")
        self.table = table
        unknown = sorted(set(table) - allowed)
        if unknown:
            self.fail(unknown[0], f"is not a known key (known: {', '.join(sorted(allowed))})")

    def fail(self, key: str | None, problem: str):
        where = f"[{self.name}]" + (f" {key}" if key else "")
        raise ConfigError(f"{self.source.name}: {where} {problem}")

    def _get(self, key, default, kinds, kind_name):
        if key not in self.table:
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            self.fail(key, f"must be {kind_name}, got {value!r}")
        return value

    def string(self, key: str, default: str | None, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default, (str,), "a string")
        if value is None:
            self.fail(key, "is required")
        if choices and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def ae_title(self, key: str, default: str | None) -> str:
        value = self.string(key, default)
        _check_ae_title(value, lambda problem: self.fail(key, problem))
        return value

    def integer(self, key: str, default: int | None, low: int, high: int) -> int:
        value = self._get(key, default, (int,), "an integer")
        if value is None:
            self.fail(key, "is required")
        if not low <= value <= high:
            self.fail(key, f"must be between {low} and {high}, got {value!r}")
        return value

    def number(self, key: str, default: float | None, positive: bool = True) -> float | None:
        value = self._get(key, default, (int, float), "a number")
        if value is not None and positive and value <= 0:
            self.fail(key, f"must be a positive number, got {value!r}")
        return None if value is None else float(value)

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, default, (bool,), "true or false")

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, list(default), (list,), "a list of strings")
        for item in value:
            if not isinstance(item, str):
                self.fail(key, f"must be a list of strings, got item {item!r}")
        return tuple(value)

    def path(self, key: str, default: str | None, base: Path) -> Path:
        value = self.string(key, default)
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)


def _check_ae_title(value: str, fail) -> None:
    if not value.strip():
        fail("must not be empty")
    if len(value) > 16:
        fail(f"must be at most 16 characters, got {value!r}")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        fail(f"must be printable ASCII without backslash, got {value!r}")


def _tls(section: _Section, base: Path, server: bool) -> TlsSettings:
    """[node.tls] (server=True) or a destination's tls table; the files must exist."""
    def existing(key: str) -> Path | None:
        if key not in section.table:
            return None
        path = section.path(key, None, base)
        if not path.is_file():
            section.fail(key, f"no file at {path}")
        return path

    tls = TlsSettings(cert=existing("cert"), key=existing("key"), ca=existing("ca"),
                      require_client_cert=section.boolean("require_client_cert", False) if server else False,
                      server_hostname=None if server else section._get("server_hostname", None, (str,), "a string"))
    if server and (tls.cert is None or tls.key is None):
        section.fail("cert" if tls.cert is None else "key", "is required: the node's certificate and private key (PEM)")
    if (tls.cert is None) != (tls.key is None):
        section.fail("key" if tls.key is None else "cert", "is required with the other: a certificate and its private key")
    if tls.require_client_cert and tls.ca is None:
        section.fail("ca", "is required with require_client_cert: the CA the clients' certificates chain to")
    return tls


def _fraction(section: _Section, key: str, default: float) -> float:
    value = section.number(key, default, positive=False)
    if not 0 <= value < 1:
        section.fail(key, f"must be within [0, 1) (0 turns it off), got {value!r}")
    return value


_MODALITY_NAMES = ("CR", "DX")  # names accepted in [model] enhance besides SOP Class UIDs


def _enhance_entries(section: _Section) -> tuple[str, ...]:
    entries = section.strings("enhance", ("CR", "DX"))
    for entry in entries:
        is_uid = entry.replace(".", "").isdigit() and not entry.startswith(".")
        if entry.upper() not in _MODALITY_NAMES and not is_uid:
            section.fail("enhance", f"entries must be CR, DX or a SOP Class UID, got {entry!r}")
    return tuple(e.upper() if e.upper() in _MODALITY_NAMES else e for e in entries)


def load_config(path: str | Path) -> Config:
    """Read and validate `path`; every problem is a ConfigError naming the key."""
    source = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source.name}: not valid TOML: {exc}") from None
    return parse_config(raw, source)


def parse_config(raw: dict[str, Any], source: Path) -> Config:
    """Validate an already parsed TOML document that was read from `source`."""
    base = source.parent
    top = _Section(source, "config", raw,
                   {"node", "spool", "model", "retry", "worker", "destinations", "logging", "http"})

    s = _Section(source, "node", raw.get("node", {}),
                 {"ae_title", "host", "port", "allowed_calling_aets", "require_called_aet", "max_associations",
                  "acse_timeout", "dimse_timeout", "network_timeout", "tls"})
    allowed = s.strings("allowed_calling_aets", ())
    for aet in allowed:
        _check_ae_title(aet, lambda problem: s.fail("allowed_calling_aets", problem))
    node = NodeSettings(
        ae_title=s.ae_title("ae_title", "ENHANCE"),
        host=s.string("host", "127.0.0.1"),
        port=s.integer("port", 11112, 0, 65535),
        allowed_calling_aets=allowed,
        require_called_aet=s.boolean("require_called_aet", True),
        max_associations=s.integer("max_associations", 10, 1, 1000),
        acse_timeout=s.number("acse_timeout", 5.0),
        dimse_timeout=s.number("dimse_timeout", None),
        network_timeout=s.number("network_timeout", None),
        tls=None if "tls" not in s.table else _tls(_Section(source, "node.tls", s.table["tls"],
                                                            {"cert", "key", "ca", "require_client_cert"}), base, server=True),
    )

    s = _Section(source, "spool", raw.get("spool", {}), {"dir"})
    spool = SpoolSettings(dir=s.path("dir", "var/spool", base))

    s = _Section(source, "model", raw.get("model", {}),
                 {"weights", "device", "mode", "enhance", "forward_original", "parametric_map", "max_burnt_out",
                  "output_transfer_syntax", "on_failure"})
    device = s.string("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()):
        s.fail("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
    model = ModelSettings(
        weights=s.path("weights", "model/weights/default.pt", base),
        device=device,
        mode=s.string("mode", "voi", ("voi", "burn-in")),
        enhance=_enhance_entries(s),
        forward_original=s.boolean("forward_original", True),
        parametric_map=s.boolean("parametric_map", False),
        max_burnt_out=_fraction(s, "max_burnt_out", 0.02),
        output_transfer_syntax=s.string("output_transfer_syntax", "explicit", OUTPUT_TRANSFER_SYNTAXES),
        on_failure=s.string("on_failure", "forward-original", ON_FAILURE),
    )

    s = _Section(source, "retry", raw.get("retry", {}),
                 {"initial_seconds", "max_seconds", "give_up_hours"})
    retry = RetrySettings(
        initial_seconds=s.number("initial_seconds", 2.0),
        max_seconds=s.number("max_seconds", 300.0),
        give_up_hours=s.number("give_up_hours", 72.0),
    )
    if retry.max_seconds < retry.initial_seconds:
        s.fail("max_seconds", f"must be at least initial_seconds ({retry.initial_seconds:g}),"
                              f" got {retry.max_seconds:g}")

    s = _Section(source, "worker", raw.get("worker", {}), {"processes", "threads", "batch"})
    worker = WorkerSettings(processes=s.integer("processes", 1, 1, 64), threads=s.integer("threads", 0, 0, 1024),
                            batch=s.integer("batch", 0, 0, 256))

    entries = raw.get("destinations", [])
    if not isinstance(entries, list) or not entries:
        top.fail("destinations", "must be one or more [[destinations]] tables")
    destinations: list[Destination] = []
    for i, entry in enumerate(entries):
        label = f"destinations #{i + 1}"
        if not isinstance(entry, dict):
            top.fail("destinations", f"#{i + 1} must be a table, got {entry!r}")
        kind = entry.get("type")
        if kind == "folder":
            s = _Section(source, label, entry, {"name", "type", "path"})
            dest: Destination = FolderDestination(name=s.string("name", None),
                                                  path=s.path("path", None, base))
        elif kind == "dicom":
            s = _Section(source, label, entry, {"name", "type", "ae_title", "host", "port", "tls"})
            tls = None if "tls" not in entry else _tls(
                _Section(source, f"{label} tls", entry["tls"], {"cert", "key", "ca", "server_hostname"}), base, server=False)
            dest = DicomDestination(name=s.string("name", None),
                                    ae_title=s.ae_title("ae_title", None),
                                    host=s.string("host", None),
                                    port=s.integer("port", None, 1, 65535), tls=tls)
        else:
            raise ConfigError(f"{source.name}: [{label}] type must be \"folder\" or \"dicom\","
                              f" got {kind!r}")
        if any(d.name == dest.name for d in destinations):
            s.fail("name", f"{dest.name!r} is used by two destinations")
        destinations.append(dest)

    s = _Section(source, "logging", raw.get("logging", {}), {"format", "level", "audit", "audit_max_mb", "audit_backups"})
    logging = LoggingSettings(
        format=s.string("format", "auto", ("auto", "json", "console")),
        level=s.string("level", "info", ("debug", "info", "warning", "error")),
        audit=s.path("audit", None, base) if s.table.get("audit") else None,
        audit_max_mb=s.number("audit_max_mb", 50.0),
        audit_backups=s.integer("audit_backups", 10, 0, 1000),
    )
    s = _Section(source, "http", raw.get("http", {}), {"enabled", "host", "port", "admin_token", "thumbnails"})
    http = HttpSettings(enabled=s.boolean("enabled", True), host=s.string("host", "127.0.0.1"),
                        port=s.integer("port", 8080, 0, 65535), admin_token=s.string("admin_token", "") or None,
                        thumbnails=s.boolean("thumbnails", True))
    return Config(path=source, node=node, spool=spool, model=model, retry=retry, worker=worker,
                  destinations=tuple(destinations), logging=logging, http=http)
