"""Fixtures of the batch-job tests: a published tiny model, a store holding it, the real search."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagemesh.config import StorageSettings
from storage_service.backends.local import LocalObjectStore
from tests.fixtures.served_search import ThreadedSearch
from tests.inference_service.batch.helpers import copy_tree, publish_tiny_model


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local object folder holding the tiny model, published once per session."""
    root = tmp_path_factory.mktemp("batch-model")
    publish_tiny_model(root)
    return root


@pytest.fixture
def storage_settings(tmp_path: Path, model_root: Path) -> StorageSettings:
    """A fresh local-folder object store holding the tiny model."""
    root = tmp_path / "objects"
    root.mkdir()
    copy_tree(model_root, root)
    return StorageSettings(local_root=root)


@pytest.fixture
def store(storage_settings: StorageSettings) -> LocalObjectStore:
    """The object store of `storage_settings`."""
    return LocalObjectStore(storage_settings.local_root, fsync=False)


@pytest.fixture
def search(tmp_path: Path) -> Iterator[ThreadedSearch]:
    """The real SearchService on SQLite, on a loopback port of its own, empty."""
    served = ThreadedSearch(tmp_path / "search")
    served.start()
    yield served
    served.close()
