"""Teacher, phantoms, perturbations, synth archives and the archive reader (issue 4)."""
from __future__ import annotations

import csv
import zipfile

import numpy as np
from scipy import ndimage
import pytest
import torch

from model.remap import remap, sample_bilinear
from training.archive import FIT_RADIUS, Archive, fit_maps
from training.errors import ArchiveError
from training.perturb import random_perturbation
from training.phantoms import ANATOMIES, make_phantom
from training.synth import MANIFEST_COLUMNS, synthesise
from model.teacher import teacher


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory):
    """4 phantoms + 2 real radiographs, 2 acquisitions each, longest side <= 320 px."""
    return synthesise(tmp_path_factory.mktemp("arch") / "tiny", n=4, seed=7, perturbations=2, max_size=320)


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_teacher_on_phantom_is_monotonic_with_window_inside_unit_range(anatomy):
    ph = make_phantom(anatomy, 300, 260, seed=3)
    maps = teacher(ph.x, ph.mask)
    assert (maps.a >= 0).all()
    assert 0 <= maps.wc <= 1 and 0 < maps.ww <= 1
    assert maps.wc - maps.ww / 2 >= 0 and maps.wc + maps.ww / 2 <= 1
    # y is monotonic in x: for every pixel's own LUT (a >= 0), and on the ramp of x through one pixel
    ramp = torch.linspace(0, 1, 101)
    y = remap(ramp, float(maps.a[150, 130]), float(maps.b[150, 130]), maps.wc, maps.ww).y
    assert (torch.diff(y) >= 0).all()


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_phantom_has_anatomy_air_collimation_and_range(anatomy):
    ph = make_phantom(anatomy, 400, 300, seed=1)
    assert ph.x.dtype == np.float32 and 0 <= ph.x.min() and ph.x.max() <= 1
    assert 0.05 < ph.mask.mean() < 0.95  # anatomy, and something that is not anatomy
    border = np.concatenate([ph.x[0], ph.x[-1], ph.x[:, 0], ph.x[:, -1]])
    assert np.median(border) > np.median(ph.x[ph.mask])  # collimation is the bright plateau


def test_perturbation_ground_truth_is_exact():
    ph = make_phantom("chest", 256, 240, seed=2)
    maps = teacher(ph.x, ph.mask)
    for k in range(5):
        pert = random_perturbation(ph.x, np.random.default_rng(k))
        xp = pert.apply(ph.x)
        a2, b2 = pert.correct(maps.a, maps.b)
        assert 0 <= xp.min() and xp.max() <= 1
        assert np.ptp(pert.alpha) > 0  # a spatially varying gain, not only a global one
        ref = remap(torch.from_numpy(ph.x), torch.from_numpy(maps.a), torch.from_numpy(maps.b), maps.wc, maps.ww)
        out = remap(torch.from_numpy(xp), torch.from_numpy(a2), torch.from_numpy(b2), maps.wc, maps.ww)
        assert torch.allclose(out.y, ref.y, atol=1e-5) and torch.allclose(out.z, ref.z, atol=1e-5)


def test_synth_is_deterministic_for_a_seed(tmp_path):
    a = synthesise(tmp_path / "a", n=2, seed=11, perturbations=2, max_size=200, real=False)
    b = synthesise(tmp_path / "b", n=2, seed=11, perturbations=2, max_size=200, real=False)
    c = synthesise(tmp_path / "c", n=2, seed=12, perturbations=2, max_size=200, real=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "raw/chest-0000-p0.dcm").read_bytes() != (c / "raw/chest-0000-p0.dcm").read_bytes()


