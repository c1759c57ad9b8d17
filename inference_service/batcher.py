"""Dynamic micro-batching: concurrent single images gathered into batches for the model.

Callers submit one preprocessed image and get its output row: `submit` awaits it (event-loop
callers), `submit_blocking` waits on the caller's thread (the synchronous gRPC front's handler
threads, see `front`). A collector thread forms a batch whenever one of the model's instances
is free, takes up to `max_batch_size` images, pads the batch to one of a few fixed sizes (each
new batch shape costs TensorFlow a slow first call; padded sizes are all warmed up before
serving), and runs it on the compute executor. Up to `instances` batches run at once, each on
its own executor thread through the same loaded model (TensorFlow runs concurrent calls of one
function safely); the executor is shared by the loaded versions, so a version switch never runs
more batches than it has threads.

Why threads, not the event loop: a lone call's answer used to wake the event loop (from the
compute thread) and then the caller's coroutine, ~0.27 ms of a lone call measured here, and the
loop's turns were what limited many small calls. The collector and the answers now need no
event loop at all: a compute thread hands each caller its row directly, and a lone caller on a
thread of its own (an idle batcher, nothing queued, no fuller batch to wait for) runs its batch
of one itself, with no hand-over at all.

Why instances: on small inputs a batch's ops are too short to split well between threads. On
two cores (32x32 DenseNet121, batches of 32), two batches at once on one thread each computed
1,050-1,180 images/s, one batch on both cores 560-690. With several instances the observed
concurrency (below) is shared between them: 32 callers make two batches of ~16 in flight,
each computed while the other one's callers are answered and come back.

When to start a batch. Waiting a fixed delay for every batch would add that delay to every call
at low load; never waiting splits a steady load of N concurrent clients into alternating batches
(those that came back first, then the rest) and loses throughput. So the collector waits for
the batch to reach its share of the concurrency it just observed (the images being computed
plus those that arrived meanwhile, divided among the instances, capped at `max_batch_size`).
It stops waiting early when images stop coming (none for `arrival_gap`: the rest are not on
their way), and in any case after `max_queue_delay`. The gap counts only once one of the
callers just answered is back: until then the server may still be busy sending their answers
(measured: the first comes back ~4 ms after the batch, ~8 ms on a loaded machine), and a 2 ms
silence then split the batch in two.
One client calling in a loop gets batches of one with no wait; N clients get batches of N,
even when their next calls trickle in one by one over several milliseconds.

Why wait that long: a batch's compute time is mostly fixed (measured on two cores, 32x32
DenseNet121: 27 ms at 8 images, 47 ms at 32), so splitting a closed loop of 32 callers into
batches of 26 and 6 costs ~35 ms more model time than waiting for the last few. 32 unary
callers come back over ~11-15 ms here (each call costs the event loop ~0.4 ms), arriving
~0.3-0.8 ms apart: an arrival gap of 2 ms tells "still coming" from "that was all".

Where images are decoded. A caller may submit, instead of pixels, the step that makes them (a
small image's decoding): it runs on the compute thread when its batch starts, and a failure
fails that image alone. Between batches the server is the bottleneck (it answers the last
batch's callers and takes their next calls while the model waits): measured on grpc.aio with
32 unary clients, decoding a 32x32 PNG on its event loop cost ~110 us of the loop's time per
call, ~3.5 ms of each ~15 ms gap between batches; on the compute thread the same 32 decodes
take ~2 ms, at a moment when the server has nothing else to do. (A lone caller on its own
thread decodes its image there, in its batch of one.)

Guards: the queue is bounded (`ResourceExhausted` with a retry delay when full); an image whose
deadline passed, or whose caller went away, is dropped before compute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from imagemesh.errors import DeadlineExceeded, ResourceExhausted, Unavailable

from . import metrics

__all__ = ["BatchResult", "BatcherConfig", "MicroBatcher", "Preprocess", "Runner", "padded_sizes"]

_log = logging.getLogger(__name__)

# Runs one batch: (n, ...) float32 inputs -> (n, k) outputs. Called on the compute thread.
Runner = Callable[[np.ndarray], np.ndarray]
# Makes one image's pixels (decodes it); called on the compute thread when its batch starts.
Preprocess = Callable[[], np.ndarray]


def padded_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes actually computed: powers of two and the halfway points, up to the max.

    A batch is padded up to the next size, wasting at most a third of a batch's compute, while
    the number of shapes to warm up stays logarithmic in `max_batch_size`.
    """
    sizes = {max_batch_size}
    power = 1
    while power < max_batch_size:
        sizes.add(power)
        if power >= 2 and power * 3 // 2 < max_batch_size:
            sizes.add(power * 3 // 2)
        power *= 2
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class BatcherConfig:
    """The batcher's limits (see `InferenceSettings` for the defaults and why)."""

    max_batch_size: int = 32
    # The longest the collector waits for a fuller batch.
    max_queue_delay_s: float = 0.02
    queue_capacity: int = 1024
    # Waiting for a fuller batch stops when no image arrived for this long.
    arrival_gap_s: float = 0.002
    # Batches computed at the same time, each on its own thread of the executor (which must
    # have at least this many): the model's instances.
    instances: int = 1


@dataclass(frozen=True)
class BatchResult:
    """One image's output, and how its batch went."""

    output: np.ndarray
    batch_size: int
    queue_delay_s: float


@dataclass
class _Item:
    pixels: np.ndarray | Preprocess
    # Cancelling it before its batch starts drops the image (its caller went away); a batch
    # marks its futures running when it takes them, after which they can no longer be.
    future: Future[BatchResult]
    enqueued: float
    deadline: float | None


@dataclass
class _Computed:
    # The model's outputs for the images that were made (None if none was), in batch order.
    outputs: np.ndarray | None
    # Per image of the batch: why its pixels could not be made, or None.
    errors: list[Exception | None]
    seconds: float

    @property
    def failed(self) -> int:
        """Images whose pixels could not be made."""
        return sum(error is not None for error in self.errors)


@dataclass
class _Stats:
    # Seconds per image of recent batches, for the retry delay suggested when the queue is full.
    seconds_per_image: float = 0.005
    batches: int = 0
    images: int = 0


# The collector is asleep until the queue holds at least this many images (no arrival wakes it).
_NEVER = 1 << 62


class MicroBatcher:
    """Batches single-image calls to one model. Create, `start`, submit many, then `close`.

    Thread-safe: images may be submitted from the event loop and from any thread at once.
    Deadlines are on `time.monotonic()`'s clock, which is also the event loop's (`loop.time()`).
    """

    def __init__(
        self,
        runner: Runner,
        config: BatcherConfig,
        executor: Executor,
        *,
        label: str = "",
    ) -> None:
        self._runner = runner
        self._config = config
        self._executor = executor
        self._label = label
        self._sizes = padded_sizes(config.max_batch_size)
        # Everything below is guarded by `_lock`; `_changed` wakes the collector.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[_Item] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        # The queue length at which a submission wakes the collector: 1 while it waits for any
        # image, the fill target while it waits for a fuller batch, else never (it waits for a
        # free instance, or it is awake).
        self._wake_at = _NEVER
        self._last_arrival = 0.0
        # When the last batch's callers were answered (their next calls come after it).
        self._answered = 0.0
        # Batches being computed, and the images in them; whether the collector (or `close`)
        # waits for one of them to end (else ending one wakes nobody: a lone call's thread
        # then goes on without another thread taking the GIL from it).
        self._busy = 0
        self._awaiting_end = False
        # Batches whose callers are not all answered yet (a batch frees its instance before it
        # answers): `close` returns only once this is 0.
        self._answering = 0
        self._in_flight = 0
        # The concurrency seen at the last batches' ends (one per instance): with several
        # instances, callers answered by one are on their way back, unseen, when another ends.
        self._observed: collections.deque[int] = collections.deque(maxlen=config.instances)
        self.stats = _Stats()

    @property
    def _target(self) -> int:
        """The batch size to wait for: one instance's share of the concurrency observed
        (1 before any batch ended), at most `max_batch_size`."""
        if not self._observed:
            return 1
        share = -(-max(self._observed) // self._config.instances)
        return min(share, self._config.max_batch_size)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The padded batch sizes this batcher computes (warm each up before serving)."""
        return self._sizes

    @property
    def pending(self) -> int:
        """Images waiting in the queue."""
        return len(self._queue)

    def start(self) -> None:
        """Starts the collector thread."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._collect, name=f"batcher {self._label}"[:60], daemon=True
                )
                self._thread.start()

    async def submit(
        self, pixels: np.ndarray | Preprocess, *, deadline: float | None = None
    ) -> BatchResult:
        """Computes one image, awaited on the event loop; see `submit_future`. Cancelling the
        caller before the image's batch starts drops the image."""
        return await asyncio.wrap_future(self.submit_future(pixels, deadline=deadline))

    def submit_blocking(
        self, pixels: np.ndarray | Preprocess, *, deadline: float | None = None
    ) -> BatchResult:
        """Computes one image on behalf of a caller that waits on its own thread (never the
        event loop's); see `submit_future`.

        If the batcher is idle (an instance free, nothing queued, and no fuller batch worth
        waiting for), the image is computed right here, on the caller's thread: a lone call
        is answered with no thread hand-over at all.
        """
        with self._lock:
            self._refuse_if_unable(deadline)
            lone = (
                not self._queue
                and self._busy < self._config.instances
                and self._target <= 1
                and self._thread is not None
            )
            if not lone:
                item = self._enqueue(pixels, deadline)
            else:
                now = time.monotonic()
                item = _Item(pixels, Future(), now, deadline)
                item.future.set_running_or_notify_cancel()
                self._last_arrival = now
                self._busy += 1
                self._answering += 1
                self._in_flight += 1
        if lone:
            self._compute_then_answer([item], item.enqueued)
        return item.future.result()

    def submit_future(
        self, pixels: np.ndarray | Preprocess, *, deadline: float | None = None
    ) -> Future[BatchResult]:
        """Queues one image; its future gets the output row. Callable from any thread.

        `pixels` is the image, or a step that makes it on the compute thread (whatever that
        step raises is the future's exception). Raises `ResourceExhausted` if the queue is
        full, `DeadlineExceeded` if the deadline has passed, `Unavailable` if the batcher is
        closing; the future fails with `DeadlineExceeded` if the deadline passes before the
        image's batch starts. Cancel the future to drop an image that is not computing yet.
        """
        with self._lock:
            self._refuse_if_unable(deadline)
            return self._enqueue(pixels, deadline).future

    def _refuse_if_unable(self, deadline: float | None) -> None:
        if self._closing:
            raise Unavailable("the model is being unloaded; retry", retry_after_s=0.1)
        if len(self._queue) >= self._config.queue_capacity:
            metrics.REJECTED.inc()
            wait = len(self._queue) * self.stats.seconds_per_image / self._config.instances
            raise ResourceExhausted(
                f"the batching queue is full ({self._config.queue_capacity} images waiting); "
                f"retry in about {wait * 1000:.0f} ms",
                reason="QUEUE_FULL",
                retry_after_s=max(0.01, wait),
            )
        if deadline is not None and time.monotonic() >= deadline:
            metrics.DROPPED.labels("deadline").inc()
            raise DeadlineExceeded("the deadline passed before the image was queued")

    def _enqueue(self, pixels: np.ndarray | Preprocess, deadline: float | None) -> _Item:
        """Under the lock: queues an image, waking the collector if it waits for it."""
        now = time.monotonic()
        item = _Item(pixels, Future(), now, deadline)
        self._queue.append(item)
        self._last_arrival = now
        metrics.QUEUE_DEPTH.inc()
        if len(self._queue) >= self._wake_at:
            self._wake_at = _NEVER
            self._changed.notify()
        return item

    async def close(self) -> None:
        """Refuses new images, lets the queued ones finish, then stops the collector."""
        await asyncio.to_thread(self.close_blocking)

    def close_blocking(self) -> None:
        """`close`, waiting on the caller's thread."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            self._thread = None
            while self._answering:  # lone calls computing on their callers' threads
                self._awaiting_end = True
                self._changed.wait()

    def _collect(self) -> None:
        """The collector thread: forms and launches batches until closed."""
        with self._lock:
            while True:
                if self._busy >= self._config.instances:
                    # Every instance is busy: the next batch forms when one is free.
                    self._awaiting_end = True
                    self._changed.wait()
                    continue
                if not self._queue:
                    if self._closing:
                        break
                    self._wake_at = 1
                    self._changed.wait()
                    continue
                self._fill()
                self._launch(self._take())
            # Closing: the batches being computed still answer their callers.
            while self._answering:
                self._awaiting_end = True
                self._changed.wait()

    def _launch(self, batch: Sequence[_Item]) -> None:
        """Under the lock: hands a batch to the compute executor."""
        if not batch:  # every image taken was dropped (deadline passed, caller gone)
            return
        self._in_flight += len(batch)
        self._busy += 1
        self._answering += 1
        started = time.monotonic()
        try:
            self._executor.submit(self._compute_then_answer, batch, started)
        except RuntimeError as exc:  # the executor was shut down
            self._busy -= 1
            self._answering -= 1
            self._in_flight -= len(batch)
            for item in batch:
                item.future.set_exception(exc)

    def _fill(self) -> None:
        """Under the lock: waits until the queue reaches the target size, images stop coming,
        or time is up."""
        target = self._target
        start = time.monotonic()
        until = start + self._config.max_queue_delay_s
        gap = self._config.arrival_gap_s
        while len(self._queue) < target and not self._closing:
            now = time.monotonic()
            if now >= until:
                return
            if self._last_arrival < self._answered:
                # None of the callers just answered is back yet (the queue holds only images
                # that came during the last batch): their answers may still be on their way
                # out through a busy server, so their silence says nothing yet. Look again.
                wake = min(until, now + gap)
            elif now >= max(start, self._last_arrival) + gap:
                return
            else:
                wake = min(until, max(start, self._last_arrival) + gap)
            self._wake_at = target
            self._changed.wait(wake - now)
        self._wake_at = _NEVER

    def _take(self) -> list[_Item]:
        """Under the lock: the next batch's images, dropping those that cannot be computed."""
        now = time.monotonic()
        # With other instances free too, a queue longer than one batch's share is shared among
        # them rather than all put in one batch while they idle (two batches of 16 at once
        # beat one of 32 here).
        free = max(1, self._config.instances - self._busy)
        share = max(self._target, -(-len(self._queue) // free))
        size = min(self._config.max_batch_size, share)
        batch: list[_Item] = []
        while self._queue and len(batch) < size:
            item = self._queue.popleft()
            metrics.QUEUE_DEPTH.dec()
            if not item.future.set_running_or_notify_cancel():  # the caller went away
                metrics.DROPPED.labels("cancelled").inc()
                continue
            if item.deadline is not None and now >= item.deadline:
                metrics.DROPPED.labels("deadline").inc()
                item.future.set_exception(
                    DeadlineExceeded(
                        f"the deadline passed after {(now - item.enqueued) * 1000:.1f} ms in "
                        "the batching queue, before the image was computed"
                    )
                )
                continue
            batch.append(item)
        return batch

    def _padded(self, n: int) -> int:
        for size in self._sizes:
            if size >= n:
                return size
        return n  # not reached: n <= max_batch_size, which is in the sizes

    def _compute(self, batch: Sequence[_Item]) -> _Computed:
        """On the compute thread: the batch's pixels (made by their steps where given), padded
        to a warmed-up size, through the model."""
        rows: list[np.ndarray] = []
        errors: list[Exception | None] = []
        for item in batch:
            try:
                pixels = item.pixels if isinstance(item.pixels, np.ndarray) else item.pixels()
            except Exception as exc:  # this image's failure, reported to its caller alone
                errors.append(exc)
                continue
            errors.append(None)
            rows.append(pixels)
        if not rows:
            return _Computed(None, errors, 0.0)
        inputs = np.zeros((self._padded(len(rows)), *rows[0].shape), dtype=np.float32)
        for i, row in enumerate(rows):
            inputs[i] = row
        t0 = time.perf_counter()
        outputs = self._runner(inputs)
        return _Computed(outputs, errors, time.perf_counter() - t0)

    def _compute_then_answer(self, batch: Sequence[_Item], started: float) -> None:
        """On the compute thread (or a lone caller's): the batch, its instance freed, then its
        callers' answers.

        The instance is freed, and the concurrency observed, before any caller has its answer:
        a caller's next call must find the batcher's view of the last batch complete (else a
        lone caller calling again at once is counted twice, and waits for a fuller batch).
        """
        outcome: _Computed | BaseException
        try:
            outcome = self._compute(batch)
        except BaseException as exc:  # a failed batch fails its calls, never the collector
            outcome = exc
        with self._lock:
            if isinstance(outcome, _Computed):
                self._record(outcome)
            self._busy -= 1
            self._in_flight -= len(batch)
            if self._awaiting_end:
                self._awaiting_end = False
                self._changed.notify_all()
        try:
            if isinstance(outcome, BaseException):
                _log.error("batch of %d failed on %s", len(batch), self._label, exc_info=outcome)
                for item in batch:
                    item.future.set_exception(outcome)
            else:
                self._answer(batch, outcome, started)
        finally:
            with self._lock:
                self._answering -= 1
                if self._awaiting_end:
                    self._awaiting_end = False
                    self._changed.notify_all()
        if isinstance(outcome, _Computed):
            # After the answers: the callers' threads wake first.
            self._observe(batch, outcome, started)

    def _record(self, computed: _Computed) -> None:
        """Under the lock: what a finished batch tells about the load."""
        # The observed concurrency: the images being computed (this batch's and any other
        # instance's) plus those that arrived meanwhile, shared between the instances. (This
        # batch's size alone would lock a steady load into alternating half batches.)
        self._observed.append(self._in_flight + len(self._queue))
        self._answered = time.monotonic()
        n = len(computed.errors) - computed.failed
        if computed.outputs is not None:
            stats = self.stats
            stats.seconds_per_image = 0.8 * stats.seconds_per_image + 0.2 * (computed.seconds / n)
            stats.batches += 1
            stats.images += n

    @staticmethod
    def _answer(batch: Sequence[_Item], computed: _Computed, started: float) -> None:
        outputs, errors = computed.outputs, computed.errors
        n = len(batch) - computed.failed
        row = 0
        for item, error in zip(batch, errors, strict=True):
            if error is not None:
                item.future.set_exception(error)
                continue
            assert outputs is not None
            item.future.set_result(BatchResult(outputs[row].copy(), n, started - item.enqueued))
            row += 1

    @staticmethod
    def _observe(batch: Sequence[_Item], computed: _Computed, started: float) -> None:
        """The batch's metrics, once its callers have their answers."""
        if computed.outputs is None:
            return
        metrics.COMPUTE_SECONDS.observe(computed.seconds)
        metrics.BATCH_SIZE.observe(len(computed.errors) - computed.failed)
        for item, error in zip(batch, computed.errors, strict=True):
            if error is None:
                metrics.QUEUE_DELAY_SECONDS.observe(started - item.enqueued)
