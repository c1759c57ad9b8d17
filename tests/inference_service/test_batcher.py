"""The micro-batcher alone, with a plain numpy runner (no TensorFlow): batching, guards."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from imagemesh.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from inference_service.batcher import BatcherConfig, MicroBatcher, Runner, padded_sizes


class CountingRunner:
    """Sums each image's pixels; records the batch shapes it saw; can be held to block."""

    def __init__(self) -> None:
        self.shapes: list[int] = []
        self.computed: list[float] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(10)
        self.shapes.append(batch.shape[0])
        sums = batch.reshape(batch.shape[0], -1).sum(axis=1)
        self.computed.extend(float(s) for s in sums)
        return np.stack([sums, -sums], axis=1)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


def _image(value: float) -> np.ndarray:
    return np.full((2, 2, 3), value, dtype=np.float32)


def test_padded_sizes_are_few_and_cover_every_size() -> None:
    assert padded_sizes(1) == (1,)
    assert padded_sizes(32) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    sizes = padded_sizes(100)
    assert sizes[-1] == 100
    for n in range(1, 101):  # every batch fits a size wasting at most a third of it
        padded = next(s for s in sizes if s >= n)
        assert padded - n <= max(1, padded // 3)


async def test_concurrent_images_are_batched_and_each_gets_its_own_output(executor) -> None:
    runner = CountingRunner()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=8), executor)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(_image(i)) for i in range(40)))
    await batcher.close()
    for i, result in enumerate(results):
        assert result.output[0] == pytest.approx(i * 12)
        assert result.output[1] == pytest.approx(-i * 12)
    assert max(r.batch_size for r in results) == 8
    assert all(shape in padded_sizes(8) for shape in runner.shapes)


async def test_one_caller_in_a_loop_is_not_delayed_waiting_for_others(executor) -> None:
    runner = CountingRunner()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=5.0)
    batcher = MicroBatcher(runner, config, executor)
    batcher.start()
    # With a 5 s delay, waiting for a fuller batch would make this test hang for 15 s.
    for i in range(3):
        result = await asyncio.wait_for(batcher.submit(_image(i)), timeout=4.0)
        assert result.batch_size == 1
    await batcher.close()


async def test_callers_coming_back_one_by_one_still_fill_whole_batches(executor) -> None:
    runner = CountingRunner()
    # Each caller's next call comes 80 ms after the previous one's (0.4 s in all): longer
    # than the arrival gap in total, far shorter between two arrivals.
    config = BatcherConfig(max_batch_size=6, max_queue_delay_s=5.0, arrival_gap_s=0.3)
    batcher = MicroBatcher(runner, config, executor)
    batcher.start()

    async def caller(i: int) -> list[int]:
        sizes = []
        for _ in range(3):
            sizes.append((await batcher.submit(_image(i))).batch_size)
            await asyncio.sleep(0.08 * i)
        return sizes

    sizes = await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(6))), timeout=20)
    await batcher.close()
    assert all(size == 6 for per_caller in sizes for size in per_caller)
    assert runner.shapes == [6, 6, 6]


async def test_waiting_for_a_fuller_batch_stops_when_calls_stop_coming(executor) -> None:
    runner = CountingRunner()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=5.0, arrival_gap_s=0.05)
    batcher = MicroBatcher(runner, config, executor)
    batcher.start()
    first = await asyncio.gather(*(batcher.submit(_image(i)) for i in range(8)))
    assert {r.batch_size for r in first} == {8}  # the batcher now expects 8 callers
    # Only 3 come back: they are served once none arrived for the gap, not after 5 s.
    again = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(_image(i)) for i in range(3))), timeout=4.0
    )
    assert {r.batch_size for r in again} == {3}
    await batcher.close()


async def test_an_expired_image_is_dropped_before_compute(executor) -> None:
    runner = CountingRunner()
    runner.release.clear()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=4), executor)
    batcher.start()
    loop = asyncio.get_running_loop()
    blocker = asyncio.ensure_future(batcher.submit(_image(1)))
    await asyncio.to_thread(runner.entered.wait, 10)  # the compute thread is now busy
    doomed = asyncio.ensure_future(batcher.submit(_image(2), deadline=loop.time() + 0.05))
    await asyncio.sleep(0.2)  # its deadline passes while it waits
    runner.release.set()
    assert (await blocker).output[0] == pytest.approx(12)
    with pytest.raises(DeadlineExceeded):
        await doomed
    await batcher.close()
    assert 24.0 not in runner.computed  # the expired image never reached the model


