"""InferenceService: single images from a local DenseNet121, and batch jobs on Spark."""

# TensorFlow bundles its own SQLite (without FTS5) and exports its symbols: if TensorFlow is
# imported first, Python's sqlite3 binds to that copy and the embedded search backend fails
# ("no such module: fts5") in the one-process mesh. Loading sqlite3 first keeps the system's.
import sqlite3  # noqa: F401
