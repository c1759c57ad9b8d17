"""How the InferenceService is mounted on a server.

The service opens the object store itself for model artifacts (`models/...`, like KServe's
storage initializer), and reaches StorageService and SearchService over gRPC for images and
predictions. Its `start` hook loads and warms the model before the service reports SERVING.
Served alone, its Classify and ClassifyStream are served by the synchronous front
(`blocking_servicer`, `imagemesh.front`), the rest by grpc.aio.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagemesh.hot_pool import HotThreadPool
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import MeshContext
from imagemesh.page_tokens import PageTokenCodec
from imagemesh.server import ServiceMount

from .batch.servicer import BatchJobsServicer
from .batcher import BatcherConfig
from .blocking_servicer import BlockingInference
from .decode import ImageLimits
from .servicer import InferenceServicer

__all__ = ["SERVICE_NAME", "mount"]

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class _Servicer(BatchJobsServicer, InferenceServicer):
    """Every RPC: batch jobs (`batch.servicer`, first in the MRO so that its methods, not the
    generated UNIMPLEMENTED stubs, serve them) and the online ones (`servicer`)."""


def mount(ctx: MeshContext) -> ServiceMount:
    """The InferenceService for this process."""
    servicer: Any = _Servicer()
    resources: dict[str, Any] = {}

    async def start() -> None:
        # Imported here: serving search or storage alone must not import TensorFlow's users.
        from storage_service.backends import open_object_store

        from .model.registry import ModelRegistry
        from .remote import LazyChannel, SearchPredictions, StorageImages
        from .runtime import compile_model, configure_onednn, configure_threads, model_instances
        from .service import InferenceDomain
        from .serving import ModelManager

        settings = ctx.settings
        inference = settings.inference
        instances = model_instances(inference.model_instances)
        # The model's threads: a lone caller's batches stay on the thread that ran the last one.
        compute = HotThreadPool(instances, thread_name_prefix="imagemesh-model")
        decode = ThreadPoolExecutor(2, thread_name_prefix="imagemesh-decode")

        def prepare() -> None:
            # Both before TensorFlow starts (loading the first model starts it).
            configure_onednn(inference.onednn)
            configure_threads(inference.intra_op_threads, inference.inter_op_threads, instances)

        manager = ModelManager(
            ModelRegistry(open_object_store(settings.storage)),
            BatcherConfig(
                max_batch_size=inference.max_batch_size,
                max_queue_delay_s=inference.max_queue_delay_ms / 1000.0,
                queue_capacity=inference.queue_capacity,
                instances=instances,
            ),
            compute,
            compile_model,
            model=inference.model,
            prepare=prepare,
        )
        storage = LazyChannel(lambda: ctx.address_of("storage"), settings)
        search = LazyChannel(lambda: ctx.address_of("search"), settings)
        resources.update(
            manager=manager, compute=compute, decode=decode, channels=[storage, search]
        )
        servicer.bind(
            InferenceDomain(
                manager,
                StorageImages(storage),
                SearchPredictions(storage, search),
                ImageLimits(
                    max_image_bytes=inference.max_image_bytes,
                    max_image_pixels=inference.max_image_pixels,
                ),
                decode,
                PageTokenCodec(inference.page_token_secret),
            )
        )
        await manager.start(inference.model_version)
        from .batch.wiring import start_batch_jobs

        batch = await start_batch_jobs(
            settings,
            storage_address=ctx.address_of("storage"),
            search_address=ctx.address_of("search"),
            model_manager=manager,
        )
        resources["batch"] = batch
        servicer.bind_batch_jobs(batch.manager)

    async def stop() -> None:
        batch = resources.get("batch")
        if batch is not None:  # first: LOCAL jobs use the model manager's batcher
            await batch.stop()
        manager = resources.get("manager")
        if manager is not None:
            await manager.close()
        for channel in resources.get("channels", []):
            await channel.close()
        for name in ("compute", "decode"):
            executor = resources.get(name)
            if executor is not None:
                executor.shutdown(wait=True)

    return ServiceMount(
        name=SERVICE_NAME,
        register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            servicer, server
        ),
        start=start,
        stop=stop,
        blocking_handlers=lambda: BlockingInference(servicer).handlers(),
    )