async def test_a_full_queue_refuses_with_a_retry_delay(executor) -> None:
    runner = CountingRunner()
    runner.release.clear()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=1, queue_capacity=2), executor)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(_image(0)))
    await asyncio.to_thread(runner.entered.wait, 10)
    queued = [asyncio.ensure_future(batcher.submit(_image(i))) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as info:
        await batcher.submit(_image(3))
    assert info.value.retry_after_s is not None
    assert info.value.retry_after_s > 0
    runner.release.set()
    await asyncio.gather(first, *queued)
    await batcher.close()


async def test_a_cancelled_caller_is_skipped(executor) -> None:
    runner = CountingRunner()
    runner.release.clear()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=4), executor)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(_image(1)))
    await asyncio.to_thread(runner.entered.wait, 10)
    gone = asyncio.ensure_future(batcher.submit(_image(5)))
    kept = asyncio.ensure_future(batcher.submit(_image(6)))
    await asyncio.sleep(0)
    gone.cancel()
    runner.release.set()
    await first
    assert (await kept).output[0] == pytest.approx(72)
    await batcher.close()
    assert 60.0 not in runner.computed


async def test_a_failing_batch_fails_its_calls_and_the_batcher_goes_on(executor) -> None:
    calls = {"n": 0}

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.ones((batch.shape[0], 1), dtype=np.float32)

    batcher = MicroBatcher(flaky, BatcherConfig(max_batch_size=4), executor)
    batcher.start()
    with pytest.raises(RuntimeError):
        await batcher.submit(_image(1))
    assert (await batcher.submit(_image(1))).output[0] == 1
    await batcher.close()


async def test_a_batch_the_executor_refuses_fails_its_calls_instead_of_hanging() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()  # submit now raises RuntimeError
    batcher = MicroBatcher(CountingRunner(), BatcherConfig(max_batch_size=4), pool)
    batcher.start()
    with pytest.raises(RuntimeError, match="shutdown"):
        await asyncio.wait_for(batcher.submit(_image(1)), timeout=5)
    await asyncio.wait_for(batcher.close(), timeout=5)  # nothing is left computing


async def test_batches_queue_delay_and_compute_time_are_exported_to_prometheus(executor) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = {
        name: sample(name)
        for name in (
            "imagemesh_inference_batch_size_count",
            "imagemesh_inference_batch_size_sum",
            "imagemesh_inference_queue_delay_seconds_count",
            "imagemesh_inference_compute_seconds_count",
        )
    }
    batcher = MicroBatcher(CountingRunner(), BatcherConfig(max_batch_size=4), executor)
    batcher.start()
    await asyncio.gather(*(batcher.submit(_image(i)) for i in range(4)))
    # The loop observes a batch on its next turn after the answers: closing takes more turns.
    await batcher.close()
    batches = (
        sample("imagemesh_inference_batch_size_count")
        - before["imagemesh_inference_batch_size_count"]
    )
    assert batches >= 1
    assert (
        sample("imagemesh_inference_batch_size_sum") - before["imagemesh_inference_batch_size_sum"]
        == 4
    )
    assert (
        sample("imagemesh_inference_queue_delay_seconds_count")
        - before["imagemesh_inference_queue_delay_seconds_count"]
        == 4
    )
    assert (
        sample("imagemesh_inference_compute_seconds_count")
        - before["imagemesh_inference_compute_seconds_count"]
        == batches
    )


async def test_steps_make_their_images_on_the_compute_thread_and_a_failure_stays_alone(
    executor,
) -> None:
    runner = CountingRunner()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=8), executor)
    batcher.start()
    threads: list[str] = []

    def step(value: float) -> np.ndarray:
        threads.append(threading.current_thread().name)
        if value == 3:
            raise ValueError("not an image")
        return _image(value)

    outcomes = await asyncio.gather(
        *(batcher.submit(lambda v=float(i): step(v)) for i in range(6)),
        batcher.submit(_image(10)),
        return_exceptions=True,
    )
    await batcher.close()
    assert isinstance(outcomes[3], ValueError)
    answers = [o for i, o in enumerate(outcomes) if i != 3]
    for value, result in zip((0, 1, 2, 4, 5, 10), answers, strict=True):
        assert not isinstance(result, BaseException)
        assert result.output[0] == pytest.approx(value * 12)  # its own row, despite the gap
        assert result.batch_size == 6  # the failed image is not counted as computed
    assert threads
    assert threading.main_thread().name not in threads


