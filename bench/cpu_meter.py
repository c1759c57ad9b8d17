"""CPU seconds spent by each process of a benchmark (the store, the service, the client) per phase.

On a shared two-core machine a throughput ratio says little about why it is what it is: a
service can only be as fast as the CPU left to it. Measuring every process's CPU per unit of
work (per MB, per image) for the raw client and for the service turns a ratio into a bound:
at the CPU each unit costs through the service, even every core busy with nothing else gives
at most `cores / cpu_per_unit` units per second.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

__all__ = ["CpuMeter", "Phase", "process_listening_on"]


def process_listening_on(port: int) -> psutil.Process | None:
    """The process with a TCP socket listening on `port` (any address), if one is visible."""
    for connection in psutil.net_connections(kind="tcp"):
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
            and connection.pid is not None
        ):
            return psutil.Process(connection.pid)
    return None


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class Phase:
    """One measured phase: its wall time and each process's CPU seconds during it."""

    wall_s: float
    cpu_s: dict[str, float]

    @property
    def total_cpu_s(self) -> float:
        """CPU seconds of all the measured processes together."""
        return sum(self.cpu_s.values())

    def per_unit_ms(self, units: float) -> dict[str, float]:
        """Each process's CPU milliseconds per unit of work, and their total."""
        figures = {name: round(seconds / units * 1000, 4) for name, seconds in self.cpu_s.items()}
        figures["total"] = round(self.total_cpu_s / units * 1000, 4)
        return figures

    @property
    def cores_busy(self) -> float:
        """How many cores the measured processes kept busy on average."""
        return round(self.total_cpu_s / self.wall_s, 2) if self.wall_s > 0 else 0.0


class CpuMeter:
    """Named processes whose CPU is measured over `with meter.phase(name):` blocks."""

    def __init__(self, processes: dict[str, psutil.Process | None]) -> None:
        # A process that could not be found (e.g. a store on another host) is left out.
        self._processes = {name: p for name, p in processes.items() if p is not None}
        self.phases: dict[str, Phase] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measures the block as phase `name`."""
        before = {key: _cpu_seconds(p) for key, p in self._processes.items()}
        started = time.perf_counter()
        yield
        wall = time.perf_counter() - started
        spent = {key: _cpu_seconds(p) - before[key] for key, p in self._processes.items()}
        self.phases[name] = Phase(wall, spent)
