"""`dicom-node evaluate`: fidelity and consistency of a model against two classical references.

For every row of the split (cached by training.archive):
  model  the shipped inference path, model.predictor.Predictor: maps at /ds, full-resolution remap,
         z with the per-pixel window maps. A Table 1 baseline checkpoint (training.baselines) is
         run through `training.baselines.enhance` instead (it has no maps, so no map MAE).
  (A)    per-image percentile window: y = x, wc/ww from the 1st/99th percentiles of x over the
         whole image (ww = spread / 1.2, as the teacher's window).
  (B)    the teacher run on the (perturbed) input, with the anatomy mask it finds by itself
         (model.anatomy.find_anatomy_mask), as any classical pipeline must.
Metrics, all on the displayed presentation z in [0, 1], at full resolution:
  PSNR and SSIM against the target z (scikit-image, data_range=1.0); parameter-map MAE of the
  model's a, b, wc, ww against the ground truth at the model's resolution; and consistency:
  for each anatomy group with >= 2 acquisitions in the split, the mean over pixels of the
  standard deviation across acquisitions of the output divided by the same of the raw inputs
  (lower = more consistent; 0 would also be reached by a constant output, so it is always
  reported beside PSNR/SSIM). The target itself scores ~0 (every acquisition has one target).
  For the model, `psnr_voi` is also given: y under the one aggregate window the `voi` output
  carries in its VOI LUT tags (the per-pixel window maps reduced to their median).
`references` replaces (A) and (B) by any {name: x -> z} (benchmarks.table1 adds CLAHE; {} scores
the model alone). With `guard` > 0 a row "model + guard" scores the same model behind the window
guard ([model] max_burnt_out = guard), in its per-pixel (burn-in) presentation.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.remap import downsample_image, percentile_window, remap
from training.archive import Archive
from training.baselines import BASELINES, enhance, produces_maps
from training.errors import ArchiveError
from model.teacher import TeacherParams, teacher_on_input

def percentile_window_reference(x: np.ndarray, params: TeacherParams = TeacherParams()) -> np.ndarray:
    """Reference (A): identity regional LUT and a global window from x's own percentiles (the
    teacher's, over the whole image)."""
    sample = np.ascontiguousarray(x[:: max(1, x.shape[0] // 1024), :: max(1, x.shape[1] // 1024)])
    wc, ww = percentile_window(torch.from_numpy(sample), params.p_lo, params.p_hi, params.ww_squeeze, params.min_ww)
    return remap(torch.from_numpy(x), 1.0, 0.0, float(wc), float(ww)).z.numpy()


def teacher_reference(x: np.ndarray) -> np.ndarray:
    """Reference (B): the classical teacher with its own anatomy mask."""
    return teacher_on_input(x).remap(x)[1]


REFERENCES = {"A: percentile window": percentile_window_reference, "B: teacher on input": teacher_reference}
METHODS = ("model", *REFERENCES)


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR of a presentation z in [0, 1] (scikit-image, data_range 1: never guessed from the dtype)."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(np.asarray(target, np.float32), np.asarray(pred, np.float32), data_range=1.0))


def fidelity(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM of a presentation z in [0, 1] against the target (scikit-image, data_range 1)."""
    from skimage.metrics import structural_similarity

    pred, target = np.asarray(pred, dtype=np.float32), np.asarray(target, dtype=np.float32)
    return psnr(pred, target), float(structural_similarity(target, pred, data_range=1.0))


@dataclass
class Result:
    rows: list[dict]
    summary: list[dict]

    def table(self) -> str:
        head = f"{'method':<24} {'PSNR dB':>8} {'SSIM':>7} {'consistency':>12} {'s/image':>8}"
        lines = [head, "-" * len(head)]
        for s in self.summary:
            lines.append(f"{s['method']:<24} {s['psnr']:>8.2f} {s['ssim']:>7.4f} {s['consistency']:>12.3f} {s['seconds']:>8.2f}")
        return "\n".join(lines)


def evaluate(archive: str | Path, weights: str | Path, split: str = "test", device: str = "cpu",
             csv_path: str | Path | None = None, cache: str | None = None, progress=None,
             references: dict | None = None, only_groups: tuple = (), guard: float = 0.0) -> Result:
    from model.predictor import Predictor

    references = REFERENCES if references is None else references
    predictor = Predictor(weights, device, baselines=BASELINES)
    factor = predictor.checkpoint.config.downsample
    model = predictor.checkpoint.model
    has_maps = produces_maps(model)
    if guard and has_maps:  # the same model behind the window guard ([model] max_burnt_out)
        guarded = Predictor(weights, device, max_burnt_out=guard)
        references = {"model + guard": lambda x: guarded(x).z.cpu().numpy(), **references}
    methods = ("model", *references)
    source = Archive(archive, factor, cache=cache)
    items = [i for i in source.items(split) if not only_groups or any(i.group.startswith(g) for g in only_groups)]
    if not items:
        where = f" in groups {', '.join(only_groups)}" if only_groups else ""
        raise ArchiveError(f"archive {archive}: no rows with split {split!r}{where}")
    rows, outputs = [], {m: {} for m in methods}
    raws = {}
    for item in items:
        x = np.asarray(item.x, dtype=np.float32)
        target = np.asarray(item.z, dtype=np.float32)
        _, maps_gt = item.low()
        raws[item.id] = downsample_image(torch.from_numpy(x), 4)[0, 0].numpy()
        t = time.perf_counter()
        if has_maps:
            pred = predictor(x)
            z_model = pred.z.cpu().numpy()
            mae = np.abs(pred.maps.cpu().numpy() - maps_gt).mean(axis=(1, 2))
            z_voi = pred.z_aggregate().cpu().numpy()  # what a viewer shows for the `voi` output
        else:
            with torch.inference_mode():
                z_model = enhance(model, predictor.pre_process(x)).z[0, 0].cpu().numpy()
        t_model = time.perf_counter() - t
        zs, times = [z_model], [t_model]
        for method in methods[1:]:
            t = time.perf_counter()
            zs.append(references[method](x))
            times.append(time.perf_counter() - t)
        for method, z, secs in zip(methods, zs, times):
            psnr_db, ssim = fidelity(z, target)
            row = {"id": item.id, "group": item.group, "method": method, "rows": x.shape[0], "cols": x.shape[1],
                   "psnr": psnr_db, "ssim": ssim, "seconds": secs}
            if method == "model" and has_maps:
                row.update({f"{k}_mae": float(v) for k, v in zip(("a", "b", "wc", "ww"), mae)})
                row["psnr_voi"] = psnr(z_voi, target)
            rows.append(row)
            # consistency is computed on a /4 copy (the spread of smooth acquisition changes)
            outputs[method][item.id] = downsample_image(torch.from_numpy(np.ascontiguousarray(z)), 4)[0, 0].numpy()
        if progress:
            progress(item.id)

    groups: dict[str, list[str]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item.id)
    groups = {g: ids for g, ids in groups.items() if len(ids) >= 2 and len({raws[i].shape for i in ids}) == 1}

    def consistency(method: str) -> float:
        ratios = []
        for ids in groups.values():
            out = np.stack([outputs[method][i] for i in ids])
            raw = np.stack([raws[i] for i in ids])
            ratios.append(out.std(axis=0).mean() / max(raw.std(axis=0).mean(), 1e-9))
        return float(np.mean(ratios)) if ratios else float("nan")

    summary = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "psnr": float(np.mean([r["psnr"] for r in mine])),
                 "ssim": float(np.mean([r["ssim"] for r in mine])), "consistency": consistency(method),
                 "seconds": float(np.mean([r["seconds"] for r in mine])), "images": len(mine)}
        if method == "model" and has_maps:
            for k in ("a", "b", "wc", "ww"):
                entry[f"{k}_mae"] = float(np.mean([r[f"{k}_mae"] for r in mine]))
            entry["psnr_voi"] = float(np.mean([r["psnr_voi"] for r in mine]))
        summary.append(entry)
    if csv_path:
        fields = ["id", "group", "method", "rows", "cols", "psnr", "ssim", "seconds", "a_mae", "b_mae", "wc_mae", "ww_mae", "psnr_voi"]
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return Result(rows=rows, summary=summary)
