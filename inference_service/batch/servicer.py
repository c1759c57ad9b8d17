"""The gRPC transport of the five batch-job RPCs: proto in, domain call, proto out.

`BatchJobsServicer` holds no logic: it turns requests into `manager.JobRequest`s and records
into `BatchJob` messages, and domain errors into statuses (`imagemesh.status.abort_with`). The
inference service's servicer gets these methods by inheriting from it (see `mount`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from imagemesh.common.v1 import common_pb2
from imagemesh.errors import ImageMeshError, InvalidArgument
from imagemesh.inference.v1 import inference_pb2
from imagemesh.names import job_id, validate_dataset
from imagemesh.status import abort_with

from .jobs import JobMode, JobRecord, JobState, Selection
from .manager import BatchJobManager, JobRequest

__all__ = ["BatchJobsServicer", "job_proto", "request_from_proto"]

_log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_MODES = {
    inference_pb2.BATCH_MODE_UNSPECIFIED: JobMode.AUTO,
    inference_pb2.BATCH_MODE_AUTO: JobMode.AUTO,
    inference_pb2.BATCH_MODE_LOCAL: JobMode.LOCAL,
    inference_pb2.BATCH_MODE_SPARK: JobMode.SPARK,
}
_MODE_PROTOS = {
    JobMode.AUTO: inference_pb2.BATCH_MODE_AUTO,
    JobMode.LOCAL: inference_pb2.BATCH_MODE_LOCAL,
    JobMode.SPARK: inference_pb2.BATCH_MODE_SPARK,
}
_STATE_PROTOS = {
    state: inference_pb2.BatchJobState.Value(f"BATCH_JOB_STATE_{state.value}") for state in JobState
}
_STATES = {value: state for state, value in _STATE_PROTOS.items()}


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def request_from_proto(request: inference_pb2.BatchClassifyRequest) -> JobRequest:
    """The domain request; `InvalidArgument` for a selection or mode the contract forbids."""
    kind = request.selection.WhichOneof("kind")
    if kind == "images":
        selection = Selection(names=tuple(request.selection.images.names))
    elif kind == "dataset":
        selection = Selection(
            dataset=validate_dataset(request.selection.dataset, field="selection.dataset")
        )
    elif kind == "filter":
        selection = Selection(
            filter=json_format.MessageToDict(
                request.selection.filter, preserving_proto_field_name=False
            )
        )
    else:
        selection = Selection()
    if request.mode not in _MODES:
        raise InvalidArgument(f"mode {request.mode} is not a BatchMode", field="mode")
    return JobRequest(
        selection=selection,
        model_version=request.model_version,
        mode=_MODES[request.mode],
        store_inputs=request.store_inputs,
        top_k=request.top_k,
        request_id=request.request_id,
    )


def job_proto(record: JobRecord) -> inference_pb2.BatchJob:
    """The `BatchJob` message of a record."""
    selection = inference_pb2.BatchSelection()
    if record.selection.dataset is not None:
        selection.dataset = record.selection.dataset
    elif record.selection.filter is not None:
        json_format.ParseDict(record.selection.filter, selection.filter)
    else:
        selection.images.names.extend(record.selection.names)
    job = inference_pb2.BatchJob(
        name=record.name,
        state=_STATE_PROTOS[record.state],
        selection=selection,
        model_version=record.model_version,
        requested_mode=_MODE_PROTOS[record.requested_mode],
        mode=_MODE_PROTOS[record.mode] if record.mode else inference_pb2.BATCH_MODE_UNSPECIFIED,
        total_count=record.total_count,
        processed_count=record.processed_count,
        failed_count=record.failed_count,
        images_per_second=record.images_per_second,
        error_message=record.error_message,
        failures=[
            inference_pb2.BatchItemFailure(
                image=f.image,
                error=common_pb2.ItemError(code=f.code, reason=f.reason, message=f.message),
            )
            for f in record.failures
        ],
        store_inputs=record.store_inputs,
        top_k=record.top_k,
        spark_job_group=record.spark_job_group,
    )
    if record.eta_s is not None and not record.final:
        eta = duration_pb2.Duration()
        eta.FromMilliseconds(int(record.eta_s * 1000))
        job.estimated_time_remaining.CopyFrom(eta)
    for field, seconds in (
        ("create_time", record.create_time),
        ("start_time", record.start_time),
        ("end_time", record.end_time),
    ):
        stamp = _timestamp(seconds)
        if stamp is not None:
            getattr(job, field).CopyFrom(stamp)
    return job


class BatchJobsServicer:
    """BatchClassify, GetBatchJob, ListBatchJobs, CancelBatchJob and WatchBatchJob."""

    batch_jobs: BatchJobManager

    def bind_batch_jobs(self, manager: BatchJobManager) -> None:
        """Attaches the job manager (the servicer exists before the mount starts)."""
        self.batch_jobs = manager

    async def BatchClassify(
        self, request: inference_pb2.BatchClassifyRequest, context: Context
    ) -> inference_pb2.BatchClassifyResponse:
        """Starts a job and returns it at once."""
        try:
            record = await asyncio.to_thread(self.batch_jobs.create, request_from_proto(request))
        except ImageMeshError as error:
            await abort_with(context, error)
        return inference_pb2.BatchClassifyResponse(job=job_proto(record))

    async def GetBatchJob(
        self, request: inference_pb2.GetBatchJobRequest, context: Context
    ) -> inference_pb2.GetBatchJobResponse:
        """Returns a job."""
        try:
            record = await asyncio.to_thread(self.batch_jobs.get, job_id(request.name))
        except ImageMeshError as error:
            await abort_with(context, error)
        return inference_pb2.GetBatchJobResponse(job=job_proto(record))

    async def ListBatchJobs(
        self, request: inference_pb2.ListBatchJobsRequest, context: Context
    ) -> inference_pb2.ListBatchJobsResponse:
        """Lists jobs, newest first."""
        try:
            if request.state not in _STATES and request.state != 0:
                raise InvalidArgument(
                    f"state {request.state} is not a BatchJobState", field="state"
                )
            state = _STATES.get(request.state)
            records, token = await asyncio.to_thread(
                self.batch_jobs.list, state, request.page_size, request.page_token
            )
        except ImageMeshError as error:
            await abort_with(context, error)
        return inference_pb2.ListBatchJobsResponse(
            jobs=[job_proto(r) for r in records], next_page_token=token
        )

    async def CancelBatchJob(
        self, request: inference_pb2.CancelBatchJobRequest, context: Context
    ) -> inference_pb2.CancelBatchJobResponse:
        """Asks a job to stop."""
        try:
            record = await asyncio.to_thread(self.batch_jobs.cancel, job_id(request.name))
        except ImageMeshError as error:
            await abort_with(context, error)
        return inference_pb2.CancelBatchJobResponse(job=job_proto(record))

    async def WatchBatchJob(
        self, request: inference_pb2.WatchBatchJobRequest, context: Context
    ) -> AsyncIterator[inference_pb2.WatchBatchJobResponse]:
        """Streams a job's changes until its final state."""
        try:
            async for record in self.batch_jobs.watch(job_id(request.name)):
                yield inference_pb2.WatchBatchJobResponse(job=job_proto(record))
        except ImageMeshError as error:
            await abort_with(context, error)
