"""The benches' CPU accounting: it must see CPU spent in the block, and find a listening server."""

from __future__ import annotations

import hashlib
import socket

import psutil

from bench.cpu_meter import CpuMeter, process_listening_on


def test_a_phase_counts_the_cpu_spent_in_its_block() -> None:
    meter = CpuMeter({"client": psutil.Process(), "absent": None})
    with meter.phase("idle"):
        pass
    with meter.phase("busy"):
        data = b"x" * (1 << 20)
        for _ in range(200):  # ~0.1-0.3 s of hashing
            hashlib.sha256(data).digest()
    busy = meter.phases["busy"]
    assert set(busy.cpu_s) == {"client"}  # a process not found is left out
    assert busy.cpu_s["client"] > 0.05
    assert busy.cpu_s["client"] > meter.phases["idle"].cpu_s["client"]
    per_unit = busy.per_unit_ms(200)
    assert per_unit["total"] == per_unit["client"] > 0
    assert 0 < busy.cores_busy <= psutil.cpu_count()


def test_finds_the_process_listening_on_a_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = process_listening_on(port)
        assert found is not None
        assert found.pid == psutil.Process().pid
    assert process_listening_on(port) is None
