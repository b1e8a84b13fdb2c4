"""`dicom-node enhance`: enhance files and folders offline."""
from __future__ import annotations

from pathlib import Path

import click

from dicom_node.config import OUTPUT_TRANSFER_SYNTAXES
from model import DEFAULT_WEIGHTS


def iter_inputs(paths: tuple[str, ...]):
    """Every file named, and every file under every folder named (recursively, sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def output_path(out_dir: Path, ds) -> Path:
    return out_dir / f"{ds.SOPInstanceUID}.dcm"


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the derived instances.")
@click.option("--mode", type=click.Choice(["voi", "burn-in"]), default="voi", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False), default=str(DEFAULT_WEIGHTS), show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--parametric-map", "parametric_map", is_flag=True,
              help="Also write the maps a, b, wc, ww as a DICOM Parametric Map next to each enhanced file.")
@click.option("--enhance", "enhance_entries", multiple=True, default=("CR", "DX"), show_default=True,
              help="Modalities (CR, DX) or SOP Class UIDs that are enhanced, as [model] enhance; repeatable.")
@click.option("--any-modality", is_flag=True, help="Enhance every monochrome image, whatever its SOP class.")
@click.option("--max-burnt-out", default=0.02, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Window guard, as [model] max_burnt_out (0 = off).")
@click.option("--output-transfer-syntax", "output_syntax", default="explicit", show_default=True,
              type=click.Choice(OUTPUT_TRANSFER_SYNTAXES),
              help="How the derived pixels are encoded, as [model] output_transfer_syntax (all lossless).")
def enhance(paths, out_dir, mode, weights, device, parametric_map, enhance_entries, any_modality, max_burnt_out,
            output_syntax):
    """Enhance DICOM radiographs in PATHS (files or folders) into --out, by the node's rule: only
    the SOP classes of --enhance (CR and DX), never an instance dicom-node derived itself."""
    from tqdm import tqdm

    from dicom_node.enhancer import Enhancer
    from dicom_node.errors import UnsupportedImage
    from dicom_node.reader import load_dataset
    from dicom_node.spool import write_file
    from dicom_node.writer import enhanced_classes, is_derived_by_us

    classes = enhanced_classes(tuple(enhance_entries))
    try:
        enhancer = Enhancer(weights, device=device, mode=mode, max_burnt_out=max_burnt_out, output_syntax=output_syntax)
        enhancer.predictor.checkpoint  # load now: a bad checkpoint is one error, not one per file
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list(iter_inputs(paths))
    done, failures, skipped, guarded = 0, [], [], []
    for path in tqdm(files, desc="enhancing", unit="image", disable=None):
        try:
            source = load_dataset(path)
            if not any_modality and str(source.get("SOPClassUID", "")) not in classes:
                skipped.append((path, f"{source.get('Modality', '?')} ({getattr(source.get('SOPClassUID'), 'name', '?')}) "
                                      "is not enhanced (--enhance); --any-modality to enhance it anyway"))
                continue
            if is_derived_by_us(source):
                skipped.append((path, "derived by dicom-node already"))
                continue
            derived, prediction = enhancer.enhance_with_prediction(source)
        except UnsupportedImage as exc:
            failures.append((path, str(exc)))
            continue
        if prediction.guard:
            guarded.append((path, prediction.guard.describe()))
        write_file(output_path(out, derived), lambda f: derived.save_as(f, enforce_file_format=True))
        if parametric_map:
            maps = enhancer.parametric_map(source, prediction)
            write_file(output_path(out, maps), lambda f: maps.save_as(f, enforce_file_format=True))
        done += 1
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    for path, note in guarded:
        click.echo(f"guarded {path}: {note}", err=True)
    for path, reason in failures:
        click.echo(f"failed {path}: {reason}", err=True)
    click.echo(f"{done} enhanced, {len(skipped)} skipped, {len(failures)} failed, written to {out}")
    if failures:
        raise SystemExit(1)
