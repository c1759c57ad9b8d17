"""Group commit: many concurrent callers, one write per batch.

Callers `await add(item)`; items that arrive while a flush is in progress join the next
one, so the batch size adapts to the load with no timer: one caller alone is flushed at
once, a bulk upload with many images in flight shares one write among dozens of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

_T = TypeVar("_T")


class GroupCommit(Generic[_T]):
    """Batches `add` calls into calls of `flush(items)`; each `add` returns once its batch
    was flushed, or raises what the flush raised."""

    def __init__(
        self, flush: Callable[[Sequence[_T]], Awaitable[None]], *, max_batch: int = 512
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[_T, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def add(self, item: _T) -> None:
        """Queues `item` and waits until a flush wrote it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # Shielded: a caller that is cancelled must not cancel a flush shared with others.
        await asyncio.shield(future)

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let callers scheduled right now join this batch
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                await self._flush([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
