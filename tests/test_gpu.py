"""The `--device cuda` paths: run where a CUDA device is, skipped with the reason where none is.
The batched predict path (what a GPU gains from several images at once) is checked on the CPU
too, so it is tested on every machine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.enhancer import Enhancer
from dicom_node.reader import load_dataset, read_radiograph
from model.predictor import Predictor
from model.remap import remap
from support.helpers import make_seeded_checkpoint, phantom_radiograph, testdata

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the --device cuda paths need a GPU"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    return make_seeded_checkpoint(tmp_path_factory.mktemp("weights") / "seeded.pt")


def images(n: int, rows: int = 301, cols: int = 243) -> list[np.ndarray]:
    return [phantom_radiograph(rows, cols, 12, seed=i).astype(np.float32) / 4095 for i in range(n)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_a_batch_gives_each_image_the_maps_it_gets_alone(seeded, device):
    predictor = Predictor(seeded, device)
    xs = images(3)
    alone = [predictor(x, want_z=True) for x in xs]
    together = predictor.enhance_batch(xs, want_z=True)
    for a, b in zip(alone, together):
        assert torch.allclose(a.maps, b.maps, atol=1e-5)
        assert torch.allclose(a.y, b.y, atol=1e-5) and torch.allclose(a.z, b.z, atol=1e-5)
    with pytest.raises(ValueError, match="one size"):
        predictor.predict_batch([predictor.pre_process(xs[0]), predictor.pre_process(images(1, 100, 90)[0])])


@cuda
def test_the_remap_on_cuda_equals_the_cpu_remap():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 1001, 777, generator=g)
    maps = [torch.rand(1, 1, 126, 98, generator=g) + 0.05 for _ in range(4)]
    on_cpu = remap(x, *maps, downsample=8)
    on_gpu = remap(x.cuda(), *(m.cuda() for m in maps), downsample=8)
    assert on_gpu.y.is_cuda
    assert torch.allclose(on_gpu.y.cpu(), on_cpu.y, atol=1e-5)
    assert torch.allclose(on_gpu.z.cpu(), on_cpu.z, atol=1e-4)


@cuda
@pytest.mark.parametrize("mode", ["voi", "burn-in"])
def test_enhancing_on_cuda_gives_the_cpu_result(seeded, mode):
    source = load_dataset(testdata("RG1_UNCR.dcm"))
    on_cpu = Enhancer(seeded, device="cpu", mode=mode).enhance(source)
    on_gpu = Enhancer(seeded, device="cuda", mode=mode).enhance(source)
    assert on_gpu.SOPInstanceUID == on_cpu.SOPInstanceUID
    diff = np.abs(on_gpu.pixel_array.astype(np.int32) - on_cpu.pixel_array.astype(np.int32))
    assert diff.max() <= 64, diff.max()  # 1/1000 of the range: float32 on another device, not another result
    assert diff.mean() < 2


@cuda
def test_the_enhance_command_runs_on_cuda(seeded, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "enhance",
                             str(testdata("RG1_UNCR.dcm")), "--out", str(tmp_path), "--weights", str(seeded),
                             "--device", "cuda"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (out,) = list(tmp_path.rglob("*.dcm"))
    assert pydicom.dcmread(out).pixel_array.shape == read_radiograph(load_dataset(testdata("RG1_UNCR.dcm"))).shape
