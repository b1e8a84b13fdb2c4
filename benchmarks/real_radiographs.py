"""The real-radiograph benchmark: what a radiologist would see, on every real radiograph we have.

    python -m benchmarks.real_radiographs [--folder DIR ...] [--weights W] [--out benchmarks/results/real]

Inputs: the real CR radiographs of pydicom-data (RG1 chest, RG3 tibia) and every DICOM file
under each --folder; for each, variants a site will send (the other photometric interpretation,
another bit depth, rotated and cropped, downscaled, pydicom-data's lossy JPEG 2000 copy) and
smooth gain/offset perturbations (training.perturb, as in synth). Methods: the file's own
window, a percentile window, CLAHE, the teacher run on the input, and ours as a viewer shows
the `voi` output and the `burn-in` output, each with the window guard off and on. Metrics and
the body mask: training/real_radiographs.py.

Writes OUT/real.md (tables, the targets met or missed) and OUT/contact_sheet.png (own window |
CLAHE | ours voi | ours burn-in, one row per base image).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.stamp import cpu_description, git_commit
from model import DEFAULT_WEIGHTS

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")
SHEET_COLUMNS = ("own window", "CLAHE", "ours voi", "ours burn-in")

# The targets for our model, guard off (the guard is a seat belt, not the fix).
TARGETS = {
    "burnt": 0.02,  # at most this fraction of the body shown pure white or black
    "contrast_ratio": 1.5,  # at least this local contrast relative to the file's own window
    "ssim": 0.6,  # at least this structure SSIM
}


def base_images(folders: list[str]) -> list[Path]:
    from pydicom.data import get_testdata_file

    paths = [Path(p) for p in (get_testdata_file(name) for name in BASE_IMAGES) if p]
    for folder in folders:
        paths += sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return paths


def load_variants(paths: list[Path], perturbations: int, seed: int, progress) -> list:
    from dicom_node.errors import UnsupportedImage
    from dicom_node.reader import check_radiograph, load_dataset
    from training.real_radiographs import variants

    out = []
    for path in paths:
        try:
            ds = load_dataset(path)
            check_radiograph(ds)
        except UnsupportedImage as exc:
            progress(f"skipped {path}: {exc}")
            continue
        out += variants(path, ds, perturbations=perturbations, seed=seed)
        progress(f"{path.name}: {len([v for v in out if v.image == path.stem])} inputs")
    return out


def methods(weights: str, device: str, max_burnt_out: float) -> dict:
    from dicom_node.enhancer import Enhancer
    from training.real_radiographs import classical_methods, enhancer_method

    found = classical_methods()
    for mode in ("voi", "burn-in"):
        found[f"ours {mode}"] = enhancer_method(Enhancer(weights, device=device, mode=mode, max_burnt_out=0.0))
        if max_burnt_out > 0:
            found[f"ours {mode} + guard"] = enhancer_method(Enhancer(weights, device=device, mode=mode, max_burnt_out=max_burnt_out))
    return found


def _pct(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def _num(v: float, spec: str = ".2f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summarise(measured, method_names: list[str]) -> dict:
    """Per method: the worst burnt-out fraction, contrast ratio and SSIM over every input, and the
    consistency per base image."""
    by_method = defaultdict(list)
    for row in measured.rows:
        by_method[row["method"]].append(row)
    summary = {}
    for method in method_names:
        rows = by_method[method]
        summary[method] = {
            "burnt_worst": max(r["burnt"] for r in rows),
            "burnt_mean": float(np.mean([r["burnt"] for r in rows])),
            "contrast_worst": min(r["contrast_ratio"] for r in rows),
            "ssim_worst": min(r["ssim"] for r in rows),
            "consistency": {image: c for (image, m), c in measured.consistency.items() if m == method},
            "twin": {image: d for (image, m), d in measured.twin_difference.items() if m == method},
        }
    return summary


def targets_check(summary: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for our model, guard off, in both presentations."""
    checks = []
    for method in ("ours voi", "ours burn-in"):
        s = summary[method]
        checks.append((f"{method}: body pixels > 0.98 or < 0.02 ≤ 2 % (worst input)", _pct(s["burnt_worst"]),
                       s["burnt_worst"] <= TARGETS["burnt"]))
        checks.append((f"{method}: local contrast ≥ 1.5× own window (worst input)", f"{s['contrast_worst']:.2f}×",
                       s["contrast_worst"] >= TARGETS["contrast_ratio"]))
        checks.append((f"{method}: structure SSIM ≥ 0.6 (worst input)", f"{s['ssim_worst']:.3f}", s["ssim_worst"] >= TARGETS["ssim"]))
        for image, value in s["consistency"].items():
            reference = summary["CLAHE"]["consistency"].get(image, float("nan"))
            checks.append((f"{method}: consistency on {image} ≤ CLAHE's ({reference:.2f})", f"{value:.2f}", value <= reference))
        for image, diff in s["twin"].items():
            checks.append((f"{method}: the MONOCHROME2/1 twin of {image} displays alike (mean |Δ| over the body ≤ 1/255)",
                           f"{diff:.4f}", diff <= 1 / 255))
    return checks