async def test_images_queued_during_a_batch_wait_for_its_callers_to_come_back(executor) -> None:
    runner = CountingRunner()
    runner.release.clear()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=5.0, arrival_gap_s=0.05)
    batcher = MicroBatcher(runner, config, executor)
    batcher.start()
    first = [asyncio.ensure_future(batcher.submit(_image(i))) for i in range(4)]
    await asyncio.to_thread(runner.entered.wait, 10)
    early = asyncio.ensure_future(batcher.submit(_image(9)))  # came during the batch
    await asyncio.sleep(0)  # its task runs: queued before the batch ends
    assert batcher.pending == 1
    runner.release.set()
    assert {r.batch_size for r in await asyncio.gather(*first)} == {4}
    # The 4 callers come back later than the arrival gap: the early image waits for them
    # instead of leaving alone once the gap has passed.
    await asyncio.sleep(0.2)
    again = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(_image(i)) for i in range(4))), timeout=4.0
    )
    assert (await early).batch_size == 5
    assert {r.batch_size for r in again} == {5}
    await batcher.close()


class ConcurrentRunner(CountingRunner):
    """A CountingRunner that records how many batches it computes at the same time, and
    can be told to wait until `meet` batches are in it at once."""

    def __init__(self, meet: int = 0) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._active = 0
        self.most_at_once = 0
        self._meet = threading.Barrier(meet, timeout=5) if meet else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._active += 1
            self.most_at_once = max(self.most_at_once, self._active)
        try:
            if self._meet is not None:
                self._meet.wait()  # broken (the batch fails) unless both run at once
            return super().__call__(batch)
        finally:
            with self._lock:
                self._active -= 1


@contextlib.asynccontextmanager
async def _started(
    runner: Runner, config: BatcherConfig, threads: int | None = None
) -> AsyncIterator[MicroBatcher]:
    """A started batcher on an executor of `threads` (default: one per instance); closed
    after the block, before the executor shuts down."""
    with ThreadPoolExecutor(threads or config.instances) as pool:
        batcher = MicroBatcher(runner, config, pool)
        batcher.start()
        try:
            yield batcher
        finally:
            await batcher.close()


async def test_two_instances_share_the_queue_and_compute_two_batches_at_once() -> None:
    runner = ConcurrentRunner(meet=2)
    async with _started(runner, BatcherConfig(max_batch_size=8, instances=2)) as batcher:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(_image(i)) for i in range(8))), timeout=10
        )
    # Eight waiting images and two free instances: two batches of four, computed together.
    assert sorted(runner.shapes) == [4, 4]
    assert runner.most_at_once == 2
    for i, result in enumerate(results):
        assert result.output[0] == pytest.approx(i * 12)
        assert result.batch_size == 4


async def test_one_instance_computes_one_batch_at_a_time_even_with_more_threads() -> None:
    runner = ConcurrentRunner()
    runner.release.clear()
    config = BatcherConfig(max_batch_size=4, instances=1)
    async with _started(runner, config, threads=2) as batcher:
        first = asyncio.ensure_future(batcher.submit(_image(1)))
        await asyncio.to_thread(runner.entered.wait, 10)
        rest = [asyncio.ensure_future(batcher.submit(_image(i))) for i in range(2, 6)]
        await asyncio.sleep(0.1)  # a second instance, if there were one, would start now
        runner.release.set()
        await asyncio.gather(first, *rest)
    assert runner.most_at_once == 1
    assert runner.shapes == [1, 4]


async def test_closing_waits_for_every_instance_s_batch() -> None:
    runner = ConcurrentRunner()
    runner.release.clear()
    async with _started(runner, BatcherConfig(max_batch_size=2, instances=2)) as batcher:
        calls = [asyncio.ensure_future(batcher.submit(_image(i))) for i in range(4)]
        await asyncio.to_thread(runner.entered.wait, 10)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.1)
        assert not closing.done()  # two batches are still being computed
        runner.release.set()
        await asyncio.wait_for(closing, timeout=10)
        # Every call was answered before close returned.
        assert all(call.done() and not call.exception() for call in calls)
    assert sorted(runner.shapes) == [2, 2]
    assert runner.most_at_once == 2