def test_synth_archive_format_and_no_leakage(tiny_archive):
    with open(tiny_archive / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert len(rows) == 6 * 2
    split_of = {}
    for r in rows:
        assert r["split"] in ("train", "val", "test")
        assert split_of.setdefault(r["group"], r["split"]) == r["split"]  # one split per anatomy
        assert (tiny_archive / r["raw"]).is_file() and (tiny_archive / r["params"]).is_file()
    assert {"train", "test"} <= set(split_of.values())
    import pydicom

    kinds = {(ds.Modality, ds.PhotometricInterpretation, ds.BitsStored)
             for ds in (pydicom.dcmread(tiny_archive / r["raw"]) for r in rows)}
    assert len(kinds) > 1  # mixed modality / photometric / bit depth


def test_perturbed_acquisitions_of_one_anatomy_share_their_target(tiny_archive, tmp_path):
    archive = Archive(tiny_archive, 8, cache=tmp_path / "cache")
    items = archive.items()
    by_group = {}
    for it in items:
        by_group.setdefault(it.group, []).append(it)
    for group, its in by_group.items():
        x0, x1 = np.asarray(its[0].x, np.float32), np.asarray(its[1].x, np.float32)
        z0, z1 = np.asarray(its[0].z, np.float32), np.asarray(its[1].z, np.float32)
        assert np.abs(x0 - x1).mean() > 0.01, group  # different acquisitions
        # the same presentation, up to the stored bit depth and the params' 1/4 resolution
        assert np.abs(z0 - z1).mean() < 0.01 * np.abs(x0 - x1).mean() + 4e-3, group


def test_zip_archive_reads_like_the_folder(tiny_archive, tmp_path):
    zpath = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in tiny_archive.rglob("*"):
            if p.is_file():
                z.write(p, p.relative_to(tiny_archive).as_posix())
    a = Archive(zpath, 8, cache=tmp_path / "zc").items("test")
    b = Archive(tiny_archive, 8, cache=tmp_path / "fc").items("test")
    assert [i.id for i in a] == [i.id for i in b]
    assert np.array_equal(np.asarray(a[0].z), np.asarray(b[0].z))


def test_cache_is_reused_not_redecoded(tiny_archive, tmp_path):
    cache = tmp_path / "cache"
    Archive(tiny_archive, 8, cache=cache).items()
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    Archive(tiny_archive, 8, cache=cache).items()
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


# ---- archive validation: every error names the row, column and file ---------------------------

def _copy_archive(src, dst):
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    return rows


def _write_manifest(path, rows):
    with open(path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_missing_file_is_named(tiny_archive, tmp_path):
    rows = _copy_archive(tiny_archive, tmp_path / "a")
    (tmp_path / "a" / rows[2]["raw"]).unlink()
    with pytest.raises(ArchiveError, match=rf"row 3 \(id '{rows[2]['id']}'\), column 'raw', file '{rows[2]['raw']}': missing file"):
        Archive(tmp_path / "a")


def test_unreadable_dicom_is_named(tiny_archive, tmp_path):
    rows = _copy_archive(tiny_archive, tmp_path / "a")
    (tmp_path / "a" / rows[4]["raw"]).write_bytes(b"this is not DICOM at all")
    with pytest.raises(ArchiveError, match=rf"row 5 \(id '{rows[4]['id']}'\), column 'raw', file '{rows[4]['raw']}': unreadable DICOM"):
        Archive(tmp_path / "a")


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[1].update(target=rows[3]["raw"], params=""),  # another anatomy: another size
     lambda rows: rf"row 2 \(id '{rows[1]['id']}'\), column 'target', file '{rows[3]['raw']}': target geometry mismatch"),
    (lambda rows: rows[0].update(split="training"),
     lambda rows: r"row 1 \(id '.*'\), column 'split': bad split value 'training'"),
    (lambda rows: rows[5].update(params=""),
     lambda rows: rf"row 6 \(id '{rows[5]['id']}'\): neither target nor params"),
], ids=["target geometry mismatch", "bad split value", "neither target nor params"])
def test_a_bad_manifest_row_is_named(tiny_archive, tmp_path, edit, message):
    rows = _copy_archive(tiny_archive, tmp_path / "a")
    edit(rows)
    _write_manifest(tmp_path / "a", rows)
    with pytest.raises(ArchiveError, match=message(rows)):
        Archive(tmp_path / "a")


