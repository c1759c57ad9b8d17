"""What a runner is: it classifies a job's names somewhere and reports progress as it goes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .pipeline import JobSpec, Outcome

__all__ = ["JobRunner", "RunControl"]


@dataclass
class RunControl:
    """The manager's handle on a running job: cancellation and progress reporting.

    `report` receives cumulative outcomes (counts so far, never lower than the previous ones).
    """

    job_group: str
    report: Callable[[Outcome], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the manager once the runner returned (however it ended).
    finished: threading.Event = field(default_factory=threading.Event)


class JobRunner(Protocol):
    """Runs one job's names to the end (or until cancelled) and returns the final outcome.

    Raises for a failure of the job as a whole (the message is shown to the user); returns an
    outcome with `stopped` set when cancelled. `cancel` may be called from any thread.
    """

    mode_name: str

    def run(self, spec: JobSpec, names: Sequence[str], control: RunControl) -> Outcome:
        """Classifies `names`."""
        ...

    def cancel(self, control: RunControl) -> None:
        """Asks the running job to stop as soon as it can."""
        ...
