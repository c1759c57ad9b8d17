"""Benchmark of the InferenceService against the model's own in-process calls, in one run.

    .venv/bin/python -m bench.inference [--quick]

Publishes an untrained 32x32 DenseNet121 (5 classes) to a temporary local-folder store, starts
`imagemesh serve inference` in a subprocess on it, and measures, in the same run:

- batch-1 latency p50/p99 of Classify (one client, sequential) against the model's own
  in-process `tf.function` call on the same preprocessed image: `p50_overhead_ms`,
  `p99_overhead_ms` (goal: p50 overhead <= 2 ms). The client there is ghz, the Go load
  generator (`deploy/local/tools.sh`), as a service's latency is measured with a native load
  generator (TF Serving's and Triton's figures come from C++ clients), so that the overhead is
  the service's and not its client's. What a Python caller sees, grpcio's own client adding
  its part, is measured in the same run: `p50_overhead_python_client_ms`,
  `p99_overhead_python_client_ms` (0.02-0.2 ms more at the p50 in four runs here);
- throughput under 32 concurrent clients, unary Classify and ClassifyStream, against the raw
  in-process throughput at the batcher's max batch size, one model call at a time on all the
  cores (the issue's baseline): `ratio_concurrent_unary`, `ratio_concurrent_stream` (goal
  >= 0.8); and against as many concurrent in-process calls at that batch size as the service
  has model instances, on the service's threads (a baseline that already has what instances
  add): `ratio_concurrent_unary_vs_instances`, `ratio_concurrent_stream_vs_instances`;
- the service's RSS after 100,000 classifications against after 1,000: `rss_growth_pct`
  (goal < 5 %; `--quick` compares 1,000 with 4,000 and says so in `rss_calls`).

For scale, the same latency is measured through two bare gRPC servers (`--grpc-floor-worker`),
with no interceptor, no decoding and no batching, each call running the same compiled model on
an already decoded image:
- grpc.aio, the model on a thread (the service's transport): `grpc_floor_p50_overhead_ms`, what
  this machine charges a Python gRPC server for a request, a thread hop and an answer, and for
  the idle time between calls (the model's memory leaves the CPU caches meanwhile);
- the synchronous grpc server, the model run on the handler's own thread (no hop at all, the
  cheapest path Python's grpc offers): `grpc_sync_floor_p50_overhead_ms`.
The same two servers answer a request with no image at once, without the model: the p50 of that
round trip is what the transport alone costs a call (`grpc_noop_round_trip_p50_ms`,
`grpc_sync_noop_round_trip_p50_ms`). And the model's own call is timed again after the thread
slept `_IDLE_GAP_MS` (what a lone caller's model sees between calls: the round trip and the
decoding), in turns with back-to-back calls: `in_process_idle_penalty_p50_ms` is how much slower
the model is then, a part of every served call's overhead that no server can avoid.
These figures for scale take two more TensorFlow processes: `--quick` leaves them out (null).
Two in-process workers making the same batch-1 call are also timed against each other:
`in_process_spread_p50_ms` is how far apart two processes doing the same thing are (each
overhead above compares two processes, so it carries that spread).

The in-process calls run in helper processes (`--in-process-worker`), one per TensorFlow
thread configuration, since a process sizes its thread pools once; the latency baseline uses
the service's own configuration (threads, and the oneDNN switch). The Python clients run in
this process and ghz in its own, on the same two cores as the server: their CPU is part of what
the ratios pay. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from imagemesh.ports import free_loopback_port

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLIENTS = 32
STREAM_WINDOW = 4  # requests each stream client keeps in flight
_TURN = 10  # batch-1 calls in a row on each side when measuring latency
# Calls in a row for ghz (each turn is a ghz process: its start and connection stay out of
# the figures, with the first `_GHZ_SKIP` calls).
_GHZ_TURN = 50
_GHZ_SKIP = 3
_REPO = Path(__file__).resolve().parents[1]
# How long the model's thread sleeps before each call timed for `in_process_idle_penalty_p50_ms`:
# about what a lone caller's call leaves it idle here (a round trip and a decode, 1-2 ms).
_IDLE_GAP_MS = 1.5
_SCALE_KEYS = (
    "grpc_floor_p50_overhead_ms",
    "grpc_sync_floor_p50_overhead_ms",
    "grpc_noop_round_trip_p50_ms",
    "grpc_sync_noop_round_trip_p50_ms",
    "in_process_idle_penalty_p50_ms",
    "in_process_spread_p50_ms",
)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def _wait_serving(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the service exited early with code {proc.returncode}")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(
                        service="imagemesh.inference.v1.InferenceService"
                    ),
                    timeout=1,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit("the service did not report SERVING in time")


def _prepare_in_process(
    model_name: str, store: Any, content: bytes, batch: int
) -> tuple[Any, np.ndarray, np.ndarray]:
    """The model loaded from the store as the service loads it, compiled and warmed up."""
    from inference_service.decode import ImageLimits, decode_image
    from inference_service.model.registry import ModelRegistry
    from inference_service.runtime import compile_model

    metadata, keras_model = ModelRegistry(store).load(model_name)
    run = compile_model(keras_model)
    pixels = decode_image(content, (metadata.input_height, metadata.input_width), ImageLimits())
    one = pixels[None]
    many = np.repeat(one, batch, axis=0)
    for _ in range(5):
        run(one)
        run(many)
    return run, one, many


def publish_bench_model(store: Any) -> Any:
    """Publishes the model every inference bench measures (an untrained 32x32 DenseNet121 with
    5 classes) to `store`; returns its metadata."""
    from inference_service.model.densenet import build_untrained_classifier
    from inference_service.model.registry import ModelRegistry

    print("publishing an untrained 32x32 DenseNet121 (5 classes)", file=sys.stderr)
    return ModelRegistry(store).publish(
        "default",
        build_untrained_classifier(5, (32, 32), seed=0),
        class_names=["circle", "square", "triangle", "cross", "ring"],
        backbone_weights="none",
    )


def _in_process_latency(run: Any, one: np.ndarray, calls: int, idle_ms: float = 0.0) -> list[float]:
    """Batch-1 latencies (ms) of the model's own compiled call, each after the thread slept
    `idle_ms` (none: back to back)."""
    latencies = []
    for _ in range(calls):
        if idle_ms:
            time.sleep(idle_ms / 1000)
        t0 = time.perf_counter()
        run(one)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _in_process_rate(run: Any, many: np.ndarray, seconds: float, calls_at_once: int = 1) -> float:
    """Images per second of the model's own compiled call at the batch size of `many`, with
    `calls_at_once` threads each calling it in a loop."""
    counts = [0] * calls_at_once
    stop = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < stop:
            run(many)
            counts[index] += many.shape[0]

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(calls_at_once)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - t0)


def _load_in_worker(spec: dict[str, Any], batch: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """In a helper process: TensorFlow sized to the spec's threads (before its runtime
    starts), then `_prepare_in_process` on the spec's store, model and image."""
    from inference_service.runtime import configure_onednn, configure_threads

    configure_onednn(spec["onednn"])
    configure_threads(spec["intra"], spec["inter"])
    from imagemesh.config import load_settings
    from storage_service.backends import open_object_store

    settings = load_settings(storage={"local_root": spec["root"]})
    content = Path(spec["image"]).read_bytes()
    return _prepare_in_process(spec["model"], open_object_store(settings.storage), content, batch)