def test_archive_errors_are_one_line_in_the_cli(tiny_archive, tmp_path):
    from click.testing import CliRunner

    from cli import main

    rows = _copy_archive(tiny_archive, tmp_path / "a")
    rows[0]["split"] = "nope"
    _write_manifest(tmp_path / "a", rows)
    result = CliRunner().invoke(main, ["train", "--archive", str(tmp_path / "a"), "--out", str(tmp_path / "w.pt")])
    assert result.exit_code == 2
    assert "bad split value 'nope'" in result.output and "Traceback" not in result.output


# ---- target-only rows: maps fitted from raw + target ------------------------------------------

def test_fit_maps_recovers_a_smooth_regional_lut():
    ph = make_phantom("pelvis", 512, 512, seed=4)  # the fit window (FIT_RADIUS px) small beside the anatomy
    maps = teacher(ph.x, ph.mask)
    y = np.clip(maps.a * ph.x + maps.b, 0, 1)
    a, b = fit_maps(ph.x, y)
    assert (a >= 0).all()
    fitted = remap(torch.from_numpy(ph.x), torch.from_numpy(a), torch.from_numpy(b), maps.wc, maps.ww).y
    target = torch.from_numpy(y)
    # where y is clipped no local fit can tell a from b: judged a fit window away from any clipping
    linear = torch.from_numpy(~ndimage.binary_dilation((y <= 0) | (y >= 1), iterations=FIT_RADIUS))
    assert linear.float().mean() > 0.2
    mse = float(((fitted - target)[linear] ** 2).mean())
    assert -10 * np.log10(mse) > 35


def test_target_only_rows_are_fitted(tiny_archive, tmp_path):
    """A target DICOM (the presentation z as pixels) instead of params: maps are fitted."""
    from training.synth import radiograph_dataset

    rows = _copy_archive(tiny_archive, tmp_path / "a")
    with_params = Archive(tiny_archive, 8, cache=tmp_path / "c0")
    item = with_params.item(with_params.rows[0])
    z = np.asarray(item.z, np.float32)
    ds = radiograph_dataset(z, bits=16, photometric="MONOCHROME2", modality="CR", uid_key="target-0")
    ds.save_as(tmp_path / "a" / "target0.dcm", enforce_file_format=True)
    rows[0]["target"], rows[0]["params"] = "target0.dcm", ""
    _write_manifest(tmp_path / "a", rows)
    archive = Archive(tmp_path / "a", 8, cache=tmp_path / "c1")
    fitted = archive.item(archive.rows[0])
    _, maps = fitted.low()
    assert (maps[0] >= 0).all() and (maps[3] > 0).all()
    x = torch.from_numpy(np.asarray(fitted.x, np.float32))
    z_fit = remap(x, *torch.from_numpy(maps)[:, None, None].unbind(0), downsample=8).z.numpy()
    psnr = -10 * np.log10(np.mean((z_fit - z) ** 2))
    # 22 dB: the phantoms' anatomical structure (1-2 % of this 320 px image, a few px) is finer
    # than the fit's 33 px window; on full-size images the fit is far closer (test above)
    assert psnr > 22, psnr


def test_synth_of_one_split_reproduces_those_rows_of_the_full_archive(tmp_path):
    full = synthesise(tmp_path / "full", n=6, seed=3, perturbations=2, max_size=160)
    test = synthesise(tmp_path / "test", n=6, seed=3, perturbations=2, max_size=160, only=("test",))
    names = sorted(p.name for p in (test / "raw").iterdir())
    assert names and all(n.startswith(("limb", "hand", "chest", "pelvis", "real")) for n in names)
    for name in names:
        assert (test / "raw" / name).read_bytes() == (full / "raw" / name).read_bytes()
    with open(test / "manifest.csv") as f:
        assert {r["split"] for r in csv.DictReader(f)} == {"test"}


# ---- augmentation: geometry and intensity keep the ground truth exact ----------------------------

