"""The paper's Figures 3 and 4 for our methods (matplotlib, written as PNG).

fig3: one test image across the ground truth and every method, and below each the same
      enlarged crop on bone detail (the paper's ankle crops).
fig4: several perturbed acquisitions of the same anatomies, as raw, a plain per-image
      auto-window and ours, one row each, so the consistency (or its lack) is visible.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

DISPLAY_SIZE = 512  # longer side of each full image panel, in pixels


def _display(img: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """Area-downsampled copy whose longer side is at most `size` (what a panel can show)."""
    f = max(1, int(np.ceil(max(img.shape) / size)))
    if f == 1:
        return img
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def detail_crop(gt: np.ndarray, mask: np.ndarray | None = None, fraction: float = 0.2) -> tuple[slice, slice]:
    """The square crop (side `fraction` of the shorter side) with the most fine detail in gt.

    Detail is the local energy of the Gaussian gradient (sigma 2 px of a copy reduced so the crop
    is ~32 px wide: structure edges, not pixel noise), so the crop lands on bone edges rather
    than on smooth soft tissue; with a mask it must lie inside the anatomy.
    """
    side = max(16, int(min(gt.shape) * fraction))
    f = max(1, side // 32)  # search on a reduced copy: the crop is large
    small = gt[: gt.shape[0] // f * f, : gt.shape[1] // f * f]
    small = small.reshape(small.shape[0] // f, f, small.shape[1] // f, f).mean(axis=(1, 3))
    energy = ndimage.gaussian_gradient_magnitude(small.astype(np.float64), 2.0) ** 2
    k = max(3, (side // f) | 1)  # odd: the filters below are centred exactly on a pixel
    side = k * f
    score = ndimage.uniform_filter(energy, k, mode="constant")
    if mask is not None:
        m = mask[: small.shape[0] * f, : small.shape[1] * f].reshape(small.shape[0], f, small.shape[1], f).mean(axis=(1, 3))
        inside = ndimage.binary_erosion(m > 0.5, iterations=6)  # clear of the edges' gradient (3 sigma)
        score = np.where(ndimage.uniform_filter(inside.astype(np.float64), k, mode="constant") > 0.995, score, -1.0)
    half = k // 2
    valid = np.full(score.shape, -np.inf)
    valid[half : score.shape[0] - half, half : score.shape[1] - half] = 0.0
    cy, cx = np.unravel_index(np.argmax(score + valid), score.shape)
    top, left = (cy - half) * f, (cx - half) * f
    return slice(top, top + side), slice(left, left + side)


def figure3(path: str | Path, gt: np.ndarray, outputs: dict[str, np.ndarray], mask: np.ndarray | None = None,
            scores: dict[str, str] | None = None, title: str = "", per_row: int = 6) -> tuple[slice, slice]:
    """GT and each method's output, each above the same detail crop enlarged; `per_row` panels a row."""
    panels = {"GT": gt, **outputs}
    crop = detail_crop(gt, mask)
    names = list(panels)
    n_cols = min(per_row, len(names))
    bands = -(-len(names) // n_cols)
    fig, axes = plt.subplots(2 * bands, n_cols, figsize=(2.3 * n_cols, 4.9 * bands + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, name in enumerate(names):
        img = panels[name]
        top, bottom = axes[2 * (j // n_cols), j % n_cols], axes[2 * (j // n_cols) + 1, j % n_cols]
        top.imshow(_display(img), cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
        f = max(1, int(np.ceil(max(img.shape) / DISPLAY_SIZE)))
        ys, xs = crop
        top.add_patch(plt.Rectangle((xs.start / f, ys.start / f), (xs.stop - xs.start) / f, (ys.stop - ys.start) / f,
                                    fill=False, edgecolor="yellow", linewidth=0.8))
        top.set_title(name if not scores or name not in scores else f"{name}\n{scores[name]}", fontsize=7)
        bottom.imshow(img[crop], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for ax in (top, bottom):
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    _save(fig, path, title)
    return crop


def figure4(path: str | Path, rows: dict[str, list[np.ndarray]], column_titles: list[str],
            row_notes: dict[str, str] | None = None, title: str = "") -> None:
    """One row per presentation (raw, auto-window, ours, ...), one column per acquisition."""
    names = list(rows)
    n_cols = len(column_titles)
    if any(len(v) != n_cols for v in rows.values()):
        raise ValueError("every row of figure 4 needs one image per column title")
    fig, axes = plt.subplots(len(names), n_cols, figsize=(1.7 * n_cols, 1.9 * len(names) + 0.4), squeeze=False)
    for i, name in enumerate(names):
        for j, img in enumerate(rows[name]):
            ax = axes[i, j]
            ax.imshow(_display(img, 256), cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column_titles[j], fontsize=7)
            if j == 0:
                note = (row_notes or {}).get(name, "")
                ax.set_ylabel(f"{name}\n{note}" if note else name, fontsize=7)
    _save(fig, path, title)


def _save(fig, path: str | Path, title: str) -> None:
    """Title, tight layout, write the PNG (making its folder) and free the figure."""
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
