"""Benchmark of the InferenceService against the model's own in-process calls, in one run.

    .venv/bin/python -m bench.inference [--quick]

Publishes an untrained 32x32 DenseNet121 (5 classes) to a temporary local-folder store, starts
`imagemesh serve inference` in a subprocess on it, and measures, in the same run:

- batch-1 latency p50/p99 of Classify (one client, sequential) against the model's own
  in-process `tf.function` call on the same preprocessed image: `p50_overhead_ms`,
  `p99_overhead_ms` (goal: p50 overhead <= 2 ms);
- throughput under 32 concurrent clients, unary Classify and ClassifyStream, against the raw
  in-process throughput at the batcher's max batch size: `ratio_concurrent_unary`,
  `ratio_concurrent_stream` (goal >= 0.8);
- the service's RSS after 100,000 classifications against after 1,000: `rss_growth_pct`
  (goal < 5 %; `--quick` compares 1,000 with 6,000 and says so in `rss_calls`).

The clients run in this process, on the same two cores as the server: their CPU is part of
what the ratios pay. The last stdout line is one JSON object.
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


def _in_process_latency(run: Any, one: np.ndarray, calls: int) -> list[float]:
    """Batch-1 latencies (ms) of the model's own compiled call."""
    latencies = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(one)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def _in_process_rate(run: Any, many: np.ndarray, seconds: float) -> float:
    """Images per second of the model's own compiled call at the batch size of `many`."""
    images = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(many)
        images += many.shape[0]
    return images / (time.perf_counter() - t0)


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


def _unary_latency(address: str, content: bytes, calls: int) -> list[float]:
    import grpc

    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.ClassifyRequest(content=content)
        for _ in range(5):
            stub.Classify(request)
        latencies = []
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.Classify(request)
            latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, within a minute")
    parser.add_argument("--max-batch-size", type=int, help="the batcher's (default: service's)")
    parser.add_argument(
        "--max-queue-delay-ms", type=float, help="the batcher's (default: service's)"
    )
    args = parser.parse_args()
    quick = args.quick
    # Measurements are interleaved in rounds (in process, unary, stream, ...) so that a
    # change in the shared machine's load hits baseline and service alike; ratios are the
    # median of the rounds' ratios, latencies pooled over the rounds.
    rounds = 3 if quick else 8
    latency_calls = 40 if quick else 250
    seconds = 1.0 if quick else 2.5
    rss_total = 4_000 if quick else 100_000
    from imagemesh.config import InferenceSettings

    defaults = InferenceSettings()
    max_batch = args.max_batch_size or defaults.max_batch_size
    delay_ms = (
        defaults.max_queue_delay_ms if args.max_queue_delay_ms is None else args.max_queue_delay_ms
    )

    from inference_service.runtime import configure_threads

    # The service's defaults (intra = cores, inter = 1), before TensorFlow starts here.
    configure_threads(0, 0)
    from imagemesh.config import load_settings
    from inference_service.model.densenet import build_untrained_classifier
    from inference_service.model.registry import ModelRegistry
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
        )
        settings = load_settings(storage={"local_root": Path(data) / "imagemesh" / "objects"})
        store = open_object_store(settings.storage)
        print("publishing an untrained 32x32 DenseNet121 (5 classes)", file=sys.stderr)
        metadata = ModelRegistry(store).publish(
            "default",
            build_untrained_classifier(5, (32, 32), seed=0),
            class_names=["circle", "square", "triangle", "cross", "ring"],
            backbone_weights="none",
        )
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
        raw: list[float] = []
        rates: dict[str, list[float]] = {"unary": [], "stream": []}
        batch_means: dict[str, list[float]] = {"unary": [], "stream": []}
        try:
            # Loaded while the service starts (both load the same artifact); measured after.
            run, one, many = _prepare_in_process(metadata.name, store, contents[0], max_batch)
            _wait_serving(address, server)
            for number in range(1, rounds + 1):
                latency_in += _in_process_latency(run, one, latency_calls)
                latency_svc += _unary_latency(address, contents[0], latency_calls)
                raw.append(_in_process_rate(run, many, seconds))
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
                    f"round {number}/{rounds}: raw {raw[-1]:.0f} img/s, unary "
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
            server.terminate()
            server.wait(timeout=60)
    in50, in99 = _percentiles(latency_in)
    svc50, svc99 = _percentiles(latency_svc)
    result = {
        "bench": "inference",
        "quick": quick,
        "p50_overhead_ms": round(svc50 - in50, 3),
        "p99_overhead_ms": round(svc99 - in99, 3),
        "ratio_concurrent_unary": round(
            statistics.median(u / r for u, r in zip(rates["unary"], raw, strict=True)), 3
        ),
        "ratio_concurrent_stream": round(
            statistics.median(u / r for u, r in zip(rates["stream"], raw, strict=True)), 3
        ),
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 2),
        "classify_p50_ms": round(svc50, 3),
        "classify_p99_ms": round(svc99, 3),
        "in_process_p50_ms": round(in50, 3),
        "in_process_p99_ms": round(in99, 3),
        "raw_img_per_s_at_max_batch": round(statistics.median(raw), 1),
        "unary_img_per_s": round(statistics.median(rates["unary"]), 1),
        "stream_img_per_s": round(statistics.median(rates["stream"]), 1),
        "unary_mean_batch": round(statistics.median(batch_means["unary"]), 2),
        "stream_mean_batch": round(statistics.median(batch_means["stream"]), 2),
        "max_batch_size": max_batch,
        "max_queue_delay_ms": delay_ms,
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