def _worker_main(spec: dict[str, Any]) -> int:
    """`--in-process-worker`: the model in this process on the given TensorFlow threads,
    measured on command (one line each, answered with one JSON line): `latency N`,
    `idle_latency N` (each call after `_IDLE_GAP_MS` asleep), `rate S`."""
    run, one, many = _load_in_worker(spec, spec["batch"])
    if spec["calls_at_once"] > 1:  # concurrent calls warmed up too
        _in_process_rate(run, many, 0.5, spec["calls_at_once"])
    print("ready", flush=True)
    for line in sys.stdin:
        command, argument = line.split()
        if command == "latency":
            answer: Any = _in_process_latency(run, one, int(argument))
        elif command == "idle_latency":
            answer = _in_process_latency(run, one, int(argument), _IDLE_GAP_MS)
        elif command == "rate":
            answer = _in_process_rate(run, many, float(argument), spec["calls_at_once"])
        else:
            raise SystemExit(f"unknown command {command!r}")
        print(json.dumps(answer), flush=True)
    return 0


def _floor_main(spec: dict[str, Any]) -> int:
    """`--grpc-floor-worker`: two bare InferenceServices whose Classify runs the model on one
    already decoded image, serving until stdin closes: grpc.aio on `spec["port"]`, the model on
    a thread (the service's transport), and, if `spec["sync_port"]` is given, grpc's
    synchronous server there, the model on the handler's own thread. A request with no image
    is answered at once, without the model (the transport's own round trip). One process
    serves both: a process each would add another TensorFlow start to the run."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    run, one, _ = _load_in_worker(spec, 1)
    pool = ThreadPoolExecutor(spec["inter"])

    def reply_for(output: np.ndarray) -> Any:
        best = int(np.argmax(output[0]))
        reply = inference_pb2.ClassifyResponse(model_version=spec["model"])
        reply.top_classes.add(class_index=best, probability=float(output[0][best]))
        return reply

    no_model = np.ones((1, 1), dtype=np.float32)

    class Inline(inference_pb2_grpc.InferenceServiceServicer):
        def Classify(self, request: Any, context: Any) -> Any:
            if not request.content:
                return reply_for(no_model)
            return reply_for(run(one))

    class Bare(inference_pb2_grpc.InferenceServiceServicer):
        async def Classify(self, request: Any, context: Any) -> Any:
            if not request.content:
                return reply_for(no_model)
            return reply_for(await asyncio.get_running_loop().run_in_executor(pool, run, one))

    sync_server = None
    if spec.get("sync_port"):
        sync_server = grpc.server(ThreadPoolExecutor(spec["inter"]))
        # Classify only: the other methods stay the generated base's UNIMPLEMENTED.
        inline = Inline()  # type: ignore[abstract]
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inline, sync_server)
        sync_server.add_insecure_port(f"127.0.0.1:{spec['sync_port']}")
        sync_server.start()

    async def serve() -> None:
        server = grpc.aio.server()
        bare = Bare()  # type: ignore[abstract]
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(bare, server)
        server.add_insecure_port(f"127.0.0.1:{spec['port']}")
        await server.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
        await server.stop(None)

    asyncio.run(serve())
    if sync_server is not None:
        sync_server.stop(None)
    pool.shutdown()
    return 0


class InProcessWorker:
    """A `--in-process-worker` (or `--grpc-floor-worker`) process, asked for measurements one
    at a time."""

    def __init__(self, role: str = "--in-process-worker", **spec: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.inference", role, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def wait_ready(self) -> None:
        """Returns once the model is loaded and warmed up (workers start side by side)."""
        self._expect("ready")

    def _expect(self, what: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == what:
                return
        raise SystemExit(f"an in-process worker exited with {self.proc.wait()}")

    def _ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"an in-process worker exited with {self.proc.wait()}")
        return json.loads(line)

    def latency(self, calls: int) -> list[float]:
        return list(self._ask(f"latency {calls}"))

    def idle_latency(self, calls: int) -> list[float]:
        return list(self._ask(f"idle_latency {calls}"))

    def rate(self, seconds: float) -> float:
        return float(self._ask(f"rate {seconds}"))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _batch_size_totals(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the service's batch-size histogram, from its Prometheus endpoint."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("imagemesh_inference_batch_size_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values["imagemesh_inference_batch_size_sum"], values[
        "imagemesh_inference_batch_size_count"
    ]


def _latencies(
    address: str, content: bytes, calls: int, in_process: InProcessWorker
) -> tuple[list[float], list[float]]:
    """Batch-1 latencies (ms): (in process, through Classify), in turns of `_TURN` calls of
    each, so that both see the same moments of the shared machine. (Turns of one call each
    measured each side while the other's TensorFlow threads were still spinning after their
    call, which slowed both by ~1-2 ms.)"""
    import grpc

    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.ClassifyRequest(content=content)
        _timed_calls(stub, request, 5)  # warm-up
        own: list[float] = []
        served: list[float] = []
        while len(served) < calls:
            own += in_process.latency(_TURN)
            served += _timed_calls(stub, request, _TURN)
    return own, served


def _timed_calls(stub: Any, request: Any, calls: int) -> list[float]:
    """Latencies (ms) of `calls` sequential Classify calls."""
    latencies = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.Classify(request)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _ghz() -> str:
    """The pinned ghz binary's path (built with `go install` on first use, then cached)."""
    done = subprocess.run(
        ["bash", str(_REPO / "deploy" / "local" / "tools.sh"), "path", "ghz"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"could not get ghz (make tools): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def _ghz_calls(ghz: str, address: str, request: Path, calls: int) -> list[float]:
    """Latencies (ms) of `calls` sequential Classify calls made by ghz with the serialized
    request in `request`."""
    done = subprocess.run(
        [
            ghz,
            "--insecure",
            "--import-paths",
            str(_REPO / "protos"),
            "--proto",
            str(_REPO / "protos" / "imagemesh" / "inference" / "v1" / "inference.proto"),
            "--call",
            "imagemesh.inference.v1.InferenceService.Classify",
            "--binary-file",
            str(request),
            "--concurrency",
            "1",
            "--connections",
            "1",
            # One sequential caller needs one core; more would let Go's idle threads spin on
            # the cores the server uses.
            "--cpus",
            "1",
            "--total",
            str(calls + _GHZ_SKIP),
            "--skipFirst",
            str(_GHZ_SKIP),
            "--format",
            "json",
            address,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"ghz failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    details = json.loads(done.stdout)["details"]
    failed = [d for d in details if d.get("status") != "OK"]
    if failed or len(details) != calls:
        raise SystemExit(f"ghz: {len(details)} answers, {len(failed)} failed: {failed[:3]}")
    return [d["latency"] / 1e6 for d in details]  # ghz reports nanoseconds


def _native_latencies(
    ghz: str, address: str, request: Path, calls: int, in_process: InProcessWorker
) -> tuple[list[float], list[float]]:
    """Batch-1 latencies (ms): (in process, through Classify from ghz), in turns of
    `_GHZ_TURN` calls of each."""
    own: list[float] = []
    served: list[float] = []
    while len(served) < calls:
        turn = min(_GHZ_TURN, calls - len(served))
        own += in_process.latency(turn)
        served += _ghz_calls(ghz, address, request, turn)
    return own, served


def _round_trips(address: str, calls: int) -> list[float]:
    """Latencies (ms) of Classify calls with no image, which a floor server answers without
    the model."""
    import grpc

    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.ClassifyRequest()
        _timed_calls(stub, request, 5)  # warm-up
        return _timed_calls(stub, request, calls)


async def _concurrent(
    address: str, contents: list[bytes], seconds: float, *, stream: bool, total: int = 0
) -> float:
    """Images per second with CLIENTS concurrent clients for `seconds` (or `total` images)."""
    import grpc

    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        loop = asyncio.get_running_loop()
        start = loop.time()

        def more() -> bool:
            if total:
                return done < total
            return loop.time() - start < seconds

        async def unary_client(i: int) -> None:
            nonlocal done
            request = inference_pb2.ClassifyRequest(content=contents[i % len(contents)])
            while more():
                await stub.Classify(request)
                done += 1

        async def stream_client(i: int) -> None:
            nonlocal done
            request = inference_pb2.ClassifyStreamRequest(
                request_id=str(i),
                request=inference_pb2.ClassifyRequest(content=contents[i % len(contents)]),
            )
            # No request iterator: requests are written on the call as answers come back.
            call = stub.ClassifyStream(None)
            in_flight = 0
            while more():
                while in_flight < STREAM_WINDOW:
                    await call.write(request)
                    in_flight += 1
                answer = await call.read()
                if not isinstance(answer, inference_pb2.ClassifyStreamResponse):  # EOF
                    raise RuntimeError("the service ended the stream early")
                if answer.HasField("error"):
                    raise RuntimeError(answer.error.message)
                in_flight -= 1
                done += 1
            await call.done_writing()
            while in_flight:
                await call.read()
                in_flight -= 1
                done += 1

        client = stream_client if stream else unary_client
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        return done / (loop.time() - start)


def _p50(samples: list[float]) -> float:
    return _percentiles(samples)[0]


def _figures_for_scale(
    measured: bool,
    floor_in: dict[str, list[float]],
    floor_served: dict[str, list[float]],
    noop_served: dict[str, list[float]],
    spread_a: list[float],
    spread_b: list[float],
    idle: list[float],
) -> dict[str, float | None]:
    """The output keys of the figures for scale (None when not `measured`: `--quick`).
    `spread_a` holds the back-to-back calls that `idle` is compared with."""
    if not measured:
        return dict.fromkeys(_SCALE_KEYS)
    figures = (
        _p50(floor_served["aio"]) - _p50(floor_in["aio"]),
        _p50(floor_served["sync"]) - _p50(floor_in["sync"]),
        _p50(noop_served["aio"]),
        _p50(noop_served["sync"]),
        _p50(idle) - _p50(spread_a),
        abs(_p50(spread_a) - _p50(spread_b)),
    )
    return {key: round(value, 3) for key, value in zip(_SCALE_KEYS, figures, strict=True)}


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerators, denominators, strict=True)), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, within a minute")
    parser.add_argument("--max-batch-size", type=int, help="the batcher's (default: service's)")
    parser.add_argument(
        "--max-queue-delay-ms", type=float, help="the batcher's (default: service's)"
    )
    parser.add_argument("--instances", type=int, help="model instances (default: service's)")
    parser.add_argument("--in-process-worker", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-floor-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process_worker:
        return _worker_main(json.loads(args.in_process_worker))
    if args.grpc_floor_worker:
        return _floor_main(json.loads(args.grpc_floor_worker))
    quick = args.quick
    # Measurements are interleaved in rounds (in process, unary, stream, ...) so that a
    # change in the shared machine's load hits baseline and service alike; ratios are the
    # median of the rounds' ratios, latencies pooled over the rounds.
    rounds = 3 if quick else 8
    latency_calls = 40 if quick else 250
    seconds = 1.0 if quick else 2.5
    rss_total = 4_000 if quick else 100_000
    # The figures for scale (floors, round trips, spread, idle penalty) need two more
    # TensorFlow processes, whose start alone would take `--quick` past its minute.
    scale = not quick
    from imagemesh.config import InferenceSettings
    from inference_service.runtime import default_threads, model_instances

    defaults = InferenceSettings()
    # The service's oneDNN switch (IMAGEMESH_INFERENCE__ONEDNN if set): the in-process
    # baselines use the same, so that only the serving differs.
    from imagemesh.config import load_settings

    onednn = load_settings().inference.onednn
    max_batch = args.max_batch_size or defaults.max_batch_size
    delay_ms = (
        defaults.max_queue_delay_ms if args.max_queue_delay_ms is None else args.max_queue_delay_ms
    )
    instances = model_instances(args.instances or defaults.model_instances)
    # The service's TensorFlow threads for that many instances, and those of one call at a
    # time on every core (the best for a single caller: intra = cores, inter = 1).
    service_threads = default_threads(instances)
    single_threads = default_threads(1)

    from storage_service.backends import open_object_store
    from trainer.datasets import generate_images, to_png

    contents = [to_png(image.pixels) for image in generate_images(64, seed=7)]
    with tempfile.TemporaryDirectory(prefix="imagemesh-bench-") as data:
        env = dict(os.environ)
        env.update(
            XDG_DATA_HOME=data,
            IMAGEMESH_SERVER__ACCESS_LOG="false",
            IMAGEMESH_SERVER__LOG_LEVEL="WARNING",
            IMAGEMESH_INFERENCE__MAX_BATCH_SIZE=str(max_batch),
            IMAGEMESH_INFERENCE__MAX_QUEUE_DELAY_MS=str(delay_ms),
            IMAGEMESH_INFERENCE__MODEL_INSTANCES=str(instances),
            IMAGEMESH_INFERENCE__ONEDNN=str(onednn).lower(),
        )
        root = Path(data) / "imagemesh" / "objects"
        settings = load_settings(storage={"local_root": root})
        store = open_object_store(settings.storage)
        metadata = publish_bench_model(store)
        image = Path(data) / "image.png"
        image.write_bytes(contents[0])
        from imagemesh.inference.v1 import inference_pb2

        request = Path(data) / "classify_request.bin"  # what ghz sends
        request.write_bytes(inference_pb2.ClassifyRequest(content=contents[0]).SerializeToString())
        ghz = _ghz()
        port, metrics_port = free_loopback_port(), free_loopback_port()
        address = f"127.0.0.1:{port}"
        env["IMAGEMESH_SERVER__METRICS_PORT"] = str(metrics_port)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        server = subprocess.Popen(
            [sys.executable, "-m", "imagemesh", "serve", "inference", "--port", str(port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        latency_in: list[float] = []
        latency_svc: list[float] = []
        python_in: list[float] = []
        python_svc: list[float] = []
        floor_in: dict[str, list[float]] = {"aio": [], "sync": []}
        floor_served: dict[str, list[float]] = {"aio": [], "sync": []}
        noop_served: dict[str, list[float]] = {"aio": [], "sync": []}
        spread_a: list[float] = []
        spread_b: list[float] = []
        idle: list[float] = []
        raw: list[float] = []
        raw_instances: list[float] = []
        rates: dict[str, list[float]] = {"unary": [], "stream": []}
        batch_means: dict[str, list[float]] = {"unary": [], "stream": []}
        workers: list[InProcessWorker] = []
        try:
            # Loaded while the service starts (all load the same artifact); measured after.
            spec = {
                "root": str(root),
                "model": metadata.name,
                "image": str(image),
                "onednn": onednn,
            }
            single = InProcessWorker(
                **spec,
                intra=single_threads[0],
                inter=single_threads[1],
                batch=max_batch,
                calls_at_once=1,
            )
            workers.append(single)
            same = InProcessWorker(
                **spec,
                intra=service_threads[0],
                inter=service_threads[1],
                batch=max_batch,
                calls_at_once=instances,
            )
            workers.append(same)
            floor_addresses: dict[str, str] = {}
            twin: InProcessWorker | None = None
            if scale:
                # A second process making `same`'s batch-1 call, for the spread between two
                # processes doing the same thing (warmed up for batch-1 calls only).
                twin = InProcessWorker(
                    **spec,
                    intra=service_threads[0],
                    inter=service_threads[1],
                    batch=1,
                    calls_at_once=1,
                )
                workers.append(twin)
                floor_ports = {"aio": free_loopback_port(), "sync": free_loopback_port()}
                floor_addresses = {name: f"127.0.0.1:{p}" for name, p in floor_ports.items()}
                workers.append(
                    InProcessWorker(
                        "--grpc-floor-worker",
                        **spec,
                        intra=service_threads[0],
                        inter=service_threads[1],
                        port=floor_ports["aio"],
                        sync_port=floor_ports["sync"],
                    )
                )
            for worker in workers:
                worker.wait_ready()
            _wait_serving(address, server)
            for number in range(1, rounds + 1):
                own, served = _native_latencies(ghz, address, request, latency_calls, same)
                latency_in += own
                latency_svc += served
                own, served = _latencies(address, contents[0], latency_calls, same)
                python_in += own
                python_svc += served
                for transport, address_of_floor in floor_addresses.items():
                    own, served = _latencies(
                        address_of_floor, contents[0], latency_calls // 2, same
                    )
                    floor_in[transport] += own
                    floor_served[transport] += served
                    noop_served[transport] += _round_trips(address_of_floor, latency_calls // 2)
                if twin is not None:
                    # `same`'s back-to-back turns serve both the spread and the idle penalty.
                    for _ in range(latency_calls // 2 // _TURN):
                        spread_a += same.latency(_TURN)
                        spread_b += twin.latency(_TURN)
                        idle += same.idle_latency(_TURN)
                raw.append(single.rate(seconds))
                raw_instances.append(same.rate(seconds))
                for kind in ("unary", "stream"):
                    before = _batch_size_totals(metrics_url)
                    rates[kind].append(
                        asyncio.run(
                            _concurrent(address, contents, seconds, stream=kind == "stream")
                        )
                    )
                    after = _batch_size_totals(metrics_url)
                    batch_means[kind].append((after[0] - before[0]) / (after[1] - before[1]))
                print(
                    f"round {number}/{rounds}: raw {raw[-1]:.0f} img/s (one call at a time), "
                    f"{raw_instances[-1]:.0f} ({instances} at once); unary "
                    f"{rates['unary'][-1]:.0f} (mean batch {batch_means['unary'][-1]:.1f}), "
                    f"stream {rates['stream'][-1]:.0f} "
                    f"(mean batch {batch_means['stream'][-1]:.1f})",
                    file=sys.stderr,
                )
            process = psutil.Process(server.pid)
            asyncio.run(_concurrent(address, contents, 0, stream=True, total=1_000))
            rss_start = process.memory_info().rss
            asyncio.run(_concurrent(address, contents, 0, stream=True, total=rss_total - 1_000))
            rss_end = process.memory_info().rss
            print(
                f"RSS after 1,000: {rss_start / 2**20:.0f} MiB; after {rss_total:,}: "
                f"{rss_end / 2**20:.0f} MiB",
                file=sys.stderr,
            )
        finally:
            for worker in workers:
                worker.close()
            server.terminate()
            server.wait(timeout=60)
    in50, in99 = _percentiles(latency_in)
    svc50, svc99 = _percentiles(latency_svc)
    python_in50, python_in99 = _percentiles(python_in)
    python50, python99 = _percentiles(python_svc)
    figures_for_scale = _figures_for_scale(
        scale, floor_in, floor_served, noop_served, spread_a, spread_b, idle
    )
    result = {
        "bench": "inference",
        "quick": quick,
        "p50_overhead_ms": round(svc50 - in50, 3),
        "p99_overhead_ms": round(svc99 - in99, 3),
        "ratio_concurrent_unary": _median_ratio(rates["unary"], raw),
        "ratio_concurrent_stream": _median_ratio(rates["stream"], raw),
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 2),
        "p50_overhead_python_client_ms": round(python50 - python_in50, 3),
        "p99_overhead_python_client_ms": round(python99 - python_in99, 3),
        "ratio_concurrent_unary_vs_instances": _median_ratio(rates["unary"], raw_instances),
        "ratio_concurrent_stream_vs_instances": _median_ratio(rates["stream"], raw_instances),
        **figures_for_scale,
        "classify_p50_ms": round(svc50, 3),
        "classify_p99_ms": round(svc99, 3),
        "classify_python_client_p50_ms": round(python50, 3),
        "classify_python_client_p99_ms": round(python99, 3),
        "in_process_p50_ms": round(in50, 3),
        "in_process_p99_ms": round(in99, 3),
        "raw_img_per_s_at_max_batch": round(statistics.median(raw), 1),
        "raw_img_per_s_at_max_batch_instances": round(statistics.median(raw_instances), 1),
        "unary_img_per_s": round(statistics.median(rates["unary"]), 1),
        "stream_img_per_s": round(statistics.median(rates["stream"]), 1),
        "unary_mean_batch": round(statistics.median(batch_means["unary"]), 2),
        "stream_mean_batch": round(statistics.median(batch_means["stream"]), 2),
        "max_batch_size": max_batch,
        "max_queue_delay_ms": delay_ms,
        "instances": instances,
        "service_tf_threads": list(service_threads),
        "onednn": onednn,
        "single_call_tf_threads": list(single_threads),
        "clients": CLIENTS,
        "rounds": rounds,
        "rss_calls": [1_000, rss_total],
        "rss_mib": [round(rss_start / 2**20, 1), round(rss_end / 2**20, 1)],
        # The machine is shared: its load says how much to trust this run.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
