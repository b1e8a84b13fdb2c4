"""Dynamic batching (model.batching) and the Predictor and worker that use it: same-size images
from several threads share a network call, and each caller gets its own image's result."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from model.batching import DynamicBatcher


def _batcher(max_size: int, max_wait: float, fail: bool = False):
    batches = []

    def run(items):
        batches.append(list(items))
        if fail:
            raise RuntimeError("the network broke")
        return [("result", item) for item in items]
    return DynamicBatcher(run, max_size, max_wait), batches


def _together(batcher, calls):
    """`calls` [(item, key)] made from as many threads at once."""
    start = threading.Barrier(len(calls))

    def call(args):
        start.wait()
        return batcher(*args)
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call, args) for args in calls]
    return futures


@pytest.mark.timeout(30)
def test_callers_that_fill_a_batch_share_one_run_and_each_gets_its_own_result():
    batcher, batches = _batcher(max_size=3, max_wait=10.0)  # only full batches run before 10 s
    futures = _together(batcher, [(i, "512x512") for i in range(6)])
    assert [f.result() for f in futures] == [("result", i) for i in range(6)]
    assert sorted(len(b) for b in batches) == [3, 3]
    assert sorted(i for b in batches for i in b) == list(range(6))


@pytest.mark.timeout(30)
def test_a_lone_caller_runs_alone_once_its_wait_is_over():
    batcher, batches = _batcher(max_size=4, max_wait=0.05)
    assert batcher("x", "key") == ("result", "x")
    assert batches == [["x"]]


@pytest.mark.timeout(30)
def test_different_sizes_are_never_mixed_in_a_batch():
    batcher, batches = _batcher(max_size=8, max_wait=0.2)
    calls = [(i, "big" if i % 2 else "small") for i in range(8)]
    futures = _together(batcher, calls)
    assert [f.result() for f in futures] == [("result", i) for i in range(8)]
    for batch in batches:
        assert len({i % 2 for i in batch}) == 1, batches


@pytest.mark.timeout(30)
def test_every_caller_of_a_failed_batch_gets_its_error():
    batcher, _ = _batcher(max_size=2, max_wait=10.0, fail=True)
    futures = _together(batcher, [(i, "k") for i in range(2)])
    for future in futures:
        with pytest.raises(RuntimeError, match="the network broke"):
            future.result()


@pytest.mark.parametrize("size, wait", [(0, 0.01), (2, -1.0), (1.5, 0.01)])
def test_the_batcher_refuses_a_bad_size_or_wait(size, wait):
    with pytest.raises(ValueError):
        DynamicBatcher(lambda items: items, size, wait)


@pytest.mark.timeout(120)
def test_a_batching_predictor_gives_each_thread_the_maps_of_its_own_image(tmp_path):
    from model.predictor import Predictor
    from support.helpers import make_seeded_checkpoint

    weights = make_seeded_checkpoint(tmp_path / "seeded.pt")  # maps that vary with the image
    rng = np.random.default_rng(0)
    images = [rng.random((256, 192), dtype=np.float32) for _ in range(4)]
    alone = Predictor(weights, "cpu", batch=1)
    batching = Predictor(weights, "cpu", batch=4)
    runs = []
    predict_batch = batching.predict_batch
    batching.predict_batch = lambda xs: runs.append(len(xs)) or predict_batch(xs)
    batching._batcher.run = batching.predict_batch
    futures = _together(lambda x, key: batching(x), [(x, None) for x in images])
    for x, future in zip(images, futures):
        expected = alone(x)
        got = future.result()
        torch.testing.assert_close(got.maps, expected.maps, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.y, expected.y, atol=1e-5, rtol=1e-4)
    assert sum(runs) == 4 and len(runs) < 4, runs  # they shared the network


def test_the_batch_is_eight_on_a_gpu_and_one_on_the_cpu_unless_set(tmp_path):
    from model.predictor import GPU_BATCH, Predictor

    assert Predictor(tmp_path / "unused.pt", "cpu").batch == 1
    assert Predictor(tmp_path / "unused.pt", "cpu", batch=3).batch == 3
    assert GPU_BATCH == 8
    with pytest.raises(ValueError, match="batch"):
        Predictor(tmp_path / "unused.pt", "cpu", batch=-1)


@pytest.mark.timeout(300)
def test_a_worker_with_a_batch_of_4_derives_the_same_pixels_as_one_at_a_time(tmp_path):
    import pydicom

    from dicom_node import worker as worker_module
    from dicom_node.config import load_config
    from support.helpers import make_seeded_checkpoint, phantom_dataset, write_worker_config

    weights = make_seeded_checkpoint(tmp_path / "seeded.pt")
    pixels = {}
    for batch in (1, 4):
        folder = tmp_path / f"batch{batch}"
        folder.mkdir()
        config_path = write_worker_config(folder, weights, processes=1, threads=1, enhance=("CR",), batch=batch)
        config = load_config(config_path)
        enhancer, is_ours, _ = worker_module._load_enhancer(config)
        worker = worker_module.Worker(config, enhancer, is_ours)
        assert worker.concurrency == max(worker_module.PREPARE_CONCURRENCY, batch)
        for i in range(8):
            ds = phantom_dataset(256, 200, seed=i)
            path = worker.spool.store_received(lambda f, ds=ds: ds.save_as(f, enforce_file_format=True),
                                               ds.SOPInstanceUID)
            worker.queue.add(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path)
        plans = worker.prepare_batch(worker.queue.claim(16))
        assert all(p.ready for p in plans)
        pixels[batch] = [pydicom.dcmread(worker.spool.derived_path(p.job.id)).pixel_array.astype(int) for p in plans]
    for one, batched in zip(pixels[1], pixels[4]):
        assert np.abs(one - batched).max() <= 1  # float rounding at most; another image's maps would show
