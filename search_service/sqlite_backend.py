"""The embedded search backend: SQLite (stdlib `sqlite3`), FTS5 for text, WAL mode.

One dedicated thread owns the only writing connection (SQLite allows one writer; queuing
writes in one thread avoids lock waits and `database is locked` errors); reads run on a small
pool of threads, each with its own connection, which WAL lets proceed while a write commits.

Documents live in `images`; predictions, tags and attributes in child tables that filters
join on; the words of filenames and tags (split by `search_service.text`) in an FTS5 table.
User text only ever reaches FTS5 as quoted words (`"cat" AND "png"`), so its syntax is
literal.

Pagination is by keyset: a page's position holds the sort values of its last row (the name
breaks ties). Like Elasticsearch's point in time, a cursor also holds the highest row id of
its first page: later pages only see documents that existed then (row ids only grow:
AUTOINCREMENT), so the total and the pages stay those of one moment while documents arrive.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imagemesh.errors import InvalidArgument, Unavailable
from search_service.model import (
    ClassScore,
    CountField,
    ImageRecord,
    ItemFailure,
    PredictionRecord,
    ResolvedQuery,
    SearchPage,
    SortField,
    WriteResult,
)
from search_service.text import document_words

__all__ = ["SqliteBackend"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    dataset TEXT NOT NULL,
    label TEXT NOT NULL,
    tags TEXT NOT NULL,
    attributes TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    create_time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_create_time ON images (create_time, name);
CREATE INDEX IF NOT EXISTS images_dataset ON images (dataset, create_time);
CREATE INDEX IF NOT EXISTS images_label ON images (label, create_time);
CREATE TABLE IF NOT EXISTS image_tags (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (image_id, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS image_tags_tag ON image_tags (tag);
CREATE TABLE IF NOT EXISTS image_attributes (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (image_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS image_attributes_kv ON image_attributes (key, value);
CREATE TABLE IF NOT EXISTS predictions (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    model_version TEXT NOT NULL,
    top_class TEXT NOT NULL,
    confidence REAL NOT NULL,
    top_classes TEXT NOT NULL,
    predict_time INTEGER,
    probabilities_array TEXT NOT NULL,
    PRIMARY KEY (image_id, model_version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS predictions_class ON predictions (model_version, top_class, confidence);
CREATE VIRTUAL TABLE IF NOT EXISTS image_text USING fts5 (
    words, tokenize = 'unicode61 remove_diacritics 0'
);
"""

# The SQL expression of each sort field over the `matched` rows.
_SORT_COLUMNS = {
    SortField.CREATE_TIME: "create_time",
    SortField.FILENAME: "filename",
    SortField.SIZE_BYTES: "size_bytes",
    SortField.DATASET: "dataset",
    SortField.LABEL: "label",
    SortField.CONFIDENCE: "confidence",
    SortField.RELEVANCE: "relevance",
}


def _fts_query(terms: Sequence[str]) -> str:
    # Words hold only letters and digits (search_service.text), so quoting cannot be escaped.
    return " AND ".join(f'"{t}"' for t in terms)


