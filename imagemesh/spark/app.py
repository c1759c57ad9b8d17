"""One long-lived Spark application per process, kept warm across jobs.

Starting a SparkSession with its executors costs 10-12 s here, each Python worker's
TensorFlow import 2-3 s and each model build 1-2 s. `SparkApp` starts the application once
(lazily, or ahead of time with `warm`) and hands the same context to every job, with Python
workers reused across tasks (`spark.python.worker.reuse`), so only the first job pays.

Contract:
- `context()` returns a live `SparkContext`, starting (or restarting, after the application
  died) the application first. Thread-safe; jobs from several threads share it, each under
  its own job group.
- `check_master()` raises `SparkMasterUnavailable` at once, with an actionable message, when a
  `spark://` master does not answer, instead of letting Spark retry registration for a minute.
- The driver gives its workers the Python named by the `PYSPARK_PYTHON` environment variable
  (the only place pyspark 4.3 reads it from): the configured one, else this interpreter.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

from imagemesh.config import SparkSettings
from imagemesh.errors import Unavailable

__all__ = ["SparkApp", "SparkMasterUnavailable"]

_log = logging.getLogger(__name__)


class SparkMasterUnavailable(Unavailable):
    """The configured Spark master cannot be reached."""

    default_reason = "SPARK_MASTER_UNAVAILABLE"


def _master_addresses(master: str) -> list[tuple[str, int]]:
    """(host, port) of each master in `spark://h1:p1,h2:p2`; empty for local modes."""
    if not master.startswith("spark://"):
        return []
    addresses = []
    for part in master.removeprefix("spark://").split(","):
        split = urlsplit(f"//{part}")
        addresses.append((split.hostname or "127.0.0.1", split.port or 7077))
    return addresses


class SparkApp:
    """The process's Spark application, started on first use and reused by every job."""

    def __init__(self, settings: SparkSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._session: Any = None

    @property
    def master(self) -> str:
        """The configured master URL, e.g. `local[*]` or `spark://127.0.0.1:7077`."""
        return self.settings.master

    @property
    def is_local(self) -> bool:
        """Whether the application runs embedded in this process (`local[...]`)."""
        return self.settings.master.startswith("local")

    def check_master(self) -> None:
        """Raises `SparkMasterUnavailable` unless some configured master accepts a connection."""
        addresses = _master_addresses(self.settings.master)
        if not addresses:
            return
        problems = []
        for host, port in addresses:
            try:
                with socket.create_connection(
                    (host, port), timeout=self.settings.connect_timeout_s
                ):
                    return
            except OSError as exc:
                problems.append(f"{host}:{port} ({exc.strerror or exc})")
        raise SparkMasterUnavailable(
            f"the Spark master {self.settings.master} cannot be reached: "
            f"{'; '.join(problems)}. Start it (`make engines-up` here) or point "
            "IMAGEMESH_SPARK__MASTER at a running one; nothing was written",
            retry_after_s=5.0,
        )

    def context(self) -> Any:
        """A live `SparkContext`, starting the application if it is not running."""
        with self._lock:
            if self._session is not None and not self._stopped(self._session):
                return self._session.sparkContext
            self._session = None
            self.check_master()
            self._session = self._start()
            return self._session.sparkContext

    def session(self) -> Any:
        """The live `SparkSession` (for DataFrame work), started if needed."""
        self.context()
        return self._session

    @property
    def running(self) -> bool:
        """Whether the application is started and alive (a job would not pay the start)."""
        session = self._session
        return session is not None and not self._stopped(session)

    def executor_count(self) -> int:
        """Executors registered with the running application (0 when not running)."""
        if not self.running:
            return 0
        try:
            status = self._session.sparkContext._jsc.sc().getExecutorMemoryStatus()
            # The map lists the driver too, except in local mode where the driver is the executor.
            return max(1, int(status.size())) if self.is_local else int(status.size()) - 1
        except Exception:  # the JVM is going away
            return 0

    def warm(self) -> None:
        """Starts the application and its executors' Python workers ahead of the first job."""
        context = self.context()
        slots = max(1, int(context.defaultParallelism))
        context.parallelize(range(slots), slots).map(lambda x: x).count()

    def stop(self) -> None:
        """Stops the application (executors and Python workers go with it)."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            try:
                session.stop()
            except Exception:  # a context whose JVM died cannot be stopped cleanly
                _log.warning("stopping the Spark application failed", exc_info=True)

    @staticmethod
    def _stopped(session: Any) -> bool:
        try:
            return bool(session.sparkContext._jsc.sc().isStopped())
        except Exception:  # the JVM gateway is gone
            return True

    def _start(self) -> Any:
        s = self.settings
        # Read by pyspark when it launches the JVM and the Python workers; the environment is
        # the only channel (a conf key would be ignored for the workers' Python).
        os.environ["PYSPARK_PYTHON"] = s.python or sys.executable
        os.environ.setdefault("SPARK_LOCAL_IP", s.driver_host)
        from pyspark.sql import SparkSession

        builder = (
            SparkSession.builder.master(s.master)
            .appName(s.app_name)
            .config("spark.driver.host", s.driver_host)
            .config("spark.driver.bindAddress", s.driver_host)
            .config("spark.executor.memory", s.executor_memory)
            # Local mode runs the executor inside the driver's JVM.
            .config("spark.driver.memory", s.executor_memory if self.is_local else "1g")
            .config("spark.python.worker.reuse", "true")
            .config("spark.task.cpus", "1")
            .config("spark.ui.enabled", "true" if s.ui_enabled else "false")
            .config("spark.ui.showConsoleProgress", "false")
            # Concurrent batch jobs share the executors instead of queueing behind each other.
            .config("spark.scheduler.mode", "FAIR")
            # A retried or speculative task rewrites the same keys; speculation would only
            # double the work on a small cluster.
            .config("spark.speculation", "false")
            # Our tasks read from the object store, so locality buys nothing; Spark's default
            # 3 s wait for a "local" executor can leave one of two executors idle while a
            # cached partition waits for the busy one.
            .config("spark.locality.wait", "0s")
        )
        if s.cores_max:
            builder = builder.config("spark.cores.max", str(s.cores_max))
        _log.info("starting Spark application %r on %s", s.app_name, s.master)
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("WARN")
        return session
