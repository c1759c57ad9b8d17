"""imagemesh: a gRPC service mesh that stores, searches and classifies images.

The `imagemesh` package holds what the three services share: the generated contracts
(`imagemesh.{common,storage,search,inference}.v1`), configuration, the server bootstrap,
error mapping and the command line. Each service lives in its own top-level package
(`storage_service`, `search_service`, `inference_service`).
"""

# TensorFlow bundles its own SQLite (without FTS5) and exports its symbols: if TensorFlow is
# imported first, Python's sqlite3 binds to that copy and the embedded search backend fails
# ("no such module: fts5"). Every entry point (services, CLI, trainer, Spark workers) imports
# this package first, so loading sqlite3 here keeps the system's copy everywhere.
import sqlite3  # noqa: F401

__version__ = "0.1.0"
