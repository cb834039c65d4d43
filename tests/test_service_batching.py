"""Dynamic batching: concurrent requests share forward passes and each gets exactly its own answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app import create_app
from model.predictor import Predictor
from model.torch_predictor import TorchPredictor
from serving.batching import Batcher, BatcherClosed
from tests.support.bundles import tiny_bundle
from tests.support.service import metric_samples

PHOTOS = ("chelsea", "coffee", "astronaut", "china", "flower", "chelsea", "coffee", "china")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    path = tiny_bundle(tmp_path_factory.mktemp("tiny") / "tiny.pth", ["a", "b", "c", "d"])
    return TorchPredictor.from_file(path, device="cpu")


class Recorder:
    """Keeps the size of every batch the batcher ran."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, size: int, seconds: float) -> None:
        with self.lock:
            self.sizes.append(size)


RNG = np.random.default_rng(0)


def pixels(*shape: int) -> np.ndarray:
    """A random uint8 batch, as request threads submit them."""
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def test_concurrent_requests_batched_and_equal_to_sequential(tmp_path: Path, default_bundle: Path, photos) -> None:
    (tmp_path / "default.pth").symlink_to(default_bundle)
    # a long delay makes the grouping certain, so the test does not depend on the machine's speed
    app = create_app({"MODEL_DIR": str(tmp_path), "BATCH_MAX_SIZE": 8, "BATCH_MAX_DELAY_MS": 400})
    payloads = [photos[name].read_bytes() for name in PHOTOS]

    def ask(data: bytes) -> list[dict]:
        r = app.test_client().post("/predict?top_k=5", data=data, content_type="image/png")
        assert r.status_code == 200, r.get_json()
        return r.get_json()["predictions"]

    sequential = [ask(data) for data in payloads]
    with ThreadPoolExecutor(len(payloads)) as pool:
        concurrent = list(pool.map(ask, payloads))
    for seq, con in zip(sequential, concurrent, strict=True):
        assert [p["label"] for p in con] == [p["label"] for p in seq]
        assert [p["score"] for p in con] == pytest.approx([p["score"] for p in seq], abs=1e-4)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    buckets = metric_samples(text, "imgclf_inference_batch_size_bucket")
    count = metric_samples(text, "imgclf_inference_batch_size_count")['{model="default"}']
    total = metric_samples(text, "imgclf_inference_batch_size_sum")['{model="default"}']
    alone = buckets['{le="1.0",model="default"}']
    assert total == 2 * len(payloads)  # every image of both rounds, once
    assert count - alone >= 1, "no batch larger than one was formed"
    assert count < 2 * len(payloads)  # the concurrent round took fewer passes than images
    app.extensions["imgclf.models"].close()


def test_batches_never_exceed_max_size(tiny: Predictor) -> None:
    sizes = Recorder()
    batcher = Batcher(tiny.infer, max_size=4, max_delay_ms=200, name="tiny", on_batch=sizes)
    inputs = [pixels(1, *tiny.input_shape) for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        outputs = list(pool.map(batcher.submit, inputs))
    batcher.close()
    assert sum(sizes.sizes) == 10 and max(sizes.sizes) <= 4 and max(sizes.sizes) > 1
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(y, tiny.infer(x), atol=1e-5, rtol=1e-4)


def test_multi_image_requests_stay_together(tiny: Predictor) -> None:
    sizes = Recorder()
    batcher = Batcher(tiny.infer, max_size=4, max_delay_ms=100, name="tiny", on_batch=sizes)
    big = pixels(6, *tiny.input_shape)  # more than max_size: runs alone, in one pass
    small = pixels(3, *tiny.input_shape)
    with ThreadPoolExecutor(2) as pool:
        out_big, out_small = pool.map(batcher.submit, [big, small])
    batcher.close()
    assert out_big.shape[0] == 6 and out_small.shape[0] == 3
    assert sorted(sizes.sizes) == [3, 6]
    np.testing.assert_allclose(out_small, tiny.infer(small), atol=1e-5, rtol=1e-4)


def test_batching_off_runs_one_at_a_time(tiny: Predictor) -> None:
    sizes = Recorder()
    running, most = [0], [0]
    guard = threading.Lock()

    def infer(batch: np.ndarray) -> np.ndarray:
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return tiny.infer(batch)
        finally:
            with guard:
                running[0] -= 1

    batcher = Batcher(infer, max_size=1, name="tiny", on_batch=sizes)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(batcher.submit, [pixels(1, *tiny.input_shape) for _ in range(12)]))
    assert sizes.sizes == [1] * 12 and most[0] == 1


def test_an_inference_error_reaches_every_waiting_request(tiny: Predictor) -> None:
    batcher = Batcher(tiny.infer, max_size=8, max_delay_ms=200, name="tiny")
    wrong = pixels(1, 5, 32, 32)  # five channels: the model's own RuntimeError
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batcher.submit, wrong), pool.submit(batcher.submit, wrong)]
        for f in futures:
            with pytest.raises(RuntimeError):
                f.result()
    ok = batcher.submit(pixels(1, *tiny.input_shape))  # the batcher lives on
    assert ok.shape == (1, 4)
    batcher.close()


def test_closed_batcher_refuses_work(tiny: Predictor) -> None:
    batcher = Batcher(tiny.infer, max_size=4, name="tiny")
    batcher.start()
    assert batcher.alive
    batcher.close()
    assert not batcher.alive
    with pytest.raises(BatcherClosed):
        batcher.submit(pixels(1, *tiny.input_shape))


def test_malloc_keeps_freed_memory_on_glibc() -> None:
    """What gunicorn.conf.py's post_fork runs: glibc takes both thresholds and a 48 MiB block stays in the heap."""
    import platform

    from serving.allocator import mmap_probe, tune_glibc_malloc

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert tune_glibc_malloc() == {"mmap_threshold": None, "trim_threshold": None, "probe_mmapped": None}
        return
    result = tune_glibc_malloc()
    assert result == {"mmap_threshold": True, "trim_threshold": True, "probe_mmapped": False}
    assert mmap_probe() is False


def test_malloc_arena_cap_is_taken_unless_the_environment_sets_one() -> None:
    """glibc takes the arena cap post_fork asks for, in a fresh process; MALLOC_ARENA_MAX, when set, wins."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = "import json; from serving import allocator; print(json.dumps(allocator.tune_glibc_malloc(arena_max=2)))"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(ours.stdout)["arena_max"] is True
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True,
                            text=True, check=True, timeout=60)  # fmt: skip
    assert json.loads(theirs.stdout)["arena_max"] is None
