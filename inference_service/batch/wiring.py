"""Assembling the batch-job side of the inference service from its settings.

`start_batch_jobs` is what the service's mount calls in its start hook: it opens the job store,
builds the runners (LOCAL through the service's own model and batcher, SPARK on one warm
application for the process), recovers the records of jobs a previous process left running,
and returns a handle whose `stop` cancels running jobs and stops the Spark application.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from imagemesh.config import Settings
from imagemesh.errors import FailedPrecondition
from imagemesh.spark.app import SparkApp

from .local_runner import LocalRunner
from .manager import BatchJobManager, BatchOptions
from .pipeline import JobSpec
from .selection import GrpcSelectionResolver
from .served import ServedPredictors
from .spark_runner import SparkRunner
from .store import JobStore

__all__ = ["BatchJobs", "start_batch_jobs"]

_log = logging.getLogger(__name__)


@dataclass
class BatchJobs:
    """The running batch-job machinery of one service process."""

    manager: BatchJobManager
    spark: SparkApp

    async def stop(self) -> None:
        """Stops running jobs (their records say so) and the Spark application."""
        await asyncio.to_thread(self.manager.stop)
        await asyncio.to_thread(self.spark.stop)


async def start_batch_jobs(
    settings: Settings,
    *,
    storage_address: str,
    search_address: str,
    model_manager: Any,
) -> BatchJobs:
    """Builds and starts the batch jobs of a service whose online model is `model_manager`
    (`inference_service.serving.ModelManager`: its serving version is the default one, and
    LOCAL jobs go through its batcher)."""
    from storage_service.backends import open_object_store

    inference = settings.inference
    store = open_object_store(settings.storage)

    def resolve_model(name: str) -> str:
        if name:
            return str(model_manager.registry.get(name).name)  # NotFound if unpublished
        serving = model_manager.serving
        if serving is None:
            from inference_service.serving import no_model_message

            raise FailedPrecondition(no_model_message(model_manager.model), reason="NO_MODEL")
        return str(serving.name)

    app = SparkApp(settings.spark)
    spark_runner = SparkRunner(app, partition_images=settings.spark.partition_images)
    manager = BatchJobManager(
        jobs=JobStore(store),
        options=BatchOptions(
            storage=settings.storage,
            search_address=search_address,
            spark_threshold=inference.spark_threshold,
            batch_size=inference.batch_job_batch_size,
            io_threads=inference.batch_job_io_threads,
            heartbeat_s=inference.batch_job_heartbeat_s,
            lease_s=inference.batch_job_lease_s,
            page_token_secret=inference.page_token_secret,
            client=settings,
        ),
        resolver=GrpcSelectionResolver(storage_address, search_address, settings),
        local_runner=LocalRunner(
            predictor_for=ServedPredictors(model_manager, asyncio.get_running_loop())
        ),
        spark_runner=spark_runner,
        resolve_model=resolve_model,
    )
    await asyncio.to_thread(manager.start)
    if settings.spark.warm_on_start and model_manager.serving is not None:
        spec = JobSpec(
            job_id="warm-up",
            model_version=str(model_manager.serving.name),
            storage=settings.storage,
            search_address=search_address,
            batch_size=inference.batch_job_batch_size,
            client=settings,
        )

        def warm() -> None:
            try:
                spark_runner.warm(spec)
                _log.info("Spark application warm with %s", spec.model_version)
            except Exception:  # a cold first job is slower, not broken
                _log.warning("warming the Spark application failed", exc_info=True)

        threading.Thread(target=warm, name="spark-warm", daemon=True).start()
    return BatchJobs(manager=manager, spark=app)
