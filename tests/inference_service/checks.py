"""Correctness checks shared by the local-folder and the MinIO test suites.

Each takes a channel to a running InferenceService and the in-process references of the
published versions, and asserts one behaviour of the issue's "Correctness" list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import grpc
import numpy as np

from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from inference_service.decode import ImageLimits, decode_image
from tests.inference_service.fixtures import INPUT_SIZE, png

Reference = Callable[[np.ndarray], np.ndarray]


def pixels_of(content: bytes) -> np.ndarray:
    """The service's preprocessing of `content`, run in process."""
    return decode_image(content, INPUT_SIZE, ImageLimits())


async def check_matches_in_process(
    channel: grpc.aio.Channel, references: Mapping[str, Reference], seeds: range
) -> None:
    """The service's probabilities equal the in-process call's on the same input (1e-5)."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    for seed in seeds:
        content = png(seed)
        reply = await stub.Classify(
            inference_pb2.ClassifyRequest(content=content, include_probabilities=True, top_k=3)
        )
        expected = references[reply.model_version](pixels_of(content))
        np.testing.assert_allclose(np.array(reply.probabilities), expected, rtol=0, atol=1e-5)
        ranked = [c.class_index for c in reply.top_classes]
        assert ranked == list(np.argsort(-expected, kind="stable")), "top classes misordered"
        assert reply.top_classes[0].probability == max(reply.probabilities)


async def check_concurrent_calls_get_their_own_answer(
    channel: grpc.aio.Channel, references: Mapping[str, Reference], count: int = 64
) -> list[inference_pb2.ClassifyResponse]:
    """`count` concurrent calls with different images each get their own image's answer."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    contents = [png(1000 + i) for i in range(count)]
    replies = await asyncio.gather(
        *(
            stub.Classify(inference_pb2.ClassifyRequest(content=c, include_probabilities=True))
            for c in contents
        )
    )
    for content, reply in zip(contents, replies, strict=True):
        expected = references[reply.model_version](pixels_of(content))
        np.testing.assert_allclose(np.array(reply.probabilities), expected, rtol=0, atol=1e-5)
    # They were computed together, not one by one.
    assert max(r.batch_size for r in replies) > 1
    return list(replies)


async def check_switch_under_load(
    channel: grpc.aio.Channel,
    references: Mapping[str, Reference],
    switch_to: list[str],
    *,
    workers: int = 16,
) -> dict[str, int]:
    """Versions switch while `workers` clients classify: no call fails, each answer is
    wholly from the version it names. Returns how many answers each version gave."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    stop = asyncio.Event()
    answers: dict[str, int] = {}
    failures: list[BaseException] = []
    contents = [png(2000 + i) for i in range(workers)]
    expected = {
        (name, i): ref(pixels_of(c))
        for name, ref in references.items()
        for i, c in enumerate(contents)
    }

    async def worker(i: int) -> None:
        while not stop.is_set():
            try:
                reply = await stub.Classify(
                    inference_pb2.ClassifyRequest(content=contents[i], include_probabilities=True)
                )
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
                continue
            np.testing.assert_allclose(
                np.array(reply.probabilities), expected[(reply.model_version, i)], atol=1e-5
            )
            answers[reply.model_version] = answers.get(reply.model_version, 0) + 1

    tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
    try:
        for name in switch_to:
            await asyncio.sleep(0.3)
            reply = await stub.SelectModelVersion(
                inference_pb2.SelectModelVersionRequest(name=name)
            )
            assert reply.model_version.name == name
            assert reply.model_version.serving
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert failures == [], f"{len(failures)} calls failed during the switch: {failures[:3]}"
    return answers