@pytest.mark.parametrize("kind", ["none", "mirror", "affine", "intensity", "elastic", "noise", "fewer bits",
                                  "collimation", "marker", "real"])
def test_augmented_samples_keep_remap_of_maps_equal_to_target(tiny_archive, tmp_path, kind):
    from training.dataset import REAL_AUGMENT, AugmentConfig, crop_maps, make_sample

    off = dict(mirror=0, affine=0, intensity=0)
    aug = {
        "none": AugmentConfig(**off),
        "mirror": AugmentConfig(mirror=1, affine=0, intensity=0),
        "affine": AugmentConfig(mirror=0, affine=1, intensity=0),
        "intensity": AugmentConfig(mirror=0, affine=0, intensity=1),
        "elastic": AugmentConfig(**off, elastic=1),
        "noise": AugmentConfig(**off, noise=1),
        "fewer bits": AugmentConfig(**off, quantise=1),
        "collimation": AugmentConfig(**off, collimation=1),
        "marker": AugmentConfig(**off, marker=1),
        "real": REAL_AUGMENT,
    }[kind]
    archive = Archive(tiny_archive, 4, cache=tmp_path / "c")
    item = archive.items("train")[0]
    errors, changed = [], []
    for seed in range(3):
        s = make_sample(item, np.random.default_rng(seed), 96, 4, aug, points=2048)
        maps = crop_maps(s.maps[None], s.top, s.left, tuple(s.x_crop.shape[-2:]), 4)
        z = remap(s.x_crop[None], *maps.split(1, dim=1)).z[0]
        at = sample_bilinear(s.maps[None], s.pts_rc[:, 0], s.pts_rc[:, 1], 4)[0]
        zp = remap(s.pts_x, *at.unbind(0)).z.reshape(-1)
        weight = torch.ones_like(z) if s.weight is None else s.weight
        pts_weight = torch.ones_like(zp) if s.pts_weight is None else s.pts_weight
        errors.append(max(float(((z - s.z_crop).abs() * weight).sum() / weight.sum().clamp_min(1)),
                          float(((zp - s.pts_z).abs() * pts_weight).sum() / pts_weight.sum().clamp_min(1))))
        clean = make_sample(item, np.random.default_rng(seed), 96, 4, AugmentConfig(**off), points=2048)
        if kind == "collimation":  # what covers the anatomy carries no weight in the loss
            assert 0 < float(pts_weight.mean()) < 1
        changed.append(float((s.x_low - clean.x_low).abs().max()))
        if kind == "noise":
            assert float((s.x_crop - clean.x_crop).std()) > 1e-3
    # the maps are carried at 1/4 resolution, so the crop matches to that approximation
    assert max(errors) < 0.02, errors
    if kind in ("marker", "collimation", "real"):  # what covers the anatomy shows in the model's input
        assert max(changed) > 0.05


def test_synth_zip_is_a_readable_archive(tmp_path):
    zpath = synthesise(tmp_path / "z", n=2, seed=5, perturbations=2, max_size=128, real=False, make_zip=True)
    assert zpath.suffix == ".zip" and zipfile.is_zipfile(zpath)
    items = Archive(zpath, 8, cache=tmp_path / "c").items()
    assert len(items) == 4 and items[0].z.shape == items[0].x.shape


def test_an_archive_that_is_neither_folder_nor_zip_is_named(tmp_path):
    not_zip = tmp_path / "manifest.csv"
    not_zip.write_text("id,raw,target,params,split\n")
    with pytest.raises(ArchiveError, match="not a folder or a .zip file"):
        Archive(not_zip)


