"""Recording predictions in the search index through SearchService's IndexPredictions.

`GrpcPredictionIndexer` is the adapter: domain values in, `IndexPredictionsRequest` out over a
synchronous channel (Spark workers are threads and processes, not an event loop), per-item
errors back as `ItemFailure`s. UNAVAILABLE is retried with backoff before it is raised: a
search node restarting must not fail the task, but one that stays down must (Spark then
retries the task, and the job fails if it keeps failing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from imagemesh.channels import open_sync_channel
from imagemesh.common.v1 import common_pb2
from imagemesh.config import Settings
from imagemesh.errors import Unavailable
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.spark.worker import worker_cached

from .jobs import ItemFailure
from .predictor import top_classes

__all__ = ["GrpcPredictionIndexer", "PredictionIndexer", "PredictionToIndex", "cached_indexer"]

_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class PredictionToIndex:
    """One image's prediction: its name, probabilities and stored array."""

    image: str
    probabilities: np.ndarray
    probabilities_array: str


class PredictionIndexer(Protocol):
    """Records predictions; returns the ones that could not be recorded, with why."""

    def index(
        self,
        model_version: str,
        class_names: Sequence[str],
        top_k: int,
        predictions: Sequence[PredictionToIndex],
        *,
        wait_visible: bool = False,
    ) -> list[ItemFailure]:
        """Indexes `predictions` (idempotently: one per image and model version)."""
        ...


class GrpcPredictionIndexer:
    """`PredictionIndexer` over SearchService's gRPC IndexPredictions."""

    def __init__(
        self, address: str, settings: Settings | None = None, timeout_s: float = 60.0
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        # The deployment's TLS and token, as every service-to-service channel.
        self._channel = open_sync_channel(address, settings or Settings())
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)

    def index(
        self,
        model_version: str,
        class_names: Sequence[str],
        top_k: int,
        predictions: Sequence[PredictionToIndex],
        *,
        wait_visible: bool = False,
    ) -> list[ItemFailure]:
        """See `PredictionIndexer.index`."""
        if not predictions:
            return []
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        items = []
        for p in predictions:
            scores = [
                common_pb2.ClassScore(class_name=name, class_index=index, probability=prob)
                for index, name, prob in top_classes(p.probabilities, class_names, top_k)
            ]
            items.append(
                search_pb2.ImagePrediction(
                    image=p.image,
                    prediction=common_pb2.Prediction(
                        model_version=model_version,
                        top_class=scores[0].class_name,
                        confidence=scores[0].probability,
                        top_classes=scores,
                        predict_time=now,
                        probabilities_array=p.probabilities_array,
                    ),
                )
            )
        request = search_pb2.IndexPredictionsRequest(
            predictions=items,
            refresh=search_pb2.REFRESH_POLICY_WAIT_FOR
            if wait_visible
            else search_pb2.REFRESH_POLICY_UNSPECIFIED,
        )
        for attempt, delay in enumerate((*_RETRY_DELAYS_S, None)):
            try:
                response = self._stub.IndexPredictions(request, timeout=self._timeout_s)
                break
            except grpc.RpcError as exc:
                code = exc.code()
                retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retryable or delay is None:
                    raise Unavailable(
                        f"SearchService at {self.address} refused IndexPredictions after "
                        f"{attempt + 1} attempt(s): {code.name}: {exc.details()}"
                    ) from None
                time.sleep(delay)
        return [
            ItemFailure(
                image=e.name,
                code=e.error.code or "UNKNOWN",
                reason=e.error.reason or "INDEX_FAILED",
                message=f"the prediction was stored but not indexed: {e.error.message}",
            )
            for e in response.errors
        ]

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()


def cached_indexer(address: str, settings: Settings | None = None) -> GrpcPredictionIndexer:
    """This process's indexer for `address` (one channel per worker, reused across tasks)."""
    key = ("prediction-indexer", address, settings.model_dump_json() if settings else "")
    return worker_cached(key, lambda: GrpcPredictionIndexer(address, settings))
