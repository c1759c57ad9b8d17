"""Spark plumbing shared by the inference service's batch jobs and the trainer.

`SparkApp` keeps one long-lived Spark application (and so its executors and Python workers)
warm across jobs; `imagemesh.spark.worker` holds what runs inside a Python worker: a per-worker
cache for expensive objects (a model, a store client) and TensorFlow's thread setup.
"""

from __future__ import annotations

from imagemesh.spark.app import SparkApp, SparkMasterUnavailable
from imagemesh.spark.worker import configure_tensorflow, task_cores, worker_cached

__all__ = [
    "SparkApp",
    "SparkMasterUnavailable",
    "configure_tensorflow",
    "task_cores",
    "worker_cached",
]
