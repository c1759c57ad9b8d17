"""HotThreadPool: an Executor whose idle threads get work last-in, first-out."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from imagemesh.hot_pool import HotThreadPool


def _busy_threads(pool: HotThreadPool, count: int) -> tuple[list[int], threading.Event]:
    """Occupies `count` threads of `pool` at once; returns their idents and the event that
    lets them finish."""
    release = threading.Event()
    started = threading.Barrier(count + 1)
    idents: list[int] = []

    def hold() -> None:
        idents.append(threading.get_ident())
        started.wait(timeout=5)
        release.wait(timeout=5)

    for _ in range(count):
        pool.submit(hold)
    started.wait(timeout=5)
    return idents, release


def test_results_and_exceptions_come_back_through_the_futures() -> None:
    pool = HotThreadPool(2)
    try:
        assert pool.submit(pow, 2, 10).result(timeout=5) == 1024
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=5)
        # The thread that raised is still serving.
        assert pool.submit(lambda: "still here").result(timeout=5) == "still here"
    finally:
        pool.shutdown()


def test_sequential_work_stays_on_the_thread_that_went_idle_last() -> None:
    pool = HotThreadPool(2)
    try:
        idents, release = _busy_threads(pool, 2)
        assert len(set(idents)) == 2  # both threads exist now
        release.set()
        time.sleep(0.05)  # both park
        ran_on = {pool.submit(threading.get_ident).result(timeout=5) for _ in range(20)}
        # A first-come-first-served pool (ThreadPoolExecutor) alternates between the two.
        assert len(ran_on) == 1
    finally:
        pool.shutdown()


def test_waiting_work_runs_in_the_order_it_came() -> None:
    pool = HotThreadPool(1)
    try:
        _idents, release = _busy_threads(pool, 1)
        order: list[int] = []
        waiting = [pool.submit(order.append, i) for i in range(5)]
        time.sleep(0.05)
        assert order == []  # the only thread is held: the rest waits
        release.set()
        for future in waiting:
            future.result(timeout=5)
        assert order == [0, 1, 2, 3, 4]
    finally:
        pool.shutdown()


def test_never_more_threads_at_once_than_max_workers() -> None:
    pool = HotThreadPool(2)
    lock = threading.Lock()
    running = 0
    most = 0
    idents: set[int] = set()

    def work() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            idents.add(threading.get_ident())
        time.sleep(0.01)
        with lock:
            running -= 1

    try:
        for future in [pool.submit(work) for _ in range(12)]:
            future.result(timeout=5)
        assert most == 2
        assert len(idents) == 2
    finally:
        pool.shutdown()


def test_shutdown_refuses_new_work_cancels_waiting_work_on_request_and_joins() -> None:
    pool = HotThreadPool(1)
    idents, release = _busy_threads(pool, 1)
    waiting = pool.submit(lambda: "never")
    threading.Timer(0.05, release.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert waiting.cancelled()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(lambda: None)
    assert all(thread.ident != idents[0] for thread in threading.enumerate())


def test_shutdown_without_cancelling_finishes_the_waiting_work() -> None:
    pool = HotThreadPool(1)
    _idents, release = _busy_threads(pool, 1)
    waiting = pool.submit(lambda: "done")
    threading.Timer(0.05, release.set).start()
    pool.shutdown(wait=True)
    assert waiting.result(timeout=0) == "done"


async def test_serves_asyncio_run_in_executor() -> None:
    pool = HotThreadPool(2)
    try:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(pool, pow, i, 2) for i in range(10)))
        assert results == [i * i for i in range(10)]
    finally:
        pool.shutdown()


def test_max_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HotThreadPool(0)
