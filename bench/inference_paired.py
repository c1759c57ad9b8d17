"""Paired batch-1 latency of InferenceService variants, measured side by side in one run.

    .venv/bin/python -m bench.inference_paired [--quick] [--variant NAME:KEY=VALUE,...]...
        [--floor] [--load NAME]

On this shared two-core machine, the same batch-1 p50 moves by ~0.4 ms from one run of
`bench.inference` to the next, more than the changes worth measuring. Here every variant runs
at once, each in its own `imagemesh serve inference` process (its settings given as
environment variables: `IMAGEMESH_*` settings, or TensorFlow's and the C library's own), and
one client calls them in turns of 10, in alternating order, so that all of them see the same
moments of the machine. `--floor` adds the bare grpc.aio server of `bench.inference` (no
interceptor, no batching, an already decoded image).
Reported per variant: p50 and p99, the p50 difference with the first variant, and the CPU each
server process spent per call.

`--load NAME` asks whether a burst of concurrent calls leaves that variant slower for lone
calls afterwards: every variant is measured, NAME serves 32 unary clients for a few seconds,
and every variant is measured again. The effect is NAME's change minus the others' (which
takes out the machine's drift and each process's own speed).

With no `--variant`, the service on its defaults is compared with itself (`a` and `b`): the
difference between the two is the noise floor of one run. The last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from imagemesh.ports import free_loopback_port

if TYPE_CHECKING:
    from bench.inference import InProcessWorker

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_TURN = 10  # calls to one server before the client moves to the next
_FLOOR = "floor"


@dataclass
class _Server:
    name: str
    address: str
    proc: subprocess.Popen[Any]
    worker: InProcessWorker | None = None

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.close()
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME:KEY=VALUE,KEY=VALUE` -> (NAME, {KEY: VALUE}); keys are environment variables."""
    name, _, settings = text.partition(":")
    env: dict[str, str] = {}
    for pair in filter(None, settings.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE,...")
        env[key] = value
    if not name or name == _FLOOR:
        raise SystemExit(f"--variant {text!r}: a variant needs a name other than {_FLOOR!r}")
    return name, env


def _measure(servers: list[_Server], content: bytes, turns: int) -> dict[str, list[float]]:
    """Batch-1 latencies (ms) per server, in alternating turns of `_TURN` calls."""
    import grpc

    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    request = inference_pb2.ClassifyRequest(content=content)
    channels = [grpc.insecure_channel(server.address) for server in servers]
    try:
        stubs = [inference_pb2_grpc.InferenceServiceStub(channel) for channel in channels]
        for stub in stubs:
            for _ in range(5):
                stub.Classify(request)
        found: dict[str, list[float]] = {server.name: [] for server in servers}
        pairs = list(zip(servers, stubs, strict=True))
        for turn in range(turns):
            for server, stub in pairs if turn % 2 == 0 else reversed(pairs):
                for _ in range(_TURN):
                    started = time.perf_counter()
                    stub.Classify(request)
                    found[server.name].append((time.perf_counter() - started) * 1000)
        return found
    finally:
        for channel in channels:
            channel.close()


def _measure_with_cpu(
    servers: list[_Server], content: bytes, turns: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`_measure`, and the CPU seconds each server process spent meanwhile."""
    from bench.cpu_meter import CpuMeter  # after `main` made `bench` importable

    meter = CpuMeter({server.name: psutil.Process(server.proc.pid) for server in servers})
    with meter.phase("calls"):
        found = _measure(servers, content, turns)
    return found, meter.phases["calls"].cpu_s


def _report(servers: list[_Server], found: dict[str, list[float]], cpu: dict[str, float]) -> Any:
    first = statistics.median(found[servers[0].name])
    figures = {}
    for server in servers:
        samples = found[server.name]
        p50 = float(np.percentile(samples, 50))
        figures[server.name] = {
            "p50_ms": round(p50, 3),
            "p99_ms": round(float(np.percentile(samples, 99)), 3),
            "p50_vs_first_ms": round(p50 - first, 3),
            "cpu_ms_per_call": round(cpu[server.name] / len(samples) * 1000, 3),
        }
        print(
            f"{server.name:12s} p50 {p50:7.3f} ms ({p50 - first:+.3f} vs {servers[0].name}), "
            f"p99 {figures[server.name]['p99_ms']:7.3f}, "
            f"CPU {figures[server.name]['cpu_ms_per_call']:.3f} ms per call",
            file=sys.stderr,
        )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, within a minute")
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,...")
    parser.add_argument("--floor", action="store_true", help="add the bare gRPC server")
    parser.add_argument("--load", help="measure, load this variant, measure again")
    args = parser.parse_args()
    if not __package__:  # run as a script (`make bench`): the repository holds `bench`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.inference import (
        InProcessWorker,
        _concurrent,
        _wait_serving,
        publish_bench_model,
    )

    variants = [_parse_variant(text) for text in args.variant] or [("a", {}), ("b", {})]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit("variant names must differ")
    if args.load is not None and args.load not in names:
        raise SystemExit(f"--load {args.load!r} is not one of the variants {names}")
    if args.load is not None and len(names) + args.floor < 2:
        # The effect is the loaded server's change minus the others': it needs another one.
        raise SystemExit("--load needs another variant or --floor to compare with")
    turns = 8 if args.quick else 100

    from imagemesh.config import load_settings
    from inference_service.runtime import default_threads, model_instances
    from storage_service.backends import open_object_store
    from trainer.datasets import generate_images, to_png

    contents = [to_png(image.pixels) for image in generate_images(64, seed=7)]
    servers: list[_Server] = []
    with tempfile.TemporaryDirectory(prefix="imagemesh-bench-") as data:
        root = Path(data) / "objects"
        store = open_object_store(load_settings(storage={"local_root": root}).storage)
        metadata = publish_bench_model(store)
        try:
            for name, settings in variants:
                port = free_loopback_port()
                env = {
                    **os.environ,
                    "IMAGEMESH_STORAGE__LOCAL_ROOT": str(root),
                    "IMAGEMESH_SERVER__ACCESS_LOG": "false",
                    "IMAGEMESH_SERVER__LOG_LEVEL": "WARNING",
                    **settings,
                }
                command = [sys.executable, "-m", "imagemesh", "serve", "inference"]
                proc = subprocess.Popen(
                    [*command, "--port", str(port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                servers.append(_Server(name, f"127.0.0.1:{port}", proc))
            if args.floor:
                image = Path(data) / "image.png"
                image.write_bytes(contents[0])
                intra, inter = default_threads(model_instances(0))
                port = free_loopback_port()
                worker = InProcessWorker(
                    "--grpc-floor-worker",
                    root=str(root),
                    model=metadata.name,
                    image=str(image),
                    onednn=load_settings().inference.onednn,
                    intra=intra,
                    inter=inter,
                    port=port,
                )
                worker.wait_ready()
                servers.append(_Server(_FLOOR, f"127.0.0.1:{port}", worker.proc, worker=worker))
            for server in servers:
                if server.worker is None:
                    _wait_serving(server.address, server.proc)
            found, cpu = _measure_with_cpu(servers, contents[0], turns)
            result: dict[str, Any] = {
                "bench": "inference_paired",
                "quick": args.quick,
                "turns": turns,
                "calls_per_turn": _TURN,
                "variants": _report(servers, found, cpu),
            }
            if args.load is not None:
                loaded = next(server for server in servers if server.name == args.load)
                seconds = 1.0 if args.quick else 3.0
                print(f"loading {loaded.name}: 32 unary clients, {seconds} s", file=sys.stderr)
                asyncio.run(_concurrent(loaded.address, contents, seconds, stream=False))
                again, cpu = _measure_with_cpu(servers, contents[0], turns)
                after = _report(servers, again, cpu)
                others = [s.name for s in servers if s.name != loaded.name]

                def change(name: str) -> float:
                    return float(statistics.median(again[name]) - statistics.median(found[name]))

                effect = change(loaded.name) - statistics.mean(change(n) for n in others)
                print(f"effect of the load on {loaded.name}: {effect:+.3f} ms", file=sys.stderr)
                result.update(after_load=after, load_effect_p50_ms=round(effect, 3))
        finally:
            for server in servers:
                server.stop()
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
