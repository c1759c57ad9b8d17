"""The batch job resource as plain data: states, selection, counts, failures, JSON form.

State machine (every arrow is the only way in; final states never change again):

    PENDING ──> RUNNING ──> SUCCEEDED
       │           │──────> FAILED
       │           └──────> CANCELLING ──> CANCELLED
       ├──────────────────> CANCELLING
       └──────────────────> FAILED        (the selection could not be resolved, Spark is down)

`processed + failed <= total` always; at SUCCEEDED, `processed + failed == total`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from imagemesh.errors import FailedPrecondition

__all__ = [
    "FINAL_STATES",
    "MAX_LISTED_FAILURES",
    "ItemFailure",
    "JobMode",
    "JobRecord",
    "JobState",
    "RateMeter",
    "Selection",
    "new_job_id",
]

# A job lists at most this many failed images with their reasons (the count is exact).
MAX_LISTED_FAILURES = 100


class JobState(StrEnum):
    """Where a job is in its life."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_ALLOWED = {
    JobState.PENDING: {JobState.RUNNING, JobState.CANCELLING, JobState.FAILED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING},
    JobState.CANCELLING: {JobState.CANCELLED, JobState.FAILED},
}


class JobMode(StrEnum):
    """Where a job runs; AUTO picks LOCAL or SPARK by the selection's size."""

    AUTO = "AUTO"
    LOCAL = "LOCAL"
    SPARK = "SPARK"


@dataclass(frozen=True)
class Selection:
    """Which images a job classifies: exactly one of names, dataset, or a search filter.

    `filter` is the search filter in its protobuf JSON form (the domain stays free of
    transport types; the search adapter parses it back).
    """

    names: tuple[str, ...] = ()
    dataset: str | None = None
    filter: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """`names`, `dataset` or `filter`."""
        if self.dataset is not None:
            return "dataset"
        if self.filter is not None:
            return "filter"
        return "names"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"names": list(self.names), "dataset": self.dataset, "filter": self.filter}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        """Inverse of `to_dict`."""
        return cls(
            names=tuple(data.get("names") or ()),
            dataset=data.get("dataset"),
            filter=data.get("filter"),
        )


@dataclass(frozen=True)
class ItemFailure:
    """One image a job could not classify: its name and an ItemError's three parts."""

    image: str
    code: str
    reason: str
    message: str


def new_job_id(now: float | None = None) -> str:
    """A fresh job id that sorts by creation time: `{unix_ms:013d}-{8 hex}`."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:013d}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class JobRecord:
    """A batch job, as stored in `jobs/{job_id}.json` and served by the RPCs.

    Times are Unix seconds (None until they happen). `owner` names the process driving the
    job (`host`, `pid`, `instance`), so that after a restart a record whose driver is gone
    can be told from one still running elsewhere; `heartbeat_time` is refreshed while it runs.
    """

    job_id: str
    state: JobState
    selection: Selection
    model_version: str
    requested_mode: JobMode
    mode: JobMode | None = None
    total_count: int = 0
    processed_count: int = 0
    failed_count: int = 0
    images_per_second: float = 0.0
    eta_s: float | None = None
    create_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    error_message: str = ""
    failures: tuple[ItemFailure, ...] = ()
    store_inputs: bool = False
    top_k: int = 5
    spark_job_group: str = ""
    request_id: str = ""
    request_fingerprint: str = ""
    owner: dict[str, Any] = field(default_factory=dict)
    heartbeat_time: float | None = None
    cancel_requested: bool = False

    @property
    def name(self) -> str:
        """`batchJobs/{job_id}`."""
        return f"batchJobs/{self.job_id}"

    @property
    def final(self) -> bool:
        """Whether the job reached a state it never leaves."""
        return self.state in FINAL_STATES

    def transition(self, state: JobState, **changes: Any) -> JobRecord:
        """A copy in `state`; `FailedPrecondition` if the state machine forbids the move."""
        if state is not self.state and state not in _ALLOWED.get(self.state, set()):
            raise FailedPrecondition(
                f"job {self.name} cannot go from {self.state} to {state}",
                reason="INVALID_JOB_TRANSITION",
            )
        if state in FINAL_STATES and "end_time" not in changes:
            changes["end_time"] = time.time()
        if state in FINAL_STATES:
            changes.setdefault("eta_s", None)
        return replace(self, state=state, **changes)

    def with_progress(
        self,
        processed: int,
        failed: int,
        failures: tuple[ItemFailure, ...],
        rate: float,
        eta_s: float | None,
    ) -> JobRecord:
        """A copy with new counts; counts never go backwards (a retried task cannot lower them)."""
        return replace(
            self,
            processed_count=max(self.processed_count, processed),
            failed_count=max(self.failed_count, failed),
            failures=failures[:MAX_LISTED_FAILURES] if failures else self.failures,
            images_per_second=rate,
            eta_s=eta_s,
        )

    def to_json(self) -> bytes:
        """The stored form."""
        document = asdict(self)
        document["selection"] = self.selection.to_dict()
        document["format_version"] = 1
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        """Inverse of `to_json`; `ValueError` for a document that is not a job record."""
        try:
            document = json.loads(data)
            document.pop("format_version", None)
            document["state"] = JobState(document["state"])
            document["requested_mode"] = JobMode(document["requested_mode"])
            document["mode"] = JobMode(document["mode"]) if document.get("mode") else None
            document["selection"] = Selection.from_dict(document["selection"])
            document["failures"] = tuple(ItemFailure(**f) for f in document.get("failures", ()))
            return cls(**document)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a batch job record: {exc}") from exc


class RateMeter:
    """The recent rate of a growing count (images/s over a sliding window) and the ETA."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float | None = None) -> None:
        """Records that `done` items were finished at `now`."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window_s:
            self._samples.popleft()

    def rate(self) -> float:
        """Items per second over the window; 0 until two samples span some time."""
        if len(self._samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, remaining: int) -> float | None:
        """Seconds until `remaining` more items are done at the current rate; None if unknown."""
        rate = self.rate()
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate > 0 else None
