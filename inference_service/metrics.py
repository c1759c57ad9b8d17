"""Prometheus metrics of the inference service (the shared server exposes them on /metrics).

Registered once, in prometheus_client's default registry, when this module is imported.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_SIZE",
    "COMPUTE_SECONDS",
    "DROPPED",
    "MODEL_SWITCHES",
    "QUEUE_DELAY_SECONDS",
    "QUEUE_DEPTH",
    "REJECTED",
]

BATCH_SIZE = Histogram(
    "imagemesh_inference_batch_size",
    "Images computed together in one batch (before padding).",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512),
)
QUEUE_DELAY_SECONDS = Histogram(
    "imagemesh_inference_queue_delay_seconds",
    "Time an image waited in the batching queue before its batch started computing.",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
COMPUTE_SECONDS = Histogram(
    "imagemesh_inference_compute_seconds",
    "Time the model took to compute one batch.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
QUEUE_DEPTH = Gauge("imagemesh_inference_queue_depth", "Images waiting in the batching queue.")
DROPPED = Counter(
    "imagemesh_inference_dropped_total",
    "Images dropped before compute, by reason (deadline passed, caller cancelled).",
    ["reason"],
)
REJECTED = Counter(
    "imagemesh_inference_rejected_total",
    "Images refused with RESOURCE_EXHAUSTED because the batching queue was full.",
)
MODEL_SWITCHES = Counter(
    "imagemesh_inference_model_switches_total", "Times the serving model version changed."
)