def _placeholders(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


class SqliteBackend:
    """A `SearchBackend` on one SQLite file."""

    def __init__(self, path: Path, *, readers: int = 2) -> None:
        self._path = Path(path)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="search-sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="search-sqlite-reader")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        """Where the database lives."""
        return f"SQLite at {self._path}"

    # -- plumbing -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Used by one thread only; closed by `close` once every thread has stopped.
            conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=30, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            try:
                return fn(self._connection())
            except sqlite3.OperationalError as exc:
                # A locked, full or unreadable database: the same call may work later.
                raise Unavailable(f"{self.description} failed: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(pool, call)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def in_transaction(conn: sqlite3.Connection) -> _T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(self._writer, in_transaction)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def in_snapshot(conn: sqlite3.Connection) -> _T:
            # One read transaction: every statement of a page sees the same database state.
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await self._run(self._readers, in_snapshot)

    async def start(self) -> None:
        """Creates the database file and schema if missing."""
        self._path.parent.mkdir(parents=True, exist_ok=True)

        def create(conn: sqlite3.Connection) -> None:
            conn.executescript(_SCHEMA)

        await self._run(self._writer, create)

    async def close(self) -> None:
        """Closes every connection and stops the threads."""
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- writes ---------------------------------------------------------------------------

    async def index_images(self, documents: Sequence[ImageRecord], *, wait: bool) -> WriteResult:
        """Upserts documents and their tags, attributes and text; keeps predictions.

        Every committed write is visible at once, so `wait` needs nothing more.
        """

        def write(conn: sqlite3.Connection) -> WriteResult:
            for doc in documents:
                tags = json.dumps(list(doc.tags))
                (image_id,) = conn.execute(
                    """
                    INSERT INTO images (name, filename, dataset, label, tags, attributes,
                        content_type, size_bytes, width, height, create_time)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (name) DO UPDATE SET
                        filename = excluded.filename, dataset = excluded.dataset,
                        label = excluded.label, tags = excluded.tags,
                        attributes = excluded.attributes, content_type = excluded.content_type,
                        size_bytes = excluded.size_bytes, width = excluded.width,
                        height = excluded.height, create_time = excluded.create_time
                    RETURNING id
                    """,
                    (
                        doc.name,
                        doc.filename,
                        doc.dataset,
                        doc.label,
                        tags,
                        json.dumps(doc.attributes, sort_keys=True),
                        doc.content_type,
                        doc.size_bytes,
                        doc.width,
                        doc.height,
                        doc.create_time_ns,
                    ),
                ).fetchone()
                conn.execute("DELETE FROM image_tags WHERE image_id = ?", (image_id,))
                conn.executemany(
                    "INSERT INTO image_tags (image_id, tag) VALUES (?, ?)",
                    [(image_id, tag) for tag in doc.tags],
                )
                conn.execute("DELETE FROM image_attributes WHERE image_id = ?", (image_id,))
                conn.executemany(
                    "INSERT INTO image_attributes (image_id, key, value) VALUES (?, ?, ?)",
                    [(image_id, k, v) for k, v in doc.attributes.items()],
                )
                conn.execute("DELETE FROM image_text WHERE rowid = ?", (image_id,))
                conn.execute(
                    "INSERT INTO image_text (rowid, words) VALUES (?, ?)",
                    (image_id, document_words(doc.filename, doc.tags)),
                )
            return WriteResult(len(documents))

        return await self._write(write)

    async def index_predictions(
        self, predictions: Sequence[tuple[str, Sequence[PredictionRecord]]], *, wait: bool
    ) -> WriteResult:
        """Replaces each image's prediction by the same model version."""

        def write(conn: sqlite3.Connection) -> WriteResult:
            failures: list[ItemFailure] = []
            applied = 0
            for name, preds in predictions:
                row = conn.execute("SELECT id FROM images WHERE name = ?", (name,)).fetchone()
                if row is None:
                    failures.append(_unknown_image(name))
                    continue
                conn.executemany(
                    """
                    INSERT OR REPLACE INTO predictions (image_id, model_version, top_class,
                        confidence, top_classes, predict_time, probabilities_array)
                    VALUES (?, ?, ?, ?, ?, ?, ?)
                    """,
                    [
                        (
                            row[0],
                            p.model_version,
                            p.top_class,
                            p.confidence,
                            json.dumps(
                                [
                                    [s.class_name, s.class_index, s.probability]
                                    for s in p.top_classes
                                ]
                            ),
                            p.predict_time_ns,
                            p.probabilities_array,
                        )
                        for p in preds
                    ],
                )
                applied += len(preds)
            return WriteResult(applied, failures)

        return await self._write(write)

    async def delete_images(self, names: Sequence[str], *, wait: bool) -> int:
        """Removes documents with their child rows and text."""

        def write(conn: sqlite3.Connection) -> int:
            deleted = 0
            for name in names:
                row = conn.execute("DELETE FROM images WHERE name = ? RETURNING id", (name,))
                found = row.fetchone()
                if found is not None:
                    conn.execute("DELETE FROM image_text WHERE rowid = ?", (found[0],))
                    deleted += 1
            return deleted

        return await self._write(write)

    # -- reads ----------------------------------------------------------------------------

    async def get_image(self, name: str) -> ImageRecord | None:
        """One document with its predictions."""

        def read(conn: sqlite3.Connection) -> ImageRecord | None:
            row = conn.execute("SELECT id FROM images WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            return _load_records(conn, [row[0]])[0]

        return await self._read(read)

    async def search(
        self, query: ResolvedQuery, page_size: int, position: dict[str, Any] | None
    ) -> SearchPage:
        """One page by keyset after `position`, with the total and counts."""

        def read(conn: sqlite3.Connection) -> SearchPage:
            snapshot = (
                int(position["snap"])
                if position
                else conn.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
            )
            cte, params = _matched_cte(query, snapshot)
            keys = [(_SORT_COLUMNS[k.field], k.descending) for k in query.order]
            keys.append(("name", False))
            keyset_sql, keyset_params = "", list[Any]()
            if position:
                after = position.get("after")
                if not isinstance(after, list) or len(after) != len(keys):
                    raise InvalidArgument(
                        "page_token does not fit this query; start again with an empty one",
                        reason="INVALID_PAGE_TOKEN",
                        field="page_token",
                    )
                keyset_sql, keyset_params = _keyset(keys, after)
            order_sql = ", ".join(f"{col} {'DESC' if desc else 'ASC'}" for col, desc in keys)
            columns = ", ".join(col for col, _ in keys)
            rows = conn.execute(
                f"{cte} SELECT id, {columns} FROM matched {keyset_sql} "
                f"ORDER BY {order_sql} LIMIT ?",
                [*params, *keyset_params, page_size + 1],
            ).fetchall()
            (total,) = conn.execute(f"{cte} SELECT COUNT(*) FROM matched", params).fetchone()
            counts = _counts(conn, query, cte, params)
            page_rows = rows[:page_size]
            next_position = None
            if len(rows) > page_size:
                next_position = {"after": list(page_rows[-1][1:]), "snap": snapshot}
            documents = _load_records(conn, [r[0] for r in page_rows])
            return SearchPage(documents, int(total), counts, next_position)

        return await self._read(read)


def _unknown_image(name: str) -> ItemFailure:
    return ItemFailure(
        name, "NOT_FOUND", "IMAGE_NOT_INDEXED", f"no image document named {name}; index it first"
    )


def _prediction_conditions(query: ResolvedQuery, alias: str) -> tuple[list[str], list[Any]]:
    pred = query.filter.prediction
    conditions: list[str] = []
    params: list[Any] = []
    if pred is None:
        return conditions, params
    if pred.model_version:
        conditions.append(f"{alias}.model_version = ?")
        params.append(pred.model_version)
    if pred.classes:
        conditions.append(f"{alias}.top_class IN ({_placeholders(pred.classes)})")
        params.extend(pred.classes)
    if pred.min_confidence is not None:
        conditions.append(f"{alias}.confidence >= ?")
        params.append(pred.min_confidence)
    if pred.max_confidence is not None:
        conditions.append(f"{alias}.confidence <= ?")
        params.append(pred.max_confidence)
    return conditions, params


def _matched_cte(query: ResolvedQuery, snapshot: int) -> tuple[str, list[Any]]:
    """`WITH matched AS (...)`: the matching documents with every sortable column."""
    flt = query.filter
    select = [
        "i.id",
        "i.name",
        "i.create_time",
        "i.filename",
        "i.size_bytes",
        "i.dataset",
        "i.label",
    ]
    joins: list[str] = []
    join_params: list[Any] = []
    where = ["i.id <= ?"]
    params: list[Any] = [snapshot]
    sort_fields = {k.field for k in query.order}
    if query.text_terms is not None:
        if query.text_terms:
            joins.append("JOIN image_text ON image_text.rowid = i.id")
            where.append("image_text MATCH ?")
            params.append(_fts_query(query.text_terms))
            # bm25() is lower for better matches; negated so that higher is better, as in ES.
            select.append("-bm25(image_text) AS relevance")
        else:
            where.append("0")
            select.append("0.0 AS relevance")
    if SortField.CONFIDENCE in sort_fields:
        assert flt.prediction is not None  # parse_order_by requires the model version
        joins.append("JOIN predictions sp ON sp.image_id = i.id AND sp.model_version = ?")
        join_params.append(flt.prediction.model_version)
        select.append("sp.confidence AS confidence")
    for column, values in (("i.dataset", flt.datasets), ("i.label", flt.labels)):
        if values:
            where.append(f"{column} IN ({_placeholders(values)})")
            params.extend(values)
    if flt.names:
        where.append(f"i.name IN ({_placeholders(flt.names)})")
        params.extend(flt.names)
    for tag in flt.tags:
        where.append("EXISTS (SELECT 1 FROM image_tags t WHERE t.image_id = i.id AND t.tag = ?)")
        params.append(tag)
    for key, value in flt.attributes:
        where.append(
            "EXISTS (SELECT 1 FROM image_attributes a "
            "WHERE a.image_id = i.id AND a.key = ? AND a.value = ?)"
        )
        params.extend([key, value])
    if flt.create_start_ns is not None:
        where.append("i.create_time >= ?")
        params.append(flt.create_start_ns)
    if flt.create_end_ns is not None:
        where.append("i.create_time <= ?")
        params.append(flt.create_end_ns)
    if flt.prediction is not None:
        conditions, pred_params = _prediction_conditions(query, "p")
        where.append(
            "EXISTS (SELECT 1 FROM predictions p WHERE p.image_id = i.id"
            + "".join(f" AND {c}" for c in conditions)
            + ")"
        )
        params.extend(pred_params)
    sql = (
        f"WITH matched AS (SELECT {', '.join(select)} FROM images i {' '.join(joins)} "
        f"WHERE {' AND '.join(where)})"
    )
    return sql, [*join_params, *params]


def _keyset(keys: Sequence[tuple[str, bool]], after: Sequence[Any]) -> tuple[str, list[Any]]:
    """`WHERE` rows strictly after `after` in the order of `keys` (mixed directions)."""
    disjuncts: list[str] = []
    params: list[Any] = []
    for i, (column, descending) in enumerate(keys):
        parts = [f"{c} = ?" for c, _ in keys[:i]]
        parts.append(f"{column} {'<' if descending else '>'} ?")
        disjuncts.append("(" + " AND ".join(parts) + ")")
        params.extend(after[: i + 1])
    return "WHERE " + " OR ".join(disjuncts), params


def _counts(
    conn: sqlite3.Connection, query: ResolvedQuery, cte: str, params: list[Any]
) -> list[tuple[str, int]]:
    if query.count_by is None:
        return []
    if query.count_by is CountField.PREDICTED_CLASS:
        conditions, pred_params = _prediction_conditions(query, "p")
        sql = (
            f"{cte} SELECT p.top_class, COUNT(DISTINCT p.image_id) FROM predictions p "
            "JOIN matched m ON m.id = p.image_id"
            + "".join(f" AND {c}" for c in conditions)
            + " GROUP BY p.top_class"
        )
        rows = conn.execute(sql, [*params, *pred_params]).fetchall()
    else:
        column = "label" if query.count_by is CountField.LABEL else "dataset"
        rows = conn.execute(
            f"{cte} SELECT {column}, COUNT(*) FROM matched WHERE {column} != '' GROUP BY {column}",
            params,
        ).fetchall()
    return [(str(value), int(count)) for value, count in rows]


def _load_records(conn: sqlite3.Connection, ids: Sequence[int]) -> list[ImageRecord]:
    """The documents of `ids`, in that order, with their predictions."""
    if not ids:
        return []
    marks = _placeholders(ids)
    predictions: dict[int, list[PredictionRecord]] = {}
    for row in conn.execute(
        f"SELECT image_id, model_version, top_class, confidence, top_classes, predict_time, "
        f"probabilities_array FROM predictions WHERE image_id IN ({marks}) "
        f"ORDER BY image_id, model_version",
        list(ids),
    ):
        predictions.setdefault(row[0], []).append(
            PredictionRecord(
                model_version=row[1],
                top_class=row[2],
                confidence=row[3],
                top_classes=tuple(ClassScore(n, i, p) for n, i, p in json.loads(row[4])),
                predict_time_ns=row[5],
                probabilities_array=row[6],
            )
        )
    records: dict[int, ImageRecord] = {}
    for row in conn.execute(
        f"SELECT id, name, filename, dataset, label, tags, attributes, content_type, size_bytes, "
        f"width, height, create_time FROM images WHERE id IN ({marks})",
        list(ids),
    ):
        records[row[0]] = ImageRecord(
            name=row[1],
            filename=row[2],
            dataset=row[3],
            label=row[4],
            tags=tuple(json.loads(row[5])),
            attributes=json.loads(row[6]),
            content_type=row[7],
            size_bytes=row[8],
            width=row[9],
            height=row[10],
            create_time_ns=row[11],
            predictions=tuple(predictions.get(row[0], ())),
        )
    return [records[i] for i in ids]
