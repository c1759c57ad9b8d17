"""Client tests reuse the inference fixtures: servers with a chosen set of services, tiny models."""

from tests.inference_service.fixtures import started, tiny_models

__all__ = ["started", "tiny_models"]