async def test_callers_in_a_closed_loop_are_shared_between_the_instances() -> None:
    runner = ConcurrentRunner()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=1.0, instances=2)
    async with _started(runner, config) as batcher:

        async def caller(i: int) -> None:
            for _ in range(4):
                await batcher.submit(_image(i))

        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(8))), timeout=20)
    # 8 callers, 2 instances: no batch takes more than its share once the concurrency is
    # known, so neither instance idles while the other computes everything.
    assert max(runner.shapes) <= 4
    assert sum(runner.shapes) == 32


async def test_with_two_instances_a_batch_waits_only_for_its_share_of_the_callers() -> None:
    events: list[str] = []

    class Logged(ConcurrentRunner):
        def __call__(self, batch: np.ndarray) -> np.ndarray:
            events.append(f"batch {batch.shape[0]}")
            return super().__call__(batch)

    runner = Logged()
    # Callers come back 80 ms apart (0.56 s for all 8), well within the arrival gap.
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=5.0, arrival_gap_s=0.3, instances=2)
    async with _started(runner, config) as batcher:

        async def caller(i: int) -> None:
            for round_ in range(2):
                events.append(f"submit {round_} {i}")
                await batcher.submit(_image(i))
                await asyncio.sleep(0.08 * i)

        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(8))), timeout=20)
    # 8 callers on 2 instances: the first batch of the second round starts once about half
    # of them are back (a padded size of at most 4), not after waiting for all of them.
    # (From the third caller's return on: the first round's batches are long done by then.)
    second_round = events[events.index("submit 1 2") :]
    first_batch = next(e for e in second_round if e.startswith("batch"))
    assert int(first_batch.split()[1]) <= 4
    assert sum(runner.shapes) >= 16


class ThreadRecordingRunner(CountingRunner):
    """A CountingRunner that records the thread each batch ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return super().__call__(batch)


def test_a_lone_blocking_caller_computes_its_image_on_its_own_thread(executor) -> None:
    runner = ThreadRecordingRunner()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=8), executor)
    batcher.start()
    results: list[float] = []

    def caller() -> None:
        for i in range(3):
            results.append(float(batcher.submit_blocking(_image(i)).output[0]))

    thread = threading.Thread(target=caller, name="lone-caller")
    thread.start()
    thread.join(10)
    batcher.close_blocking()
    assert results == [0.0, 12.0, 24.0]
    assert runner.threads == ["lone-caller"] * 3  # no hand-over to the compute executor


def test_blocking_callers_queued_behind_a_busy_instance_are_batched_together(executor) -> None:
    runner = ThreadRecordingRunner()
    runner.release.clear()
    config = BatcherConfig(max_batch_size=8, max_queue_delay_s=0.05, instances=1)
    batcher = MicroBatcher(runner, config, executor)
    batcher.start()
    sizes: dict[int, int] = {}

    def caller(i: int) -> None:
        sizes[i] = batcher.submit_blocking(_image(i)).batch_size

    first = threading.Thread(target=caller, args=(0,), name="first-caller")
    first.start()
    assert runner.entered.wait(10)  # the lone caller computes, holding the only instance
    others = [threading.Thread(target=caller, args=(i,)) for i in range(1, 7)]
    for thread in others:
        thread.start()
    while batcher.pending < 6:
        threading.Event().wait(0.01)
    runner.release.set()
    for thread in (first, *others):
        thread.join(10)
    batcher.close_blocking()
    assert sizes == {0: 1, **{i: 6 for i in range(1, 7)}}
    assert runner.threads[0] == "first-caller"
    assert runner.threads[1] != "first-caller"  # the queued ones ran on the executor


def test_closing_waits_for_a_lone_call_computing_on_its_callers_thread(executor) -> None:
    runner = CountingRunner()
    runner.release.clear()
    batcher = MicroBatcher(runner, BatcherConfig(max_batch_size=4), executor)
    batcher.start()
    answers: list[float] = []
    thread = threading.Thread(
        target=lambda: answers.append(float(batcher.submit_blocking(_image(2)).output[0]))
    )
    thread.start()
    assert runner.entered.wait(10)
    closer = threading.Thread(target=batcher.close_blocking)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # still computing: close waits
    runner.release.set()
    closer.join(10)
    thread.join(10)
    assert not closer.is_alive()
    assert answers == [24.0]
    with pytest.raises(Unavailable):
        batcher.submit_blocking(_image(1))
