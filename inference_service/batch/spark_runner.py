"""Runs a job on Spark: image names in partitions, the pipeline in each Python worker.

Driver side (`SparkRunner.run`, in the inference service): checks the master answers (a
down master fails the job at once instead of Spark retrying for a minute), spreads the names
over partitions of `partition_images` (explicitly: `parallelize(names, n)`, not a DataFrame from
pandas, which would give one partition), and runs one action under the job's own job group, so
that `cancel` is `sc.cancelJobGroup` and stops exactly this job's tasks.

Worker side (`_run_partition`): the model, the store client and the search channel are cached
per Python worker (`imagemesh.spark.worker.worker_cached`) and outlive tasks and jobs; the
partition's names go through `pipeline.classify_names`.

Progress: each task adds its outcome (counts, first failures) to an accumulator when it ends.
Spark applies an action's accumulator updates once per partition, even when a task is retried
or its executor is lost, so the counts add up exactly after a worker dies mid-job; the driver
polls the accumulator twice a second for live counts. Partitions are small (256 images by
default, `spark.partition_images`) so the counts move every second or two and a lost executor
costs little work.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from pyspark.accumulators import AccumulatorParam

from imagemesh.errors import Unavailable
from imagemesh.spark.app import SparkApp, SparkMasterUnavailable

from .indexer import cached_indexer
from .jobs import MAX_LISTED_FAILURES, ItemFailure
from .pipeline import CancelSignal, JobSpec, Outcome, classify_names
from .predictor import cached_predictor, open_store_cached
from .runners import RunControl

__all__ = ["SparkRunner", "partition_count"]

_log = logging.getLogger(__name__)

# (processed, failed, failures as tuples): plain values, cheap to pickle with each task result.
_Tally = tuple[int, int, tuple[tuple[str, str, str, str], ...]]


def _tally(outcome: Outcome) -> _Tally:
    return (
        outcome.processed,
        outcome.failed,
        tuple((f.image, f.code, f.reason, f.message) for f in outcome.failures),
    )


def _outcome(tally: _Tally) -> Outcome:
    processed, failed, failures = tally
    return Outcome(processed, failed, [ItemFailure(*f) for f in failures])


class _TallyParam(AccumulatorParam[_Tally]):
    """Adds tallies: counts summed, failures concatenated up to the listed maximum."""

    def zero(self, value: _Tally) -> _Tally:
        return (0, 0, ())

    def addInPlace(self, a: _Tally, b: _Tally) -> _Tally:
        return (a[0] + b[0], a[1] + b[1], (a[2] + b[2])[:MAX_LISTED_FAILURES])


def partition_count(names: int, partition_images: int, slots: int) -> int:
    """Partitions for `names`: about `partition_images` each, and at least one per slot."""
    if names <= 0:
        return 1
    return max(min(names, max(1, slots)), math.ceil(names / partition_images))


def _run_partition(spec: JobSpec, accumulator: Any, names: Iterator[str]) -> None:
    """A Spark task: classify this partition's names and add the outcome to the accumulator.

    A task that starts after the job's cancel marker appeared does nothing; a running one
    stops after its batch in hand.
    """
    store = open_store_cached(spec.storage)
    should_stop = CancelSignal(store, spec.cancel_key)
    if should_stop():
        accumulator.add((0, 0, ()))
        return
    outcome = classify_names(
        names,
        spec,
        cached_predictor(spec.model_version, spec.storage, spec.batch_size),
        store,
        cached_indexer(spec.search_address, spec.client),
        should_stop=should_stop,
    )
    accumulator.add(_tally(outcome))


def _warm_partition(spec: JobSpec, _items: Iterator[int]) -> None:
    cached_predictor(spec.model_version, spec.storage, spec.batch_size)
    open_store_cached(spec.storage)
    cached_indexer(spec.search_address, spec.client)


class SparkRunner:
    """`JobRunner` on the application `app` keeps warm."""

    mode_name = "SPARK"

    def __init__(
        self, app: SparkApp, partition_images: int = 256, cancel_grace_s: float = 10.0
    ) -> None:
        self.app = app
        self.partition_images = partition_images
        self.cancel_grace_s = cancel_grace_s
        self._cancel_lock = threading.Lock()

    def run(self, spec: JobSpec, names: Sequence[str], control: RunControl) -> Outcome:
        """Classifies `names` on Spark; see `JobRunner.run`."""
        try:
            self.app.check_master()
        except SparkMasterUnavailable:
            # An application whose master went away has lost (or will lose) its executors:
            # drop it, off this thread so the job fails at once, and start afresh next time.
            threading.Thread(target=self.app.stop, name="spark-stop", daemon=True).start()
            raise
        context = self.app.context()
        if control.cancelled.is_set():
            return Outcome(stopped=True)
        # Job groups are per thread (pyspark pins each Python thread to a JVM thread).
        context.setJobGroup(
            control.job_group, f"imagemesh batch job {spec.job_id}", interruptOnCancel=True
        )
        accumulator = context.accumulator((0, 0, ()), _TallyParam())
        slots = int(context.defaultParallelism)
        rdd = context.parallelize(
            list(names), partition_count(len(names), self.partition_images, slots)
        )
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.5):
                control.report(_outcome(accumulator.value))

        poller = threading.Thread(target=poll, name=f"progress-{spec.job_id}", daemon=True)
        poller.start()
        try:
            rdd.foreachPartition(partial(_run_partition, spec, accumulator))
        except Exception as exc:
            if control.cancelled.is_set():
                # Killed through the job group: the counts are those of the tasks that ended.
                final = _outcome(accumulator.value)
                final.stopped = True
                return final
            if not self.app.running:
                raise Unavailable(
                    f"the Spark application stopped while the job ran: {_first_line(exc)}"
                ) from exc
            raise RuntimeError(f"the Spark job failed: {_first_line(exc)}") from exc
        finally:
            done.set()
            poller.join()
            context.setLocalProperty("spark.jobGroup.id", None)
        final = _outcome(accumulator.value)
        final.stopped = control.cancelled.is_set()
        return final

    def warm(self, spec: JobSpec) -> None:
        """Starts the application and loads `spec`'s model in its Python workers (one task
        per slot), so that the next job on that version starts warm."""
        self.app.check_master()
        context = self.app.context()
        slots = max(1, int(context.defaultParallelism))
        context.parallelize(range(slots), slots).foreachPartition(partial(_warm_partition, spec))

    def cancel(self, control: RunControl) -> None:
        """Stops the job: workers see its cancel marker (the manager wrote it) and finish the
        batch in hand; tasks still running after `cancel_grace_s` are killed through the job
        group (interrupting them), so a stuck task cannot hold the cancellation."""
        control.cancelled.set()

        def kill_stragglers() -> None:
            if control.finished.wait(self.cancel_grace_s):
                return
            with self._cancel_lock:
                if self.app.running:
                    self.app.context().cancelJobGroup(control.job_group)

        threading.Thread(target=kill_stragglers, name="spark-cancel", daemon=True).start()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # A Py4J error carries the whole Java stack; its first lines say what happened.
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Exception:" in line or "Error:" in line:
            return line.strip()[:500]
    return (lines[0] if lines else type(exc).__name__)[:500]
