"""DynamicBatcher: merging, splitting, deadlines, cancellation, model isolation, errors, close."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from detector_server.batcher import DynamicBatcher


@dataclass(frozen=True)
class _Out:
    value: np.ndarray      # float32 [N]: the first pixel of each image, to check routing
    model: np.ndarray      # int64 [N]: which model scored it


class FakeModel:
    """Records every batch; score = first pixel value, so results can be traced to inputs."""

    def __init__(self, tag: int = 0, delay: float = 0.0, fail: bool = False):
        self.tag, self.delay, self.fail = tag, delay, fail
        self.batches: list[list[int]] = []
        self.started = threading.Event()

    def score_arrays(self, images: np.ndarray) -> _Out:
        self.started.set()
        self.batches.append(images[:, 0, 0, 0].tolist())
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return _Out(images[:, 0, 0, 0].astype(np.float32), np.full(len(images), self.tag))


def _images(*values: int) -> np.ndarray:
    a = np.zeros((len(values), 2, 2, 3), np.uint8)
    a[:, 0, 0, 0] = values
    return a


def test_concurrent_requests_share_a_batch_and_get_their_own_rows():
    async def main():
        model = FakeModel(delay=0.05)
        b = DynamicBatcher(max_batch=64)
        first = asyncio.ensure_future(b.score(model, _images(1)))      # occupies the model
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.score(model, _images(10 + i, 20 + i))) for i in range(5)]
        outs = await asyncio.gather(first, *rest)
        await b.close()
        return model, outs

    model, outs = asyncio.run(main())
    assert model.batches[0] == [1]
    assert len(model.batches) == 2 and len(model.batches[1]) == 10    # the 5 waiting requests
    for i, out in enumerate(outs[1:]):
        assert out.value.tolist() == [10 + i, 20 + i]


def test_max_batch_is_respected_and_big_requests_are_split_and_joined():
    async def main():
        model = FakeModel()
        b = DynamicBatcher(max_batch=4)
        out = await b.score(model, _images(*range(10)))
        await b.close()
        return model, out

    model, out = asyncio.run(main())
    assert out.value.tolist() == list(range(10))
    assert max(len(x) for x in model.batches) <= 4 and sum(map(len, model.batches)) == 10


def test_max_wait_collects_a_fuller_batch():
    async def main():
        model = FakeModel()
        b = DynamicBatcher(max_batch=8, max_wait_ms=200)
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(b.score(model, _images(i))) for i in range(3)]
        await asyncio.sleep(0.02)
        tasks += [asyncio.ensure_future(b.score(model, _images(i))) for i in range(3, 8)]
        await asyncio.gather(*tasks)   # 8 images fill the batch: sent before max_wait
        elapsed = time.monotonic() - t0
        await b.close()
        return model, elapsed

    model, elapsed = asyncio.run(main())
    assert model.batches == [list(range(8))]
    assert elapsed < 0.2


def test_expired_work_is_dropped_before_the_model():
    async def main():
        model = FakeModel(delay=0.2)
        b = DynamicBatcher(max_batch=64)
        busy = asyncio.ensure_future(b.score(model, _images(1)))
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await b.score(model, _images(99), deadline=time.monotonic() + 0.05)
        await busy
        await b.close()
        return model

    model = asyncio.run(main())
    assert model.batches == [[1]]     # 99 never reached the model


def test_cancelled_caller_work_is_dropped():
    async def main():
        model = FakeModel(delay=0.2)
        b = DynamicBatcher(max_batch=64)
        busy = asyncio.ensure_future(b.score(model, _images(1)))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(b.score(model, _images(77)))
        await asyncio.sleep(0.01)
        gone.cancel()
        kept = asyncio.ensure_future(b.score(model, _images(5)))
        await asyncio.gather(busy, kept)
        await b.close()
        return model

    model = asyncio.run(main())
    assert model.batches == [[1], [5]]


def test_models_are_never_mixed_in_one_batch():
    async def main():
        old, new = FakeModel(tag=1, delay=0.05), FakeModel(tag=2)
        b = DynamicBatcher(max_batch=64)
        busy = asyncio.ensure_future(b.score(old, _images(0)))
        await asyncio.sleep(0.01)
        a = asyncio.ensure_future(b.score(old, _images(1)))
        c = asyncio.ensure_future(b.score(new, _images(2)))
        d = asyncio.ensure_future(b.score(old, _images(3)))
        outs = await asyncio.gather(busy, a, c, d)
        await b.close()
        return old, new, outs

    old, new, outs = asyncio.run(main())
    assert [o.model.tolist() for o in outs] == [[1], [1], [2], [1]]
    assert old.batches == [[0], [1, 3]] and new.batches == [[2]]


def test_model_error_reaches_every_caller_of_the_batch_and_the_batcher_survives():
    async def main():
        bad, good = FakeModel(fail=True, delay=0.05), FakeModel()
        b = DynamicBatcher(max_batch=64)
        busy = asyncio.ensure_future(b.score(bad, _images(0)))
        await asyncio.sleep(0.01)
        x = asyncio.ensure_future(b.score(bad, _images(1)))
        y = asyncio.ensure_future(b.score(bad, _images(2)))
        results = await asyncio.gather(busy, x, y, return_exceptions=True)
        after = await b.score(good, _images(3))
        await b.close()
        return results, after

    results, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after.value.tolist() == [3]


def test_close_finishes_queued_work_then_refuses():
    async def main():
        model = FakeModel(delay=0.05)
        b = DynamicBatcher(max_batch=2)
        tasks = [asyncio.ensure_future(b.score(model, _images(i))) for i in range(5)]
        await asyncio.sleep(0)
        await b.close()
        done = [t.result().value.tolist() for t in tasks]
        with pytest.raises(RuntimeError, match="closed"):
            await b.score(model, _images(9))
        return done

    assert asyncio.run(main()) == [[i] for i in range(5)]


@pytest.mark.parametrize("kwargs, match", [({"max_batch": 0}, "max_batch"),
                                           ({"max_batch": 2.5}, "max_batch"),
                                           ({"max_wait_ms": -1}, "max_wait_ms")])
def test_bad_options_raise(kwargs, match):
    async def main():
        DynamicBatcher(**kwargs)

    with pytest.raises(ValueError, match=match):
        asyncio.run(main())


def test_bad_images_raise():
    async def main():
        b = DynamicBatcher()
        try:
            await b.score(FakeModel(), np.zeros((0, 2, 2, 3), np.uint8))
        finally:
            await b.close()

    with pytest.raises(ValueError, match="images"):
        asyncio.run(main())