def render(measured, summary: dict, method_names: list[str], header: dict, sheet: str) -> str:
    lines = ["# Real radiographs: what a viewer shows", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "Metrics, body mask and variants: `training/real_radiographs.py`. Display = what a conformant viewer "
              "shows (modality LUT, the file's first VOI window, MONOCHROME1 inverted). *Burnt* = body pixels shown "
              "> 0.98 or < 0.02; *contrast* = local contrast (RMS of the display minus its 8-px Gaussian blur, on the "
              "body) as a ratio to the file's own window; *SSIM* = structure SSIM against a percentile window of the "
              "clean image, on the body; *consistency* = spread of the output over the smooth perturbations / spread "
              "of the input, on body pixels no output of the method saturates (lower is steadier).", "",
              f"![contact sheet]({sheet})", "", "## Targets (our model, guard off)", "", "| target | measured | |", "|---|---:|---|"]
    for target, value, met in targets_check(summary):
        lines.append(f"| {target} | {value} | {'met' if met else '**missed**'} |")
    lines += ["", "## Summary over every input", "",
              "| method | burnt, worst | burnt, mean | contrast, worst | SSIM, worst | " + " | ".join(
                  f"consistency {i}" for i in sorted({i for s in summary.values() for i in s['consistency']})) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len({i for s in summary.values() for i in s["consistency"]})]
    images = sorted({i for s in summary.values() for i in s["consistency"]})
    for method in method_names:
        s = summary[method]
        lines.append(f"| {method} | {_pct(s['burnt_worst'])} | {_pct(s['burnt_mean'])} | {_num(s['contrast_worst'])}× | "
                     f"{_num(s['ssim_worst'], '.3f')} | " + " | ".join(_num(s["consistency"].get(i)) for i in images) + " |")
    lines += ["", "## Every input", "", "burnt % / contrast ratio / SSIM", ""]
    variants = list(dict.fromkeys((r["image"], r["variant"]) for r in measured.rows))
    lines.append("| input | " + " | ".join(method_names) + " |")
    lines.append("|---|" + "---:|" * len(method_names))
    cell = {(r["image"], r["variant"], r["method"]): r for r in measured.rows}
    for image, variant in variants:
        parts = []
        for m in method_names:
            r = cell[(image, variant, m)]
            parts.append(f"{100 * r['burnt']:.1f} / {r['contrast_ratio']:.2f} / {r['ssim']:.2f}")
        lines.append(f"| {image} {variant} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def contact_sheet(path: Path, measured, images: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.figures import _display

    fig, axes = plt.subplots(len(images), len(SHEET_COLUMNS), figsize=(4 * len(SHEET_COLUMNS), 4.4 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        for j, method in enumerate(SHEET_COLUMNS):
            ax = axes[i, j]
            display = measured.displays[(image, "original", method)]
            row = next(r for r in measured.rows if r["image"] == image and r["variant"] == "original" and r["method"] == method)
            ax.imshow(_display(display, 768), cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
            ax.set_title(f"{image}: {method}\nburnt {100 * row['burnt']:.1f} %, contrast {row['contrast_ratio']:.2f}×", fontsize=10)
            ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", action="append", default=[], help="Also every DICOM radiograph under this folder.")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--perturbations", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guard", type=float, default=0.02, help="max_burnt_out of the guarded rows (0: no guarded rows).")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real"))
    args = parser.parse_args(argv)

    from training.real_radiographs import measure

    t0 = time.time()
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    found = load_variants(base_images(args.folder), args.perturbations, args.seed, progress)
    if not found:
        print("no real radiograph found (install pydicom-data or pass --folder)", file=sys.stderr)
        return 1
    chosen = methods(args.weights, args.device, args.guard)
    measured = measure(found, chosen)
    names = list(chosen)
    summary = summarise(measured, names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = list(dict.fromkeys(v.image for v in found))
    header = {
        "commit": git_commit(),
        "machine": cpu_description(),
        "weights": Path(args.weights).name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "inputs": f"{len(found)} ({len(images)} images × original, variants and {args.perturbations} perturbations)",
        "command": "python -m benchmarks.real_radiographs " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": f"{time.time() - t0:.0f}",
    }
    contact_sheet(out / "contact_sheet.png", measured, images,
                  f"as a viewer shows them, weights {Path(args.weights).name}, commit {header['commit']}")
    report = render(measured, summary, names, header, "contact_sheet.png")
    (out / "real.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
