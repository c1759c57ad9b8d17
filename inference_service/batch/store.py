"""Durable job records in the object store.

Layout:

    jobs/{job_id}.json                    the record (rewritten on every state change and,
                                          while running, every heartbeat)
    job-selections/{job_id}.json          an explicit selection's image names, written once
                                          (up to 100,000 names stay out of the record that is
                                          rewritten every few seconds)
    job-requests/{sha256(request_id)}     the job a client's idempotency key created
    job-cancels/{job_id}                  exists once a cancellation was asked: the job's
                                          workers (Spark tasks included) poll it and stop

Ids sort by creation time, so listing newest first needs only the keys, not every record.
Writes are whole-object and atomic (the `ObjectStore` contract): a reader sees the previous
record or the next, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Protocol

from imagemesh.errors import NotFound

from .jobs import JobRecord

__all__ = ["JobObjectStore", "JobStore"]

_JOBS = "jobs/"
_SELECTIONS = "job-selections/"
_REQUESTS = "job-requests/"
_CANCELS = "job-cancels/"


class JobObjectStore(Protocol):
    """The part of `storage_service.backends.ObjectStore` that job records need."""

    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> None:
        """Writes `data` as `key`, atomically replacing any previous object."""

    def get_bytes(self, key: str) -> bytes:
        """The object; `imagemesh.errors.NotFound` if absent."""

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Keys starting with `prefix`, after `start_after`, in lexicographic order."""

    def delete(self, key: str) -> None:
        """Removes the object; nothing if absent."""


class JobStore:
    """Reads and writes job records; see the module docstring for the layout."""

    def __init__(self, store: JobObjectStore) -> None:
        self._store = store
        # Selections never change once written; records are re-read every time.
        self._names: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def create(self, record: JobRecord) -> None:
        """Writes a new job: its selection names first, then its request index, then the record."""
        if record.selection.names:
            self._store.put_bytes(
                f"{_SELECTIONS}{record.job_id}.json",
                json.dumps(list(record.selection.names)).encode(),
                "application/json",
            )
            with self._lock:
                self._names[record.job_id] = record.selection.names
        self.put(record)
        if record.request_id:
            self._store.put_bytes(
                _request_key(record.request_id),
                json.dumps({"job_id": record.job_id}).encode(),
                "application/json",
            )

    def put(self, record: JobRecord) -> None:
        """Writes the record (without the names of an explicit selection, stored apart)."""
        slim = replace(record, selection=replace(record.selection, names=()))
        self._store.put_bytes(
            f"{_JOBS}{record.job_id}.json",
            slim.to_json(),
            "application/json",
        )

    def get(self, job_id: str) -> JobRecord:
        """The record; `NotFound` if there is no such job."""
        try:
            data = self._store.get_bytes(f"{_JOBS}{job_id}.json")
        except NotFound:
            raise NotFound(
                f"batchJobs/{job_id} does not exist; list jobs with `imagemesh batch list`",
                reason="BATCH_JOB_NOT_FOUND",
            ) from None
        record = JobRecord.from_json(data)
        if record.selection.kind == "names":
            record = replace(
                record, selection=replace(record.selection, names=self._names_of(job_id))
            )
        return record

    @staticmethod
    def cancel_key(job_id: str) -> str:
        """The key of the job's cancel marker."""
        return f"{_CANCELS}{job_id}"

    def request_cancel(self, job_id: str) -> None:
        """Writes the job's cancel marker (idempotent)."""
        self._store.put_bytes(self.cancel_key(job_id), b"cancel", "text/plain")

    def job_for_request(self, request_id: str) -> str | None:
        """The id of the job created with this idempotency key, if any."""
        try:
            data = self._store.get_bytes(_request_key(request_id))
        except NotFound:
            return None
        return str(json.loads(data)["job_id"])

    def ids_newest_first(self) -> list[str]:
        """Every job id, newest first."""
        ids = [
            key[len(_JOBS) : -len(".json")]
            for key in self._store.list_keys(_JOBS)
            if key.endswith(".json") and "/" not in key[len(_JOBS) :]
        ]
        ids.sort(reverse=True)
        return ids

    def records(self, ids: Iterable[str]) -> Iterator[JobRecord]:
        """The records of `ids`, in order, skipping any deleted since listed."""
        for job_id in ids:
            try:
                yield self.get(job_id)
            except NotFound:
                continue

    def _names_of(self, job_id: str) -> tuple[str, ...]:
        with self._lock:
            cached = self._names.get(job_id)
        if cached is not None:
            return cached
        try:
            names = tuple(json.loads(self._store.get_bytes(f"{_SELECTIONS}{job_id}.json")))
        except NotFound:
            names = ()
        with self._lock:
            self._names[job_id] = names
        return names


def _request_key(request_id: str) -> str:
    # Hashed: a client's key may hold characters that are not valid in an object key.
    return _REQUESTS + hashlib.sha256(request_id.encode()).hexdigest()
