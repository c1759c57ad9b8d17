"""Inference fixtures (shared with tests/integration/inference)."""

from tests.inference_service.fixtures import started, tiny_models

__all__ = ["started", "tiny_models"]
