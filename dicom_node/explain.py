"""`dicom-node explain`: what the model did to one radiograph, for a radiologist or physicist.

The method is interpretable because every pixel has its own monotonic LUT, given by the maps
a, b, wc, ww. This command shows them: a PNG report with the raw image under its own default
window, the enhanced image (per-pixel window as `burn-in` writes it, and the aggregate SIGMOID
window a viewer applies to `voi` output), the four maps with colour bars and units, and the LUT
curves x -> z at three automatically chosen points; plus a JSON with the numbers.

The points are chosen from intensity alone, not by segmentation, on the image at the model's
resolution and away from a 10 % border (collimation, burnt-in labels): "dark: lung/air" and
"mid: soft tissue" are the most homogeneous spots near the 3rd and 50th percentile of x,
"bright: bone" the spot among the brightest quarter that stands out most above its surroundings
(bone is brighter than its neighbourhood; a large bright area is dense soft tissue), keeping
away from the brightest plateau (collimation, where the field is collimated). In chest and
skeletal radiographs they land in the tissue the label names; in any image they are a dark, a
middle and a locally bright spot, which is what the curves need.
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
POINTS = (("dark: lung/air", 3.0), ("mid: soft tissue", 50.0), ("bright: bone", 75.0))
POINT_COLOURS = ("tab:cyan", "tab:orange", "tab:red")
BORDER = 0.10  # fraction of each side left out when choosing points (collimation, labels)
PLATEAU_MARGIN = 0.08  # fraction of the image kept clear around the brightest plateau


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


def choose_points(x, downsample: int) -> list[tuple[str, int, int]]:
    """(label, row, col) of a dark, a mid and a bright spot (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from model.remap import downsample_image

    low = downsample_image(x, downsample)  # (1, 1, h, w), the model's view of the image
    mean = F.avg_pool2d(low, 3, stride=1, padding=1, count_include_pad=False)
    var = (F.avg_pool2d(low * low, 3, stride=1, padding=1, count_include_pad=False) - mean * mean).clamp_min(0)
    background = F.avg_pool2d(low, 15, stride=1, padding=7, count_include_pad=False)
    mean, var, background = mean[0, 0], var[0, 0], background[0, 0]
    h, w = mean.shape
    inside = torch.zeros_like(mean, dtype=torch.bool)
    r0, c0 = int(h * BORDER), int(w * BORDER)
    inside[r0:max(h - r0, r0 + 1), c0:max(w - c0, c0 + 1)] = True
    # The exposed field: not on or within 8 % of the image of the brightest plateau, which is
    # collimation (unexposed) where the image has one, with its penumbra. Without collimation
    # this only drops the surroundings of the brightest spot.
    top = float(mean[inside].max())
    spread = float(mean[inside].max() - mean[inside].min()) or 1.0
    plateau = (mean >= top - 0.03 * spread).float()[None, None]
    reach = max(5, round(PLATEAU_MARGIN * max(h, w)))  # the collimator's penumbra is a wide ramp
    field = inside & ~(F.max_pool2d(plateau, 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0)
    if int(field.sum()) < 16:
        field = inside
    values = mean[field].double()
    never = torch.full_like(mean, float("inf"))
    costs = {}
    for label, q in POINTS[:2]:
        # Dark and mid: within 2 % of the range of the percentile, the most homogeneous spot.
        target = float(torch.quantile(values, q / 100.0))
        near = field & ((mean - target).abs() <= 0.02 * spread)
        costs[label] = torch.where(near, var, never) if near.any() else torch.where(field, (mean - target).abs(), never)
    # Bright: bone is brighter than what surrounds it (a large flat bright area is soft tissue),
    # so among the brightest quarter of the field the spot that stands out most from its
    # neighbourhood.
    label, q = POINTS[2]
    bright = field & (mean >= float(torch.quantile(values, q / 100.0)))
    costs[label] = torch.where(bright, background - mean, never)
    chosen = []
    for label, _ in POINTS:
        i, j = divmod(int(costs[label].argmin()), w)
        row = min(i * downsample + (downsample - 1) // 2, x.shape[-2] - 1)
        col = min(j * downsample + (downsample - 1) // 2, x.shape[-1] - 1)
        chosen.append((label, row, col))
    return chosen


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

    ds = load_dataset(path)
    x = read_radiograph(ds)
    prediction = predictor(x, want_z=True)
    full = prediction.full_maps()
    y, z, z_voi = (t.cpu().numpy() for t in (prediction.y, prediction.z, prediction.z_aggregate()))
    points = []
    for label, row, col in choose_points(prediction.x, prediction.downsample):
        points.append(Point(label=label, row=row, col=col, x=float(x[row, col]), **{n: float(full[n][row, col]) for n in MAP_NAMES},
                            y=float(y[row, col]), z=float(z[row, col])))
    wc, ww = prediction.window
    rows, cols = x.shape
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)  # full-resolution pixel coordinates on every panel

    fig, axes = plt.subplots(2, 4, figsize=(22, 11.5), layout="constrained")
    raw, raw_kwargs, raw_note = raw_display(ds)
    panels = (
        (axes[0, 0], raw, raw_kwargs, f"raw ({raw_note})"),
        (axes[0, 1], z, {"cmap": "gray", "vmin": 0, "vmax": 1}, "enhanced: per-pixel LUT (burn-in output)"),
        (axes[0, 2], z_voi, {"cmap": "gray", "vmin": 0, "vmax": 1}, f"enhanced: voi output as a viewer shows it\n(SIGMOID window wc {wc:.3f}, ww {ww:.3f})"),
    )
    for ax, image, kwargs, title in panels:
        ax.imshow(_for_display(image), extent=extent, interpolation="antialiased", **kwargs)
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
        for point, colour in zip(points, POINT_COLOURS):
            ax.plot(point.col, point.row, "o", markersize=11, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2.5)
    curves = axes[0, 3]
    for point, colour in zip(points, POINT_COLOURS):
        xs, zs = lut_curve(point.a, point.b, point.wc, point.ww)
        curves.plot(xs, zs, color=colour, label=f"{point.label} ({point.row}, {point.col})")
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
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, shrink=0.85).set_label(MAP_UNITS[name])
        for point, colour in zip(points, POINT_COLOURS):
            ax.plot(point.col, point.row, "o", markersize=9, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2)
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
