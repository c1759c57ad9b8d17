"""Creating, running, following and cancelling batch jobs, with durable records.

`BatchJobManager` is the domain service behind the five batch RPCs. Each job runs on its own
driver thread: resolve the selection, pick the runner (AUTO: LOCAL up to the configured
threshold, SPARK above), run it, record the outcome. While a job runs, its record in the object
store is rewritten every `heartbeat_s` with the live counts and a heartbeat time.

After a restart, records tell the truth: a job left PENDING, RUNNING or CANCELLING by a
process that is gone is marked FAILED ("the inference service restarted while the job ran";
CANCELLED if a cancellation was already asked), at start for this host's dead processes, and
on read for any record whose heartbeat is older than the lease (a process on another host).
A job is not resumed: its finished images keep their predictions, and running the same
selection again overwrites the same keys, so a re-run is the resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import NoReturn

from imagemesh.config import Settings, StorageSettings
from imagemesh.errors import AlreadyExists, InvalidArgument, NotFound
from imagemesh.page_tokens import PageTokenCodec

from .jobs import JobMode, JobRecord, JobState, RateMeter, Selection, new_job_id
from .pipeline import JobSpec, Outcome, describe_error
from .runners import JobRunner, RunControl
from .selection import MAX_EXPLICIT_NAMES, SelectionResolver, unique_names
from .store import JobStore

__all__ = ["RESTART_REASON", "BatchJobManager", "BatchOptions", "JobRequest"]

_log = logging.getLogger(__name__)

RESTART_REASON = "the inference service restarted while the job ran"
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000


@dataclass(frozen=True)
class JobRequest:
    """A validated-on-create request to start a job."""

    selection: Selection
    model_version: str = ""
    mode: JobMode = JobMode.AUTO
    store_inputs: bool = False
    top_k: int = 0
    request_id: str = ""

    def fingerprint(self) -> str:
        """A digest of everything but the request id: a retried call must match it exactly."""
        document = {
            "selection": self.selection.to_dict(),
            "model_version": self.model_version,
            "mode": self.mode.value,
            "store_inputs": self.store_inputs,
            "top_k": self.top_k,
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class BatchOptions:
    """How jobs run: where to reach the other services and the tuning knobs."""

    storage: StorageSettings
    search_address: str
    spark_threshold: int = 5000
    batch_size: int = 64
    io_threads: int = 16
    heartbeat_s: float = 2.0
    lease_s: float = 60.0
    page_token_secret: str = ""
    # The deployment's settings for the workers' channels to other services (TLS, token).
    client: Settings | None = None


@dataclass
class _Active:
    record: JobRecord
    control: RunControl
    runner: JobRunner | None = None
    meter: RateMeter | None = None
    persisted_at: float = 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BatchJobManager:
    """The batch jobs of this inference service; see the module docstring."""

    def __init__(
        self,
        *,
        jobs: JobStore,
        options: BatchOptions,
        resolver: SelectionResolver,
        local_runner: JobRunner,
        spark_runner: JobRunner,
        resolve_model: Callable[[str], str],
    ) -> None:
        self._jobs = jobs
        self._options = options
        self._resolver = resolver
        self._local = local_runner
        self._spark = spark_runner
        self._resolve_model = resolve_model
        self._tokens = PageTokenCodec(options.page_token_secret)
        self._owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "instance": uuid.uuid4().hex,
        }
        self._lock = threading.RLock()
        self._create_lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Marks jobs orphaned by a dead process of this host, then starts the heartbeat."""
        for record in self._jobs.records(self._jobs.ids_newest_first()):
            if not record.final and self._orphaned_here(record):
                self._mark_orphan(record)
        self._heart = threading.Thread(
            target=self._heartbeat_loop, name="batch-heartbeat", daemon=True
        )
        self._heart.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancels running jobs, waits up to `timeout_s` for them, and records the truth."""
        with self._lock:
            active = list(self._active.values())
        for job in active:
            if job.runner is not None:
                with contextlib.suppress(Exception):
                    job.runner.cancel(job.control)
            job.control.cancelled.set()
        deadline = time.monotonic() + timeout_s
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        with self._lock:
            leftovers = list(self._active.values())
        for job in leftovers:
            with contextlib.suppress(Exception):
                self._mark_orphan(
                    job.record, reason="the inference service stopped while the job ran"
                )

    # --- the RPCs' domain side -----------------------------------------------------------

    def create(self, request: JobRequest) -> JobRecord:
        """Validates `request`, records a PENDING job and starts it; returns the record."""
        request = self._validated(request)
        with self._create_lock:
            if request.request_id:
                existing = self._jobs.job_for_request(request.request_id)
                if existing is not None:
                    record = self.get(existing)
                    if record.request_fingerprint != request.fingerprint():
                        raise_already_exists(request.request_id, record)
                    return record
            model_version = self._resolve_model(request.model_version)
            record = JobRecord(
                job_id=new_job_id(),
                state=JobState.PENDING,
                selection=request.selection,
                model_version=model_version,
                requested_mode=request.mode,
                total_count=len(request.selection.names),
                store_inputs=request.store_inputs,
                top_k=request.top_k or DEFAULT_TOP_K,
                request_id=request.request_id,
                request_fingerprint=request.fingerprint(),
                owner=dict(self._owner),
                heartbeat_time=time.time(),
            )
            self._jobs.create(record)
            control = RunControl(
                job_group=f"imagemesh-batch-{record.job_id}", report=lambda _: None
            )
            active = _Active(record=record, control=control, persisted_at=time.monotonic())
            control.report = partial(self._on_progress, active)
            with self._lock:
                self._active[record.job_id] = active
            thread = threading.Thread(
                target=self._drive, args=(active,), name=f"batch-{record.job_id}", daemon=True
            )
            self._threads[record.job_id] = thread
            thread.start()
            return record

    def get(self, job_id: str) -> JobRecord:
        """The job as it is now; `NotFound` if there is none."""
        with self._lock:
            active = self._active.get(job_id)
            if active is not None:
                return active.record
        record = self._jobs.get(job_id)
        if not record.final and self._stale(record):
            record = self._mark_orphan(record)
        return record

    def list(
        self, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        """A page of jobs, newest first, optionally in one state; and the next page's token."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be 0 (meaning {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}, "
                f"got {page_size}",
                field="page_size",
            )
        size = page_size or DEFAULT_PAGE_SIZE
        query = f"state={state.value if state else ''}"
        after = ""
        if page_token:
            after = str(self._tokens.decode(page_token, query=query).get("after", ""))
        ids = self._jobs.ids_newest_first()
        if after:
            ids = [i for i in ids if i < after]
        page: list[JobRecord] = []
        last_seen = ""
        more = False
        for job_id in ids:
            if len(page) == size:
                more = True
                break
            last_seen = job_id
            try:
                record = self.get(job_id)
            except NotFound:
                continue
            if state is None or record.state is state:
                page.append(record)
        token = self._tokens.encode({"after": last_seen}, query=query) if more else ""
        return page, token

    def cancel(self, job_id: str) -> JobRecord:
        """Asks the job to stop; a final job comes back unchanged."""
        with self._lock:
            active = self._active.get(job_id)
            if active is not None:
                if active.record.final or active.record.state is JobState.CANCELLING:
                    return active.record
                active.record = active.record.transition(JobState.CANCELLING, cancel_requested=True)
                record = active.record
                runner = active.runner
                active.control.cancelled.set()
        if active is not None:
            self._jobs.request_cancel(job_id)
            self._persist(record)
            if runner is not None:
                try:
                    runner.cancel(active.control)
                except Exception:  # the job thread will still see the cancelled flag
                    _log.warning("cancelling job %s failed", job_id, exc_info=True)
            return record
        record = self.get(job_id)
        if record.final:
            return record
        # Driven by another process: its workers see the marker, its driver sees the record
        # at its next heartbeat.
        self._jobs.request_cancel(job_id)
        record = replace(record, cancel_requested=True)
        self._jobs.put(record)
        return record

    async def watch(self, job_id: str, interval_s: float = 0.25) -> AsyncIterator[JobRecord]:
        """The job now, then every change (at most every `interval_s`), ending at a final state."""
        record = await asyncio.to_thread(self.get, job_id)
        yield record
        last = _visible(record)
        while not record.final:
            await asyncio.sleep(interval_s)
            record = await asyncio.to_thread(self.get, job_id)
            shown = _visible(record)
            if shown != last:
                last = shown
                yield record

    # --- running a job -------------------------------------------------------------------

    def _drive(self, active: _Active) -> None:
        job_id = active.record.job_id
        try:
            self._run(active)
        except BaseException as exc:  # a driver thread must always leave a final record
            _log.exception("batch job %s failed", job_id)
            with self._lock:
                record = active.record
                if not record.final:
                    if record.state is JobState.CANCELLING:
                        active.record = record.transition(JobState.CANCELLED)
                    else:
                        active.record = record.transition(
                            JobState.FAILED, error_message=describe_error(exc)[:2000]
                        )
            with contextlib.suppress(Exception):
                self._persist(active.record)
        finally:
            active.control.finished.set()
            with self._lock:
                self._active.pop(job_id, None)
                self._threads.pop(job_id, None)

    def _run(self, active: _Active) -> None:
        control = active.control
        record = active.record
        names = (
            list(record.selection.names)
            if record.selection.kind == "names"
            else self._resolver.resolve(record.selection, control.cancelled.is_set)
        )
        runner = self._choose_runner(record.requested_mode, len(names))
        with self._lock:
            if active.record.state is JobState.CANCELLING:
                active.record = active.record.transition(JobState.CANCELLED, total_count=len(names))
                self._persist(active.record)
                return
            active.runner = runner
            active.meter = RateMeter()
            active.meter.add(0)
            active.record = active.record.transition(
                JobState.RUNNING,
                total_count=len(names),
                mode=JobMode(runner.mode_name),
                start_time=time.time(),
                spark_job_group=control.job_group if runner.mode_name == "SPARK" else "",
            )
            record = active.record
        self._persist(record)
        spec = JobSpec(
            job_id=record.job_id,
            model_version=record.model_version,
            storage=self._options.storage,
            search_address=self._options.search_address,
            store_inputs=record.store_inputs,
            top_k=record.top_k,
            batch_size=self._options.batch_size,
            io_threads=self._options.io_threads,
            cancel_key=self._jobs.cancel_key(record.job_id),
            client=self._options.client,
        )
        outcome = runner.run(spec, names, control) if names else Outcome()
        self._finish(active, outcome, len(names))

    def _choose_runner(self, mode: JobMode, count: int) -> JobRunner:
        if mode is JobMode.LOCAL:
            return self._local
        if mode is JobMode.SPARK:
            return self._spark
        return self._spark if count > self._options.spark_threshold else self._local

    def _finish(self, active: _Active, outcome: Outcome, total: int) -> None:
        with self._lock:
            self._apply(active, outcome)
            record = active.record
            done = record.processed_count + record.failed_count
            if record.state is JobState.CANCELLING or outcome.stopped:
                if record.state is JobState.RUNNING:
                    record = record.transition(JobState.CANCELLING)
                record = record.transition(JobState.CANCELLED, images_per_second=0.0)
            elif done < total:
                record = record.transition(
                    JobState.FAILED,
                    error_message=f"{total - done} of {total} images were neither classified "
                    "nor reported as failed",
                )
            else:
                record = record.transition(JobState.SUCCEEDED)
            active.record = record
        self._persist(record)

    def _on_progress(self, active: _Active, outcome: Outcome) -> None:
        persist = None
        with self._lock:
            self._apply(active, outcome)
            now = time.monotonic()
            if now - active.persisted_at >= self._options.heartbeat_s:
                active.persisted_at = now
                persist = active.record
        if persist is not None:
            self._persist(persist)

    def _apply(self, active: _Active, outcome: Outcome) -> None:
        record = active.record
        done = outcome.processed + outcome.failed
        rate, eta = 0.0, None
        if active.meter is not None:
            active.meter.add(done)
            rate = active.meter.rate()
            eta = active.meter.eta_s(record.total_count - done)
        active.record = record.with_progress(
            outcome.processed, outcome.failed, tuple(outcome.failures), rate, eta
        )

    # --- durability ----------------------------------------------------------------------

    def _persist(self, record: JobRecord) -> None:
        record = replace(record, heartbeat_time=time.time())
        self._jobs.put(record)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._options.heartbeat_s):
            with self._lock:
                active = [a for a in self._active.values() if not a.record.final]
            for job in active:
                try:
                    stored = self._jobs.get(job.record.job_id)
                    if stored.cancel_requested and not job.control.cancelled.is_set():
                        self.cancel(job.record.job_id)
                    with self._lock:
                        job.persisted_at = time.monotonic()
                        record = job.record
                    if not record.final:
                        self._persist(record)
                except Exception:  # a store hiccup must not stop the heartbeat
                    _log.warning("heartbeat of job %s failed", job.record.job_id, exc_info=True)

    def _orphaned_here(self, record: JobRecord) -> bool:
        owner = record.owner
        if owner.get("host") != self._owner["host"]:
            return self._stale(record)
        if owner.get("instance") == self._owner["instance"]:
            return False
        pid = int(owner.get("pid", 0))
        return pid == os.getpid() or not _pid_alive(pid) or self._stale(record)

    def _stale(self, record: JobRecord) -> bool:
        with self._lock:
            if record.job_id in self._active:
                return False
        if record.owner.get("instance") == self._owner["instance"]:
            # Ours but no longer active: its thread ended without a final record.
            return True
        beat = record.heartbeat_time or record.create_time
        if time.time() - beat > self._options.lease_s:
            return True
        if record.owner.get("host") == self._owner["host"]:
            pid = int(record.owner.get("pid", 0))
            return pid != os.getpid() and not _pid_alive(pid)
        return False

    def _mark_orphan(self, record: JobRecord, reason: str = RESTART_REASON) -> JobRecord:
        if record.final:
            return record
        if record.state is JobState.CANCELLING or record.cancel_requested:
            if record.state is not JobState.CANCELLING:
                record = record.transition(JobState.CANCELLING)
            marked = record.transition(JobState.CANCELLED, error_message=reason)
        else:
            marked = record.transition(JobState.FAILED, error_message=reason)
        marked = replace(marked, images_per_second=0.0)
        self._jobs.put(marked)
        return marked

    # --- validation ----------------------------------------------------------------------

    def _validated(self, request: JobRequest) -> JobRequest:
        selection = request.selection
        if selection.kind == "names":
            if not selection.names:
                raise InvalidArgument(
                    "selection is required: give image names, a dataset, or a search filter",
                    reason="EMPTY_SELECTION",
                    field="selection",
                )
            if len(selection.names) > MAX_EXPLICIT_NAMES:
                raise InvalidArgument(
                    f"selection.images.names holds {len(selection.names):,} names; at most "
                    f"{MAX_EXPLICIT_NAMES:,} per job (select a dataset or a search filter for "
                    "more)",
                    reason="SELECTION_TOO_LARGE",
                    field="selection.images.names",
                )
            selection = Selection(names=tuple(unique_names(selection.names)))
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise InvalidArgument(
                f"top_k must be 0 (meaning {DEFAULT_TOP_K}) to {MAX_TOP_K}, got {request.top_k}",
                field="top_k",
            )
        return replace(request, selection=selection)


def raise_already_exists(request_id: str, record: JobRecord) -> NoReturn:
    """A request id reused with other parameters."""
    raise AlreadyExists(
        f"request_id {request_id[:100]!r} already started {record.name} with other "
        "parameters; use a new request_id for a different job",
        reason="REQUEST_ID_REUSED",
    )


def _visible(record: JobRecord) -> tuple[object, ...]:
    """What a watcher sees change (not the heartbeat)."""
    return (
        record.state,
        record.processed_count,
        record.failed_count,
        record.total_count,
        record.mode,
        record.error_message,
    )
