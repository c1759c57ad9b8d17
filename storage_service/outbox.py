"""A durable queue of search-index updates (the outbox), and the task that drains it.

Every stored or deleted image leaves one row in a SQLite file beside the storage service's
state, written before the client is answered; a background task sends the rows to the
SearchService in batches and removes them once the search service has accepted them. If
search is down, unreachable or not implemented yet (UNAVAILABLE, UNIMPLEMENTED, any
transport failure), rows stay and are retried with exponential backoff, so the index
catches up by itself, also across restarts.

Rows are keyed by image name, so a later operation on an image replaces an earlier one not
yet sent (an upload followed by a delete sends only the delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Outbox", "OutboxDrainer", "OutboxOp", "SendResult"]

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('index', 'delete')),
    document BLOB
);
CREATE INDEX IF NOT EXISTS ops_seq ON ops (seq);
"""


@dataclass(frozen=True)
class OutboxOp:
    """One pending update: index `document` (a serialised ImageDocument) or delete `name`."""

    name: str
    seq: int
    kind: str
    document: bytes | None


@dataclass(frozen=True)
class SendResult:
    """What a send achieved: ops done (sent, or refused for good) and whether to back off."""

    done: Sequence[OutboxOp]
    retry_later: bool


class Outbox:
    """The SQLite-backed queue; thread-safe, every method is short."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL + NORMAL: a committed row survives a process crash (the case that matters
        # here) at a fraction of FULL's fsync cost.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM ops").fetchone()
        self._seq = int(row[0])
        self.changed = threading.Event()

    def put_many(self, ops: Sequence[tuple[str, str, bytes | None]]) -> None:
        """Queues `(name, kind, document)` updates in one transaction."""
        if not ops:
            return
        with self._lock:
            rows = []
            for name, kind, document in ops:
                self._seq += 1
                rows.append((name, self._seq, kind, document))
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO ops (name, seq, kind, document) VALUES (?, ?, ?, ?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.changed.set()

    def peek(self, limit: int) -> list[OutboxOp]:
        """The oldest `limit` pending updates."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, seq, kind, document FROM ops ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxOp(*row) for row in rows]

    def remove(self, ops: Sequence[OutboxOp]) -> None:
        """Removes updates that were handled, unless a newer one replaced them meanwhile."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "DELETE FROM ops WHERE name = ? AND seq = ?", [(op.name, op.seq) for op in ops]
            )
            self._db.execute("COMMIT")

    def pending(self) -> int:
        """How many updates wait to be sent."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM ops").fetchone()[0])

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._db.close()


class OutboxDrainer:
    """Sends the outbox's updates with `send`, in batches, backing off while it fails."""

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[Sequence[OutboxOp]], Awaitable[SendResult]],
        *,
        batch_size: int = 500,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
        idle_poll_s: float = 5.0,
    ) -> None:
        self._outbox = outbox
        self._send = send
        self._batch_size = batch_size
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._idle_poll_s = idle_poll_s
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.sent_total = 0
        self.failed_attempts = 0

    def start(self) -> None:
        """Starts draining in the background."""
        self._task = asyncio.create_task(self._run(), name="storage-search-outbox")

    def notify(self) -> None:
        """Asks the drainer to look at the outbox now (call from the event loop)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stops draining; what is pending stays in the outbox for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = self._min_backoff_s
        while True:
            ops = await asyncio.to_thread(self._outbox.peek, self._batch_size)
            if not ops:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_poll_s)
                continue
            started = time.monotonic()
            try:
                result = await self._send(ops)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or an unexpected failure must not stop the drainer
                _log.exception("sending %d search-index updates failed", len(ops))
                result = SendResult(done=(), retry_later=True)
            if result.done:
                await asyncio.to_thread(self._outbox.remove, result.done)
                self.sent_total += len(result.done)
            if result.retry_later:
                self.failed_attempts += 1
                _log.debug(
                    "search index not updated (%d pending); retrying in %.1f s",
                    len(ops),
                    backoff,
                )
                # New updates do not cut the backoff short: a search service that is down
                # must not be retried once per upload.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
            else:
                backoff = self._min_backoff_s
                if time.monotonic() - started < 0.001:
                    await asyncio.sleep(0)
