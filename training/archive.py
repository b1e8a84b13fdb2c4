"""Annotated archives (design.md): read, validate, fit missing maps, cache decoded inputs.

An archive is a folder or a .zip holding `manifest.csv` (columns id, raw, target, params,
split; an optional `group` names the anatomy so evaluation can measure consistency across
its acquisitions) and the files it names. Every problem is an ArchiveError naming the row,
the column and the file.

Rows with params: the target is remap(raw, params) (the params maps are resized to the image).
Rows with only a target: the target is the presentation z. If it carries a SIGMOID window
(as this node's own `voi` output) its pixels are y and the window is read from the tags;
otherwise the window is chosen from robust percentiles of z and y = wc + ww/4 logit(z).
a >= 0 and b are then fitted by local least squares (a guided filter, radius FIT_RADIUS px).

Decoding a 4096² DICOM is slow, so each row is decoded once into a cache folder: x and the
target z at full resolution (float16 .npy, memory-mapped when training crops them) and, per
downsample factor, x and the four maps at low resolution.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from model.remap import downsample_image, inverse_sigmoid_window, remap
from training.errors import ArchiveError

REQUIRED_COLUMNS = ("id", "raw", "target", "params", "split")
SPLITS = ("train", "val", "test")
FIT_RADIUS = 16
CACHE_VERSION = "1"


@dataclass
class Row:
    number: int  # 1-based data row of manifest.csv
    id: str
    raw: str
    target: str
    params: str
    split: str
    group: str

    def where(self, column: str | None = None, file: str | None = None) -> str:
        s = f"manifest.csv row {self.number} (id {self.id!r})"
        if column:
            s += f", column {column!r}"
        if file:
            s += f", file {file!r}"
        return s


class Source:
    """Files of a folder or a .zip, by their manifest-relative names."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path) if path.is_file() else None
        except zipfile.BadZipFile:
            raise ArchiveError(f"archive {path}: not a folder or a .zip file") from None
        if self.zip is None and not path.is_dir():
            raise ArchiveError(f"archive {path}: no such folder or .zip file")
        if self.zip is not None:
            self.names = {n.rstrip("/") for n in self.zip.namelist()}
            # a zip made of a folder may have everything under one top folder
            tops = {n.split("/", 1)[0] for n in self.names}
            self.prefix = f"{tops.pop()}/" if "manifest.csv" not in self.names and len(tops) == 1 else ""

    def exists(self, name: str) -> bool:
        if self.zip is not None:
            return self.prefix + name in self.names
        return (self.path / name).is_file()

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(self.prefix + name)
        return (self.path / name).read_bytes()

    def stamp(self, name: str) -> str:
        """Changes when the file changes (size and time), for the cache key."""
        if self.zip is not None:
            info = self.zip.getinfo(self.prefix + name)
            return f"{info.file_size}-{info.date_time}-{info.CRC}"
        st = (self.path / name).stat()
        return f"{st.st_size}-{st.st_mtime_ns}"


def read_manifest(source: Source) -> list[Row]:
    if not source.exists("manifest.csv"):
        raise ArchiveError(f"archive {source.path}: no manifest.csv")
    text = source.read("manifest.csv").decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ArchiveError(f"archive {source.path}: manifest.csv lacks column(s) {', '.join(missing)}")
    rows, errors, seen = [], [], set()
    for number, rec in enumerate(reader, start=1):
        get = lambda k: (rec.get(k) or "").strip()  # noqa: E731
        row = Row(number, get("id"), get("raw"), get("target"), get("params"), get("split"), get("group") or get("id"))
        if not row.id:
            errors.append(f"{row.where('id')}: empty id")
        elif row.id in seen:
            errors.append(f"{row.where('id')}: duplicate id")
        seen.add(row.id)
        if row.split not in SPLITS:
            errors.append(f"{row.where('split')}: bad split value {row.split!r}, expected one of {', '.join(SPLITS)}")
        if not row.raw:
            errors.append(f"{row.where('raw')}: empty, every row needs a raw DICOM")
        elif not source.exists(row.raw):
            errors.append(f"{row.where('raw', row.raw)}: missing file")
        if not row.target and not row.params:
            errors.append(f"{row.where()}: neither target nor params given, one of them is required")
        for column in ("target", "params"):
            name = getattr(row, column)
            if name and not source.exists(name):
                errors.append(f"{row.where(column, name)}: missing file")
        rows.append(row)
    if not rows:
        errors.append(f"archive {source.path}: manifest.csv has no rows")
    if errors:
        raise ArchiveError(_summarise(errors))
    return rows


def _summarise(errors: list[str], limit: int = 5) -> str:
    more = f"; and {len(errors) - limit} more problem(s)" if len(errors) > limit else ""
    return "; ".join(errors[:limit]) + more


