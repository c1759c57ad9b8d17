"""Storage benchmark: the StorageService on MinIO against the raw `minio` client on the same
server, in one run.

1. Large objects: 10 PNG images of 16 MiB each, uploaded through `UploadImage` (1 MiB chunks,
   SHA-256 announced) and downloaded through `DownloadImage`, vs `put_object` / `get_object`
   of the same bytes. `ratio_upload_large`, `ratio_download_large` = service MB/s / raw MB/s
   (goal >= 0.8 each).
2. Small images: N distinct 32x32 PNGs (10,000; `--quick` 1,000) through one
   `BulkUploadImages` stream vs sequential `put_object` calls, as a naive client does.
   `ratio_bulk_small` = service images/s / raw images/s (goal >= 2); `small_images_per_s`.
3. Memory: the peak RSS of a fresh storage-service process, above its idle RSS, while one
   client uploads a 1 GiB PNG (16384x8192 RGBA, 16 bits per channel), sampled with psutil
   every 10 ms. `rss_mib_above_idle_1gib_upload` (goal < 100).
4. CPU: every phase of 1 and 2 measures the CPU seconds of MinIO, the service and this client
   (`cpu_ms_per_unit`, per MB or per image, and `cores_busy`), and from them the most each ratio
   could reach with every core busy (`max_ratio_*`, see `cpu_bounds`): a goal above
   `max_ratio_sdk_only_service_*` is out of reach of any service that stores through the
   `minio` SDK on this machine.

The service runs in its own process (`imagemesh serve storage`), as deployed, on a fresh
bucket; MinIO is started with deploy/local/engines.sh if it is not running. Progress goes to
stderr; the last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio
from minio.deleteobjects import DeleteObject
from PIL import Image
from rich.console import Console

from imagemesh.cores import usable_cores
from imagemesh.ports import free_loopback_port
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc

if TYPE_CHECKING:
    from bench.cpu_meter import CpuMeter

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "127.0.0.1:9000"
ACCESS_KEY = os.environ.get("IMAGEMESH_S3_ACCESS_KEY", "imagemesh")
SECRET_KEY = os.environ.get("IMAGEMESH_S3_SECRET_KEY", "imagemesh-secret")
MIB = 1024 * 1024
CHUNK = MIB
LARGE_COUNT = 10
LARGE_BYTES = 16 * MIB

console = Console(stderr=True)


# -- engines and the service process ----------------------------------------------------


def _minio_healthy() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 9000), timeout=1):
            pass
        Minio(ENDPOINT, ACCESS_KEY, SECRET_KEY, secure=False).list_buckets()
    except Exception:
        return False
    return True


def _ensure_minio() -> None:
    if _minio_healthy():
        return
    console.print("starting MinIO with deploy/local/engines.sh up")
    subprocess.run(
        [str(ROOT / "deploy/local/engines.sh"), "up"],
        env={**os.environ, "ENGINES": "minio"},
        check=True,
        stdout=sys.stderr,
    )


class ServiceProcess:
    """`imagemesh serve storage` on MinIO, in its own process."""

    def __init__(self, bucket: str, state_dir: Path) -> None:
        self.port = free_loopback_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "IMAGEMESH_STORAGE__BACKEND": "s3",
            "IMAGEMESH_STORAGE__S3__ENDPOINT": ENDPOINT,
            "IMAGEMESH_STORAGE__S3__ACCESS_KEY": ACCESS_KEY,
            "IMAGEMESH_STORAGE__S3__SECRET_KEY": SECRET_KEY,
            "IMAGEMESH_STORAGE__S3__BUCKET": bucket,
            "IMAGEMESH_STORAGE__STATE_DIR": str(state_dir),
            # The 1 GiB image has 134 Mpx; the default limit (64 Mpx) would refuse it.
            "IMAGEMESH_STORAGE__MAX_IMAGE_PIXELS": str(200_000_000),
            # No search service in this bench: updates wait in the outbox, as in an outage.
            "IMAGEMESH_SEARCH_ADDRESS": f"127.0.0.1:{free_loopback_port()}",
            "IMAGEMESH_SERVER__ACCESS_LOG": "false",
            "IMAGEMESH_SERVER__LOG_LEVEL": "WARNING",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagemesh", "serve", "storage", "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sys.stderr,
            cwd=ROOT,
        )
        self._wait_serving()

    def _wait_serving(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"storage service exited with {self.proc.returncode}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise SystemExit("storage service did not become SERVING")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_send_message_length", 64 * MIB),
                ("grpc.max_receive_message_length", 64 * MIB),
            ],
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _BareStorage(storage_pb2_grpc.StorageServiceServicer):
    """The ceiling: UploadImage and DownloadImage over grpc.aio with no store behind them.

    Downloads stream `length` bytes from memory in 1 MiB chunks (what the service sends);
    uploads count what arrives.
    """

    def __init__(self) -> None:
        self.data = np.random.default_rng(0).integers(0, 256, LARGE_BYTES, np.uint8).tobytes()

    async def UploadImage(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            pass
        return storage_pb2.UploadImageResponse()

    async def DownloadImage(self, request: Any, context: Any) -> Any:
        for offset in range(0, request.length, CHUNK):
            yield storage_pb2.DownloadImageResponse(
                chunk=self.data[offset : offset + CHUNK], offset=offset
            )


def _serve_bare(port: int) -> None:
    import asyncio

    async def serve() -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 64 * MIB),
                ("grpc.max_receive_message_length", 64 * MIB),
            ]
        )
        # Only the two RPCs the ceiling uses are implemented.
        bare = _BareStorage()  # type: ignore[abstract]
        storage_pb2_grpc.add_StorageServiceServicer_to_server(bare, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def bench_ceiling(raw_up: float, raw_down: float) -> dict[str, float]:
    """The same transfers (1 MiB messages, the same client) against a bare grpc.aio server
    in its own process: the most any gRPC service can reach on this machine, no store."""
    port = free_loopback_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.storage", "--bare-server", str(port)], cwd=ROOT
    )
    try:
        address = f"127.0.0.1:{port}"
        options = [
            ("grpc.max_send_message_length", 64 * MIB),
            ("grpc.max_receive_message_length", 64 * MIB),
        ]
        with grpc.insecure_channel(address, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            data = large_png(1000)

            def put() -> None:
                stub.UploadImage(upload_request_stream(iter([data]), "x.png", "", len(data)))

            def get() -> int:
                request = storage_pb2.DownloadImageRequest(length=len(data))
                return sum(len(r.chunk) for r in stub.DownloadImage(request))

            put()
            get()
            total_mb = LARGE_COUNT * len(data) / 1e6
            started = time.perf_counter()
            for _ in range(LARGE_COUNT):
                put()
            bare_up = total_mb / (time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(LARGE_COUNT):
                get()
            bare_down = total_mb / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait()
    console.print(
        f"ceiling (bare grpc.aio, no store): upload {bare_up:.0f} MB/s, "
        f"download {bare_down:.0f} MB/s"
    )
    return {
        "bare_grpc_upload_mb_per_s": round(bare_up, 1),
        "bare_grpc_download_mb_per_s": round(bare_down, 1),
        # Each byte crosses two hops (client -> service over gRPC, service -> store), and on
        # two shared cores both hops cost CPU: done one after the other at their separate
        # best rates, the ratio against the raw client is bare / (bare + raw). A service can
        # beat this only by overlapping the hops on otherwise idle cores.
        "two_hop_ratio_upload_large": round(bare_up / (bare_up + raw_up), 3),
        "two_hop_ratio_download_large": round(bare_down / (bare_down + raw_down), 3),
    }


# -- images ------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_stream(width: int, height: int, seed: int, *, bit_depth: int = 8) -> Iterator[bytes]:
    """A valid RGBA PNG of random pixels, generated piece by piece (never whole in memory).

    Stored (level 0) deflate blocks keep the size ~ width x height x 4 x depth/8 bytes and
    the generation fast. One random row block is reused, shifted per row by the seed.
    """
    row_bytes = width * 4 * bit_depth // 8
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=row_bytes * 2, dtype=np.uint8).tobytes()
    yield b"\x89PNG\r\n\x1a\n"
    yield _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 6, 0, 0, 0))
    compressor = zlib.compressobj(level=0)
    pending = bytearray()
    for y in range(height):
        start = (y * 7919 + seed) % row_bytes
        pending += b"\x00" + noise[start : start + row_bytes]
        if len(pending) >= CHUNK:
            data = compressor.compress(bytes(pending))
            pending.clear()
            if data:
                yield _chunk(b"IDAT", data)
    data = compressor.compress(bytes(pending)) + compressor.flush()
    yield _chunk(b"IDAT", data)
    yield _chunk(b"IEND", b"")


def large_png(seed: int) -> bytes:
    # 2048 x 2048 RGBA at 8 bits = 16 MiB of pixels, stored: ~16 MiB of PNG.
    return b"".join(png_stream(2048, 2048, seed))


def small_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


# -- measurements ------------------------------------------------------------------------


def upload_request_stream(
    pieces: Iterator[bytes], filename: str, sha: str, size: int
) -> Iterator[storage_pb2.UploadImageRequest]:
    yield storage_pb2.UploadImageRequest(
        header=storage_pb2.UploadImageHeader(
            filename=filename, dataset="bench", expected_sha256=sha, expected_size_bytes=size
        )
    )
    # Each byte is copied once into its chunk: re-slicing one growing buffer would move
    # the whole rest of a 16 MiB image for every chunk, and the client would then be what
    # is measured.
    buffer = bytearray()
    for piece in pieces:
        with memoryview(piece) as view:
            start = 0
            if buffer:
                start = min(CHUNK - len(buffer), len(view))
                buffer += view[:start]
                if len(buffer) == CHUNK:
                    yield storage_pb2.UploadImageRequest(chunk=bytes(buffer))
                    buffer.clear()
            while len(view) - start >= CHUNK:
                yield storage_pb2.UploadImageRequest(chunk=bytes(view[start : start + CHUNK]))
                start += CHUNK
            buffer += view[start:]
    if buffer:
        yield storage_pb2.UploadImageRequest(chunk=bytes(buffer))


def bench_large(
    stub: storage_pb2_grpc.StorageServiceStub, raw: Minio, bucket: str, meter: CpuMeter
) -> dict[str, float]:
    images = [large_png(1000 + i) for i in range(LARGE_COUNT + 1)]
    total_mb = LARGE_COUNT * len(images[0]) / 1e6
    shas = [hashlib.sha256(d).hexdigest() for d in images]

    def service_put(i: int) -> str:
        data = images[i]
        reply = stub.UploadImage(
            upload_request_stream(iter([data]), f"{i}.png", shas[i], len(data))
        )
        return str(reply.image.name)

    def service_get(name: str) -> int:
        return sum(
            len(r.chunk) for r in stub.DownloadImage(storage_pb2.DownloadImageRequest(name=name))
        )

    def raw_put(i: int) -> None:
        raw.put_object(bucket, f"raw/large/{i}", io.BytesIO(images[i]), len(images[i]))

    def raw_get(i: int) -> int:
        response = raw.get_object(bucket, f"raw/large/{i}")
        try:
            return len(response.read())
        finally:
            response.close()
            response.release_conn()

    # Warm both paths (connections, code) on the extra image, then measure, alternating.
    warm = service_put(LARGE_COUNT)
    service_get(warm)
    raw_put(LARGE_COUNT)
    raw_get(LARGE_COUNT)
    with meter.phase("raw_upload_large"):
        for i in range(LARGE_COUNT):
            raw_put(i)
    with meter.phase("service_upload_large"):
        names = [service_put(i) for i in range(LARGE_COUNT)]
    with meter.phase("raw_download_large"):
        got = sum(raw_get(i) for i in range(LARGE_COUNT))
    assert got == sum(len(d) for d in images[:-1])
    with meter.phase("service_download_large"):
        got = sum(service_get(n) for n in names)
    assert got == sum(len(d) for d in images[:-1])
    raw_up, service_up, raw_down, service_down = (
        total_mb / meter.phases[f"{side}_{kind}_large"].wall_s
        for kind in ("upload", "download")
        for side in ("raw", "service")
    )
    console.print(
        f"large: upload service {service_up:.0f} MB/s vs raw {raw_up:.0f} MB/s; "
        f"download service {service_down:.0f} MB/s vs raw {raw_down:.0f} MB/s"
    )
    return {
        "large_total_mb": round(total_mb, 3),
        "upload_large_mb_per_s": round(service_up, 1),
        "raw_upload_large_mb_per_s": round(raw_up, 1),
        "download_large_mb_per_s": round(service_down, 1),
        "raw_download_large_mb_per_s": round(raw_down, 1),
        "ratio_upload_large": round(service_up / raw_up, 3),
        "ratio_download_large": round(service_down / raw_down, 3),
    }


def bench_small(
    stub: storage_pb2_grpc.StorageServiceStub, raw: Minio, bucket: str, count: int, meter: CpuMeter
) -> dict[str, float]:
    # Distinct images for each side, so neither sees duplicates.
    raw_images = [small_png(i) for i in range(count)]
    service_images = [small_png(1_000_000 + i) for i in range(count)]
    with meter.phase("raw_bulk_small"):
        for i, data in enumerate(raw_images):
            raw.put_object(bucket, f"raw/small/{i}.png", io.BytesIO(data), len(data), "image/png")
    raw_rate = count / meter.phases["raw_bulk_small"].wall_s

    def requests() -> Iterator[storage_pb2.BulkUploadImagesRequest]:
        for i, data in enumerate(service_images):
            yield storage_pb2.BulkUploadImagesRequest(
                request_id=str(i),
                header=storage_pb2.UploadImageHeader(
                    filename=f"{i}.png", dataset="bench-small", label=str(i % 5)
                ),
                content=data,
            )

    with meter.phase("service_bulk_small"):
        stored = sum(
            ack.outcome == storage_pb2.UPLOAD_OUTCOME_STORED
            for ack in stub.BulkUploadImages(requests())
        )
    service_rate = count / meter.phases["service_bulk_small"].wall_s
    if stored != count:
        raise SystemExit(f"bulk upload stored {stored} of {count} images")
    console.print(
        f"small: bulk stream {service_rate:.0f} images/s vs sequential put_object "
        f"{raw_rate:.0f} images/s ({count} images)"
    )
    return {
        "small_images": count,
        "small_images_per_s": round(service_rate, 1),
        "raw_small_images_per_s": round(raw_rate, 1),
        "ratio_bulk_small": round(service_rate / raw_rate, 3),
    }


def cpu_bounds(meter: CpuMeter, results: dict[str, Any], small_count: int) -> dict[str, Any]:
    """What the measured CPU costs allow: each phase's CPU per unit (MB or image) by process,
    and for each ratio the most it could reach with every core busy at those costs.

    `max_ratio_at_full_cpu_*`: the service's path at its measured CPU per unit (store, service
    and client together), all cores busy, against the raw rate measured. `..._free_service_*`:
    the same if the service itself cost no CPU at all (the store's and the client's CPU alone):
    a goal above it cannot be met by any service that makes the same store calls.
    `..._sdk_only_service_*`: the same if the service cost only what the raw client spends
    (the `minio` SDK's own work for those calls): the most a service built on that SDK can do.
    """
    cores = usable_cores()
    large_mb = results["large_total_mb"]
    units = {"upload_large": large_mb, "download_large": large_mb, "bulk_small": small_count}
    raw_rates = {
        "upload_large": results["raw_upload_large_mb_per_s"],
        "download_large": results["raw_download_large_mb_per_s"],
        "bulk_small": results["raw_small_images_per_s"],
    }
    figures: dict[str, Any] = {"cores": cores, "cpu_ms_per_unit": {}, "cores_busy": {}}
    for kind, count in units.items():
        for side in ("raw", "service"):
            phase = meter.phases[f"{side}_{kind}"]
            figures["cpu_ms_per_unit"][f"{side}_{kind}"] = phase.per_unit_ms(count)
            figures["cores_busy"][f"{side}_{kind}"] = phase.cores_busy
        service = meter.phases[f"service_{kind}"]
        per_unit = service.total_cpu_s / count
        others = (service.total_cpu_s - service.cpu_s.get("service", 0.0)) / count
        figures[f"max_ratio_at_full_cpu_{kind}"] = round(cores / per_unit / raw_rates[kind], 3)
        figures[f"max_ratio_free_service_{kind}"] = round(cores / others / raw_rates[kind], 3)
        # The service's own CPU replaced by what the raw client spends per unit: a service
        # that did nothing but make the same SDK calls as the raw client.
        sdk = meter.phases[f"raw_{kind}"].cpu_s.get("client", 0.0) / count
        figures[f"max_ratio_sdk_only_service_{kind}"] = round(
            cores / (others + sdk) / raw_rates[kind], 3
        )
    line = ", ".join(
        f"{kind} {figures[f'max_ratio_at_full_cpu_{kind}']:.2f} "
        f"(SDK-only service {figures[f'max_ratio_sdk_only_service_{kind}']:.2f}, "
        f"free service {figures[f'max_ratio_free_service_{kind}']:.2f})"
        for kind in units
    )
    console.print(f"most each ratio could reach at the measured CPU costs: {line}")
    return figures


def bench_rss(bucket: str, state_dir: Path, size_gib: float) -> dict[str, float]:
    service = ServiceProcess(bucket, state_dir)
    try:
        proc = psutil.Process(service.proc.pid)
        height = int(8192 * size_gib)
        width = 16384
        with service.channel() as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            # Warm: one small upload, so idle includes the code paths' imports.
            list(
                stub.BulkUploadImages(
                    iter(
                        [
                            storage_pb2.BulkUploadImagesRequest(
                                request_id="w",
                                header=storage_pb2.UploadImageHeader(filename="w.png"),
                                content=small_png(42),
                            )
                        ]
                    )
                )
            )
            time.sleep(0.5)
            idle = proc.memory_info().rss
            digest = hashlib.sha256()
            size = 0
            for piece in png_stream(width, height, 7, bit_depth=16):
                digest.update(piece)
                size += len(piece)
            peak = idle
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, proc.memory_info().rss)
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            reply = stub.UploadImage(
                upload_request_stream(
                    png_stream(width, height, 7, bit_depth=16), "huge.png", digest.hexdigest(), size
                )
            )
            elapsed = time.perf_counter() - started
            done.set()
            sampler.join()
        if reply.image.size_bytes != size:
            raise SystemExit("the 1 GiB upload was not stored whole")
        above = (peak - idle) / MIB
        console.print(
            f"rss: idle {idle / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB during a "
            f"{size / MIB:.0f} MiB upload ({size / 1e6 / elapsed:.0f} MB/s): "
            f"{above:.0f} MiB above idle"
        )
        return {
            "rss_mib_above_idle_1gib_upload": round(above, 1),
            "rss_idle_mib": round(idle / MIB, 1),
            "huge_upload_bytes": size,
            "huge_upload_mb_per_s": round(size / 1e6 / elapsed, 1),
        }
    finally:
        service.stop()


def _drop_bucket(raw: Minio, bucket: str) -> None:
    objects = (
        DeleteObject(o.object_name)
        for o in raw.list_objects(bucket, recursive=True)
        if o.object_name is not None
    )
    for error in raw.remove_objects(bucket, objects):
        console.print(f"cleanup: {error}")
    raw.remove_bucket(bucket)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 small images (< 1 minute)")
    parser.add_argument("--small", type=int, help="number of small images (default 10,000)")
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        _serve_bare(args.bare_server)
        return 0
    if not __package__:  # run as a script (`make bench`): the repository holds `bench`
        sys.path.insert(0, str(ROOT))
    from bench.cpu_meter import CpuMeter, process_listening_on

    small_count = args.small or (1000 if args.quick else 10_000)
    _ensure_minio()
    raw = Minio(ENDPOINT, ACCESS_KEY, SECRET_KEY, secure=False)
    bucket = f"bench-storage-{uuid.uuid4().hex[:12]}"
    raw.make_bucket(bucket)
    results: dict[str, Any] = {"bench": "storage", "quick": args.quick}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="imagemesh-bench-storage-") as state:
            service = ServiceProcess(bucket, Path(state) / "a")
            try:
                meter = CpuMeter(
                    {
                        "minio": process_listening_on(int(ENDPOINT.rsplit(":", 1)[1])),
                        "service": psutil.Process(service.proc.pid),
                        "client": psutil.Process(),
                    }
                )
                with service.channel() as channel:
                    stub = storage_pb2_grpc.StorageServiceStub(channel)
                    results.update(bench_large(stub, raw, bucket, meter))
                    results.update(
                        bench_ceiling(
                            results["raw_upload_large_mb_per_s"],
                            results["raw_download_large_mb_per_s"],
                        )
                    )
                    results.update(bench_small(stub, raw, bucket, small_count, meter))
                results.update(cpu_bounds(meter, results, small_count))
            finally:
                service.stop()
            results.update(bench_rss(bucket, Path(state) / "b", 1.0))
    finally:
        _drop_bucket(raw, bucket)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