def test_real_radiographs_make_up_the_asked_share_of_each_epoch(tiny_archive, tmp_path):
    from training.loop import TrainConfig, epoch_order, is_real

    items = Archive(tiny_archive, 4, cache=tmp_path / "c").items()
    real = sum(is_real(i) for i in items)
    assert 0 < real < len(items)
    for fraction in (0.0, 0.34, 0.5):
        order = epoch_order(items, TrainConfig(real_fraction=fraction), epoch=0)
        assert set(order) == set(range(len(items)))  # every row at least once
        share = np.mean([is_real(items[i]) for i in order])
        assert share >= min(fraction, 0.99) - 0.02 and (fraction > 0 or share == real / len(items))
    again = epoch_order(items, TrainConfig(real_fraction=0.34), epoch=0)
    assert (again == epoch_order(items, TrainConfig(real_fraction=0.34), epoch=0)).all()  # seeded


def test_the_robust_image_term_is_the_mse_where_small_and_grows_slowly_beyond_its_scale():
    from training.loop import robust

    small, large = torch.tensor(1e-5), torch.tensor(1e-1)
    assert float(robust(small, 2e-3)) == pytest.approx(1e-5, rel=0.01)
    assert float(robust(large, 2e-3)) < 0.01
    assert float(robust(large, 0.0)) == pytest.approx(0.1)


def test_a_target_carrying_a_sigmoid_window_is_read_through_that_window(tiny_archive, tmp_path):
    """A target whose VOI LUT Function is SIGMOID (PS3.3 C.11.2.1.3.1) holds y; its window tags
    give wc, ww, and z is y under that window (not a window guessed from the pixels)."""
    from training.synth import radiograph_dataset

    rows = _copy_archive(tiny_archive, tmp_path / "a")
    with_params = Archive(tiny_archive, 8, cache=tmp_path / "c0")
    x = np.asarray(with_params.item(with_params.rows[0]).x, np.float32)
    y = np.clip(0.8 * x + 0.1, 0, 1)
    ds = radiograph_dataset(y, bits=16, photometric="MONOCHROME2", modality="CR", uid_key="sigmoid-target")
    ds.VOILUTFunction, ds.WindowCenter, ds.WindowWidth = "SIGMOID", 0.45 * 65535, 0.5 * 65535
    ds.save_as(tmp_path / "a" / "target0.dcm", enforce_file_format=True)
    rows[0]["target"], rows[0]["params"] = "target0.dcm", ""
    _write_manifest(tmp_path / "a", rows)

    item = Archive(tmp_path / "a", 8, cache=tmp_path / "c1").item(Archive(tmp_path / "a", 8).rows[0])
    _, maps = item.low()
    assert maps[2] == pytest.approx(0.45, abs=1e-6) and maps[3] == pytest.approx(0.5, abs=1e-6)
    y_stored = np.rint(y * 65535) / 65535
    z = 1 / (1 + np.exp(-4 * (y_stored - 0.45) / 0.5))
    assert np.abs(np.asarray(item.z, np.float32) - z).max() < 2e-3  # float16 cache
    # the fitted maps reproduce it through the remap (y = 0.8 x + 0.1 is what they found)
    z_fit = remap(torch.from_numpy(x), *torch.from_numpy(maps)[:, None, None].unbind(0), downsample=8).z.numpy()
    assert -10 * np.log10(np.mean((z_fit - z) ** 2)) > 35
    assert np.median(maps[0]) == pytest.approx(0.8, abs=0.05) and np.median(maps[1]) == pytest.approx(0.1, abs=0.05)

def test_a_synthetic_dx_is_labelled_for_processing_as_its_sop_class_says():
    """DX For Processing (PS3.3 C.8.11.1.1.1): Presentation Intent Type must say FOR PROCESSING."""
    from pydicom.uid import DigitalXRayImageStorageForProcessing

    from dicom_node.reader import read_radiograph
    from training.synth import radiograph_dataset

    x = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    ds = radiograph_dataset(x, bits=12, photometric="MONOCHROME2", modality="DX", uid_key="dx-label")
    assert ds.SOPClassUID == DigitalXRayImageStorageForProcessing
    assert ds.PresentationIntentType == "FOR PROCESSING"
    assert np.abs(read_radiograph(ds) - x).max() <= 0.5 / 4095 + 1e-6