def read_dicom(source: Source, row: Row, column: str, header_only: bool = False):
    import pydicom

    name = getattr(row, column)
    try:
        return pydicom.dcmread(io.BytesIO(source.read(name)), stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises many types for foreign or truncated files
        raise ArchiveError(f"{row.where(column, name)}: unreadable DICOM ({type(exc).__name__}: {exc})") from None


def read_image(source: Source, row: Row, column: str) -> np.ndarray:
    from dicom_node.errors import UnsupportedImage
    from dicom_node.reader import read_radiograph

    ds = read_dicom(source, row, column)
    try:
        return read_radiograph(ds), ds
    except UnsupportedImage as exc:
        raise ArchiveError(f"{row.where(column, getattr(row, column))}: unreadable DICOM ({exc})") from None


def validate_files(source: Source, rows: list[Row]) -> None:
    """Headers of every DICOM readable, target geometry equal to raw, params well-formed."""
    errors = []
    for row in rows:
        try:
            raw = read_dicom(source, row, "raw", header_only=True)
            shape = (int(raw.get("Rows", 0)), int(raw.get("Columns", 0)))
            if 0 in shape:
                raise ArchiveError(f"{row.where('raw', row.raw)}: unreadable DICOM (no Rows/Columns: not an image)")
            if row.target:
                tgt = read_dicom(source, row, "target", header_only=True)
                tshape = (int(tgt.get("Rows", 0)), int(tgt.get("Columns", 0)))
                if tshape != shape:
                    raise ArchiveError(f"{row.where('target', row.target)}: target geometry mismatch, "
                                       f"{tshape[0]}x{tshape[1]} but raw is {shape[0]}x{shape[1]}")
            if row.params:
                load_params(source, row)
        except ArchiveError as exc:
            errors.append(str(exc))
    if errors:
        raise ArchiveError(_summarise(errors))


def load_params(source: Source, row: Row) -> dict:
    try:
        with np.load(io.BytesIO(source.read(row.params))) as npz:
            params = {k: np.asarray(npz[k], dtype=np.float32) for k in ("a", "b", "wc", "ww")}
    except KeyError as exc:
        raise ArchiveError(f"{row.where('params', row.params)}: params lack {exc}, need a, b, wc, ww") from None
    except Exception as exc:
        raise ArchiveError(f"{row.where('params', row.params)}: unreadable .npz ({type(exc).__name__}: {exc})") from None
    for k in ("a", "b"):
        if params[k].ndim != 2:
            raise ArchiveError(f"{row.where('params', row.params)}: {k} must be 2-D, got shape {params[k].shape}")
    for k in ("wc", "ww"):
        if params[k].ndim not in (0, 2):
            raise ArchiveError(f"{row.where('params', row.params)}: {k} must be a scalar or 2-D, got shape {params[k].shape}")
    if (params["a"] < 0).any() or (params["ww"] <= 0).any():
        raise ArchiveError(f"{row.where('params', row.params)}: a must be >= 0 and ww > 0")
    return params


def _resize(m: np.ndarray, shape) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
    if t.dim() == 0 or t.numel() == 1:
        return torch.full(tuple(shape), float(t.reshape(-1)[0]))
    return remap_resize(t, shape)


def remap_resize(t: torch.Tensor, shape) -> torch.Tensor:
    from model.remap import upsample_maps

    return upsample_maps(t[None, None], tuple(shape))[0, 0]


def window_from_tags(ds) -> tuple[float, float] | None:
    """(wc, ww) in [0, 1] units when the target carries a SIGMOID VOI window, else None."""
    from dicom_node.reader import modality_range

    if str(ds.get("VOILUTFunction", "")).upper() != "SIGMOID" or "WindowCenter" not in ds:
        return None
    wc, ww = ds.WindowCenter, ds.WindowWidth
    wc = float(wc[0] if hasattr(wc, "__len__") and not isinstance(wc, str) else wc)
    ww = float(ww[0] if hasattr(ww, "__len__") and not isinstance(ww, str) else ww)
    lo, hi = modality_range(ds)
    return (wc - lo) / (hi - lo), ww / (hi - lo)


def fit_maps(x: np.ndarray, y: np.ndarray, radius: int = FIT_RADIUS, eps: float = 1e-4):
    """Local least squares y ≈ a x + b (a guided filter), a clamped to >= 0."""
    size = 2 * radius + 1
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mx, my = ndimage.uniform_filter(x64, size), ndimage.uniform_filter(y64, size)
    cov = ndimage.uniform_filter(x64 * y64, size) - mx * my
    var = ndimage.uniform_filter(x64 * x64, size) - mx * mx
    a = np.maximum(cov / (var + eps), 0.0)
    b = my - a * mx
    a, b = ndimage.uniform_filter(a, size), ndimage.uniform_filter(b, size)
    # the running sums of the filter can leave -1e-13 where a was 0: a >= 0 keeps the LUT monotonic
    return np.maximum(a, 0.0).astype(np.float32), b.astype(np.float32)


def window_from_presentation(z: np.ndarray) -> tuple[float, float]:
    """A window under which y = wc + ww/4 logit(z) spans [0.05, 0.95] over z's 0.5–99.5 %."""
    zl, zh = np.percentile(z[:: max(1, z.size // 400_000)], [0.5, 99.5])
    zl, zh = (torch.tensor(v, dtype=torch.float64) for v in np.clip([zl, zh], 1e-3, 1 - 1e-3))
    span = max(float(inverse_sigmoid_window(zh, 0.0, 4.0) - inverse_sigmoid_window(zl, 0.0, 4.0)), 1e-3)
    ww = float(np.clip(3.6 / span, 0.02, 1.0))
    wc = float(np.clip(0.05 - float(inverse_sigmoid_window(zl, 0.0, ww)), 0.0, 1.0))  # y(zl) = 0.05
    return wc, ww


@dataclass
class ArchiveItem:
    """One cached row: full-resolution x and target z (memory-mapped), low-res x and maps."""

    id: str
    split: str
    group: str
    x_path: Path
    z_path: Path
    low_path: Path
    exact: bool = False  # its maps are the row's params (ground truth), not fitted to a target

    @property
    def x(self) -> np.ndarray:
        return np.load(self.x_path, mmap_mode="r")

    @property
    def z(self) -> np.ndarray:
        return np.load(self.z_path, mmap_mode="r")

    def low(self) -> tuple[np.ndarray, np.ndarray]:
        """(x_low (h, w), maps_low (4, h, w)) at the archive's downsample factor."""
        with np.load(self.low_path) as npz:
            return npz["x"], npz["maps"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.x.shape)


class Archive:
    """Opens, validates and caches an annotated archive for one downsample factor."""

    def __init__(self, path: str | Path, downsample: int = 8, cache: str | Path | None = None, validate: bool = True):
        self.path = Path(path)
        self.source = Source(self.path)
        self.rows = read_manifest(self.source)
        if validate:
            validate_files(self.source, self.rows)
        self.downsample = downsample
        self.cache = Path(cache) if cache else self.path.parent / f"{self.path.name}.cache"
        self._items: dict[str, ArchiveItem] = {}

    def key(self, row: Row) -> str:
        h = hashlib.sha1(CACHE_VERSION.encode())
        for column in ("raw", "target", "params"):
            name = getattr(row, column)
            h.update(f"{column}={name}:{self.source.stamp(name) if name else ''};".encode())
        return f"{row.id}-{h.hexdigest()[:16]}"

    def item(self, row: Row) -> ArchiveItem:
        if row.id in self._items:
            return self._items[row.id]
        stem = self.cache / self.key(row)
        x_path, z_path = stem.with_name(stem.name + ".x.npy"), stem.with_name(stem.name + ".z.npy")
        low_path = stem.with_name(stem.name + f".ds{self.downsample}.npz")
        if not (x_path.exists() and z_path.exists() and low_path.exists()):
            self.cache.mkdir(parents=True, exist_ok=True)
            x, z, maps = self.decode(row)
            xt = torch.from_numpy(x)
            low_x = downsample_image(xt, self.downsample)[0, 0].numpy()
            low_maps = downsample_image(maps[None], self.downsample)[0].numpy()
            _save_atomic(x_path, x.astype(np.float16))
            _save_atomic(z_path, z.astype(np.float16))
            tmp = low_path.with_name(f"{low_path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, x=low_x.astype(np.float32), maps=low_maps.astype(np.float32))
            tmp.replace(low_path)
        item = ArchiveItem(row.id, row.split, row.group, x_path, z_path, low_path, exact=bool(row.params))
        self._items[row.id] = item
        return item

    def decode(self, row: Row) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """x, the target z and the full-resolution maps (4, H, W) of one row."""
        x, _ = read_image(self.source, row, "raw")
        shape = x.shape
        if row.params:
            p = load_params(self.source, row)
            maps = torch.stack([_resize(p[k], shape) for k in ("a", "b", "wc", "ww")])
            z = remap(torch.from_numpy(x), *maps.unbind(0)).z.numpy()
            return x, z, maps
        t, tds = read_image(self.source, row, "target")
        if t.shape != shape:
            raise ArchiveError(f"{row.where('target', row.target)}: target geometry mismatch, {t.shape} but raw is {shape}")
        window = window_from_tags(tds)
        if window is not None:
            wc, ww = window
            y = t
            z = remap(torch.from_numpy(x * 0 + y), 1.0, 0.0, wc, ww).z.numpy()
        else:
            wc, ww = window_from_presentation(t)
            y = inverse_sigmoid_window(torch.from_numpy(t), wc, ww).clamp(0.0, 1.0).numpy()
            z = t
        a, b = fit_maps(x, y)
        maps = torch.stack([torch.from_numpy(a), torch.from_numpy(b), torch.full(shape, wc), torch.full(shape, ww)])
        return x, z, maps

    def items(self, split: str | None = None, progress=None) -> list[ArchiveItem]:
        out = []
        for row in self.rows:
            if split is None or row.split == split:
                out.append(self.item(row))
                if progress:
                    progress(row.id)
        return out


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")  # two trainers may fill one cache
    np.save(tmp, arr)
    tmp.replace(path)
