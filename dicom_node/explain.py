"""`dicom-node explain`: what the model did to one radiograph, for a radiologist or physicist.

The method is interpretable because every pixel has its own monotonic LUT, given by the maps
a, b, wc, ww. This command shows them: a PNG report with the raw image under its own default
window, the enhanced image (per-pixel window as `burn-in` writes it, and the aggregate SIGMOID
window a viewer applies to `voi` output), a panel that marks the anatomy shown pure white or
pure black, the four maps with colour bars and units, and the LUT curves x -> z at three
automatically chosen points; plus a JSON with the numbers. Coordinates are (row, col) of the
full-resolution image.

The points fit any anatomy: inside the anatomy mask (model.anatomy: collimation, direct
exposure and markers left out), at the model's resolution, the most homogeneous spots near the
2nd, 50th and 98th percentile of x: the darkest, middle and brightest tissue of this image
(lung, soft tissue and bone on a chest; soft tissue, bone and dense bone on a limb).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

MAP_UNITS = {  # what each map means, for the colour bars
    "a": "a: slope of y = clip(a·x + b, 0, 1)  [Δy/Δx, unitless]",
    "b": "b: offset  [fraction of the output range]",
    "wc": "wc: window centre  [fraction of the output range]",
    "ww": "ww: window width  [fraction of the output range]",
}
POINTS = (("darkest tissue", 2.0), ("middle tissue", 50.0), ("brightest tissue", 98.0))
POINT_COLOURS = ("tab:cyan", "tab:orange", "tab:red")


@dataclass
class Point:
    label: str
    row: int  # full-resolution pixel
    col: int
    x: float  # normalised input at the pixel
    a: float  # the pixel's parameters (the full-resolution maps the remap used)
    b: float
    wc: float
    ww: float
    y: float
    z: float


def map_statistics(maps) -> dict[str, dict[str, float]]:
    """min, max, mean, median (lower median, as the aggregate window), 5th/95th percentile of each
    map at the model's resolution."""
    import torch

    from model.net import MAP_NAMES

    stats = {}
    for name, m in zip(MAP_NAMES, maps.detach().float().cpu()):
        flat = m.flatten()
        p5, p95 = torch.quantile(flat.double(), torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        stats[name] = {
            "min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.double().mean()),
            "median": float(flat.median()), "p5": p5, "p95": p95,
        }
    return stats


def choose_points(x, downsample: int, body) -> list[tuple[str, int, int]]:
    """(label, row, col) of the darkest, middle and brightest tissue (module docstring); body is
    the full-resolution anatomy mask."""
    import torch
    import torch.nn.functional as F

    from model.remap import downsample_image

    low = downsample_image(x, downsample)  # (1, 1, h, w), the model's view of the image
    mean = F.avg_pool2d(low, 3, stride=1, padding=1, count_include_pad=False)
    var = (F.avg_pool2d(low * low, 3, stride=1, padding=1, count_include_pad=False) - mean * mean).clamp_min(0)
    mean, var = mean[0, 0], var[0, 0]
    inside = downsample_image(torch.as_tensor(body, dtype=torch.float32, device=x.device), downsample)[0, 0]
    field = -F.max_pool2d(-inside[None, None], 3, stride=1, padding=1)[0, 0] > 0.99  # wholly anatomy, with its neighbours
    if int(field.sum()) < 16:
        field = torch.ones_like(field)
    values = mean[field].double()
    spread = float(values.max() - values.min()) or 1.0
    never = torch.full_like(mean, float("inf"))
    chosen = []
    for label, q in POINTS:
        target = float(torch.quantile(values, q / 100.0))
        near = field & ((mean - target).abs() <= 0.02 * spread)
        cost = torch.where(near, var, never) if near.any() else torch.where(field, (mean - target).abs(), never)
        i, j = divmod(int(cost.argmin()), mean.shape[1])
        row = min(i * downsample + (downsample - 1) // 2, x.shape[-2] - 1)
        col = min(j * downsample + (downsample - 1) // 2, x.shape[-1] - 1)
        chosen.append((label, row, col))
    return chosen


def burnt_out_overlay(display: np.ndarray, body: np.ndarray) -> np.ndarray:
    """RGB of the display with the anatomy shown pure white (> 0.98) in red and pure black
    (< 0.02) in blue, and everything outside the anatomy dimmed."""
    rgb = np.repeat(display[..., None], 3, axis=2).astype(np.float32)
    rgb[~body] *= 0.35
    rgb[body & (display > 0.98)] = (1.0, 0.1, 0.1)
    rgb[body & (display < 0.02)] = (0.1, 0.3, 1.0)
    return rgb


def lut_curve(a: float, b: float, wc: float, ww: float, n: int = 257):
    """The pixel's LUT: input x on [0, 1] -> displayed z, through the shared remap."""
    import torch

    from model.remap import remap

    xs = torch.linspace(0.0, 1.0, n)[None]
    return xs[0].numpy(), remap(xs, a, b, wc, ww).z[0].numpy()


def raw_display(ds) -> tuple[np.ndarray, dict, str]:
    """The source under its own default presentation: (image, imshow keywords, description)."""
    from pydicom.pixels import apply_voi_lut

    from dicom_node.reader import decode_pixels, modality_lut

    values = modality_lut(decode_pixels(ds), ds)
    cmap = "gray_r" if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1" else "gray"
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    if "WindowCenter" in ds and "WindowWidth" in ds and function in ("LINEAR", "LINEAR_EXACT", ""):
        centre = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
        width = float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
        return values, {"cmap": cmap, "vmin": centre - width / 2, "vmax": centre + width / 2}, f"window C {centre:g} W {width:g} from the file"
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        shown = np.asarray(apply_voi_lut(values, ds), dtype=np.float32)
        return shown, {"cmap": cmap, "vmin": float(shown.min()), "vmax": float(shown.max())}, "VOI LUT from the file"
    lo, hi = np.percentile(values, [0.5, 99.5])
    return values, {"cmap": cmap, "vmin": float(lo), "vmax": float(hi)}, "no window in the file: 0.5-99.5 percentile"


def _pixel_axes(ax) -> None:
    """Axes in full-resolution pixels, labelled as (row, col) are read."""
    ax.set_xlabel("col", fontsize=9)
    ax.set_ylabel("row", fontsize=9)
    ax.tick_params(labelsize=8)


def _for_display(image: np.ndarray, limit: int = 1024) -> np.ndarray:
    """Area-downsampled copy for the figure (the figure is ~1000 pixels wide anyway)."""
    import torch

    from model.remap import downsample_image

    factor = max(1, -(-max(image.shape) // limit))
    if factor == 1:
        return image
    return downsample_image(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), factor)[0, 0].numpy()


def explain_file(path: Path, predictor, out_dir: Path) -> tuple[Path, Path]:
    """Write `<stem>.png` and `<stem>.json` for the radiograph at `path`; returns their paths.
    UnsupportedImage for anything `enhance` does not accept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dicom_node.reader import load_dataset, read_radiograph
    from model.net import MAP_NAMES

    from model.anatomy import find_anatomy_mask

    ds = load_dataset(path)
    x = read_radiograph(ds)
    body = find_anatomy_mask(x)
    prediction = predictor(x, want_z=True)
    full = prediction.full_maps()
    y, z, z_voi = (t.cpu().numpy() for t in (prediction.y, prediction.z, prediction.z_aggregate()))
    burnt = {name: {"white": float((shown[body] > 0.98).mean()), "black": float((shown[body] < 0.02).mean())}
             for name, shown in (("burn-in", z), ("voi", z_voi))}
    points = []
    for label, row, col in choose_points(prediction.x, prediction.downsample, body):
        points.append(Point(label=label, row=row, col=col, x=float(x[row, col]), **{n: float(full[n][row, col]) for n in MAP_NAMES},
                            y=float(y[row, col]), z=float(z[row, col])))
    wc, ww = prediction.window
    rows, cols = x.shape
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)  # full-resolution pixel coordinates on every panel

    fig, axes = plt.subplots(2, 5, figsize=(27, 11.5), layout="constrained")
    raw, raw_kwargs, raw_note = raw_display(ds)
    panels = (
        (axes[0, 0], raw, raw_kwargs, f"raw ({raw_note})"),
        (axes[0, 1], z, {"cmap": "gray", "vmin": 0, "vmax": 1}, "enhanced: per-pixel LUT (burn-in output)"),
        (axes[0, 2], z_voi, {"cmap": "gray", "vmin": 0, "vmax": 1}, f"enhanced: voi output as a viewer shows it\n(SIGMOID window wc {wc:.3f}, ww {ww:.3f})"),
    )
    for ax, image, kwargs, title in panels:
        ax.imshow(_for_display(image), extent=extent, interpolation="antialiased", **kwargs)
        ax.set_title(title, fontsize=11)
        _pixel_axes(ax)
        for point, colour in zip(points, POINT_COLOURS):
            ax.plot(point.col, point.row, "o", markersize=11, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2.5)
    overlay = axes[0, 3]
    voi_burnt = burnt["voi"]
    overlay.imshow(np.stack([_for_display(c) for c in np.moveaxis(burnt_out_overlay(z_voi, body), 2, 0)], axis=2),
                   extent=extent, interpolation="antialiased")
    overlay.set_title(f"burnt-out anatomy (voi, as viewed): white {100 * voi_burnt['white']:.1f} % (red), "
                      f"black {100 * voi_burnt['black']:.1f} % (blue)\noutside the anatomy mask dimmed", fontsize=11)
    _pixel_axes(overlay)
    curves = axes[0, 4]
    for point, colour in zip(points, POINT_COLOURS):
        xs, zs = lut_curve(point.a, point.b, point.wc, point.ww)
        curves.plot(xs, zs, color=colour, label=f"{point.label} (row {point.row}, col {point.col})")
        curves.plot(point.x, point.z, "o", color=colour, markeredgecolor="black", markersize=8, zorder=5)
    curves.plot([0, 1], [0, 1], ":", color="grey", linewidth=1, label="identity")
    curves.set(xlim=(0, 1), ylim=(0, 1), xlabel="input x (normalised, higher = brighter)", ylabel="displayed z",
               title="per-pixel LUT at the marked points\n(dot: the pixel's own x)")
    curves.set_aspect("equal")
    curves.legend(loc="lower right", fontsize=9)
    curves.grid(alpha=0.3)
    maps = prediction.maps.detach().float().cpu().numpy()
    h, w = maps.shape[-2:]
    low_extent = (-0.5, w * prediction.downsample - 0.5, h * prediction.downsample - 0.5, -0.5)
    for ax, name, values in zip(axes[1], MAP_NAMES, maps):
        shown = ax.imshow(values, extent=low_extent, cmap="viridis", interpolation="bilinear")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(f"map {name} (1/{prediction.downsample} resolution, {h}×{w})", fontsize=11)
        _pixel_axes(ax)
        fig.colorbar(shown, ax=ax, shrink=0.85).set_label(MAP_UNITS[name])
        for point, colour in zip(points, POINT_COLOURS):
            ax.plot(point.col, point.row, "o", markersize=9, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2)
    notes = axes[1, 4]
    notes.set_axis_off()
    lines = []
    for p in points:
        lines += [f"{p.label} (row {p.row}, col {p.col}):", f"  x {p.x:.3f}  a {p.a:.2f}  b {p.b:+.3f}",
                  f"  wc {p.wc:.3f}  ww {p.ww:.3f}  ->  z {p.z:.3f}", ""]
    notes.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=11, transform=notes.transAxes)
    fig.suptitle(f"{Path(path).name} — model {predictor.name}: y = clip(a·x + b, 0, 1), z = 1 / (1 + exp(−4 (y − wc) / ww))", fontsize=13)

    out_dir.mkdir(parents=True, exist_ok=True)
    png, report = out_dir / f"{Path(path).stem}.png", out_dir / f"{Path(path).stem}.json"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    summary = {
        "source": {"path": str(path), "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                   "sop_class_uid": str(ds.get("SOPClassUID", "")), "rows": rows, "columns": cols},
        "model": {"name": predictor.name, "identity": predictor.identity, "weights": str(predictor.weights),
                  "downsample": prediction.downsample},
        "window": {"wc": wc, "ww": ww, "definition": "median of the wc and ww maps (the voi output's SIGMOID window)",
                   "window_center_tag": 65535.0 * wc, "window_width_tag": 65535.0 * ww},
        "maps": {"resolution": [h, w], "statistics": map_statistics(prediction.maps)},
        "points": [asdict(p) for p in points],
        "burnt_out": {"definition": "fraction of the anatomy (model.anatomy mask) shown > 0.98 (white) or < 0.02 (black)",
                      **burnt},
        "coordinates": "(row, col) of the full-resolution image",
        "formula": "y = clip(a*x + b, 0, 1); z = 1 / (1 + exp(-4 * (y - wc) / ww)); display 65535 * z",
        "png": png.name,
    }
    report.write_text(json.dumps(summary, indent=2) + "\n")
    return png, report


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the PNG and JSON report.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Checkpoint (default: the bundled model).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
def explain(file, out_dir, weights, device):
    """Show what the model does to FILE: maps, LUT curves and enhanced image (PNG + JSON)."""
    from model import DEFAULT_WEIGHTS
    from model.predictor import Predictor

    try:
        predictor = Predictor(weights or DEFAULT_WEIGHTS, device)
        predictor.checkpoint  # load now: a bad checkpoint is a clear error before any work
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    png, report = explain_file(Path(file), predictor, Path(out_dir))
    click.echo(f"wrote {png} and {report}")
