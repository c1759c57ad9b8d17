"""Fixtures of the batch integration tests (the model and search double of the unit tests)."""

from tests.inference_service.batch.conftest import model_root, search_double

__all__ = ["model_root", "search_double"]
