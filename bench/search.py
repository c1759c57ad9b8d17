"""Search benchmark: the SearchService on Elasticsearch against the raw `elasticsearch` client
on the same server, in one run.

1. Bulk indexing of N documents (100,000; `--quick` 5,000): IndexImages in batches of 1,000,
   4 calls in flight, vs `elasticsearch.helpers.bulk` (chunks of 1,000) into an index with the
   same mapping. `ratio_bulk_index` = service docs/s / raw docs/s (goal >= 0.8).
2. Query latency of a filtered search with per-class counts (datasets, model version, classes,
   min confidence; count by predicted class; 20 per page), through the service vs the same
   query body sent by the raw client to the same index: p50/p99 and their differences
   (`p50_overhead_ms`, goal <= 2 ms). A no-op RPC on the same server and channel (a health
   check, through the same interceptors), interleaved with both, is reported beside them
   (`grpc_noop_p50_ms`): the part of the overhead that is the gRPC round trip alone.
3. Paging through all N documents with the cursor (1,000 per page) while 1,000 new documents
   arrive through IndexImages: duplicates and missing documents among the N (goal 0 and 0).

The service runs in its own process (`imagemesh serve search`), as deployed; the bench
process is its client. Elasticsearch is started with deploy/local/engines.sh if not running.
The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from elasticsearch import Elasticsearch, helpers
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.progress import Progress

from imagemesh.common.v1 import common_pb2
from imagemesh.ports import free_loopback_port
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from search_service.elasticsearch_backend import format_ns
from search_service.elasticsearch_mapping import index_name, index_template, template_name

ROOT = Path(__file__).resolve().parents[1]
ES_URL = "http://127.0.0.1:9200"
CLASSES = ["cat", "dog", "bird", "car", "tree"]
DATASETS = ["train", "val", "test", "extra"]
MODEL = "models/densenet/versions/v3"
BASE_NS = 1_700_000_000 * 1_000_000_000
BATCH = 1000
IN_FLIGHT = 4

console = Console(stderr=True)


def _ensure_es() -> bool:
    """Starts Elasticsearch if it is down; True when this run started it."""
    env = {**os.environ, "ENGINES": "es"}
    script = str(ROOT / "deploy" / "local" / "engines.sh")
    status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
    if "es       healthy" in status.stdout or " healthy" in status.stdout.split("\n")[0]:
        return False
    console.print("starting Elasticsearch (deploy/local/engines.sh up)")
    subprocess.run([script, "up"], env=env, check=True, stdout=sys.stderr)
    return True


def _doc(i: int, tag: str = "bench") -> tuple[search_pb2.ImageDocument, dict[str, Any]]:
    name = "images/" + hashlib.sha256(f"{tag}-{i}".encode()).hexdigest()
    kind = CLASSES[i % 5]
    create_ns = BASE_NS + i * 1_000_000_007 % (10**15)
    seconds, nanos = divmod(create_ns, 1_000_000_000)
    doc = search_pb2.ImageDocument(
        name=name,
        filename=f"{kind}_{i:06d}.png",
        dataset=DATASETS[i % 4],
        label=CLASSES[(i * 7) % 5],
        tags=["outdoor" if i % 2 else "indoor"],
        attributes={"camera": f"c{i % 3}"},
        content_type="image/png",
        size_bytes=2000 + i % 977,
        width=32,
        height=32,
        create_time=Timestamp(seconds=seconds, nanos=nanos),
    )
    # What a raw-client user would index: the same fields, the same mapping.
    source = {
        "name": name,
        "filename": doc.filename,
        "dataset": doc.dataset,
        "label": doc.label,
        "tags": list(doc.tags),
        "attributes": dict(doc.attributes),
        "attribute_pairs": [f"camera=c{i % 3}"],
        "content_type": "image/png",
        "size_bytes": doc.size_bytes,
        "width": 32,
        "height": 32,
        "create_time": format_ns(create_ns),
        "search_text": f"{kind} {i:06d} png {'outdoor' if i % 2 else 'indoor'}",
        "predictions": [],
    }
    return doc, source


def _prediction(i: int, name: str) -> search_pb2.ImagePrediction:
    return search_pb2.ImagePrediction(
        image=name,
        prediction=common_pb2.Prediction(
            model_version=MODEL,
            top_class=CLASSES[(i * 3) % 5],
            confidence=((i * 37) % 100) / 100,
            top_classes=[common_pb2.ClassScore(class_name=CLASSES[(i * 3) % 5], probability=0.5)],
        ),
    )


async def _service_bulk(address: str, batches: list[list[Any]], rpc: str, label: str) -> float:
    """Sends the batches with IN_FLIGHT calls at a time; returns the seconds taken."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        queue: asyncio.Queue[list[Any]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(label, total=sum(len(b) for b in batches))

            async def worker() -> None:
                while not queue.empty():
                    batch = queue.get_nowait()
                    reply: search_pb2.IndexImagesResponse | search_pb2.IndexPredictionsResponse
                    if rpc == "images":
                        reply = await stub.IndexImages(
                            search_pb2.IndexImagesRequest(documents=batch)
                        )
                    else:
                        reply = await stub.IndexPredictions(
                            search_pb2.IndexPredictionsRequest(predictions=batch)
                        )
                    if reply.errors:
                        raise RuntimeError(f"{rpc}: {reply.errors[0]}")
                    progress.advance(task, len(batch))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
            return time.perf_counter() - start


def _raw_bulk(client: Elasticsearch, index: str, sources: list[dict[str, Any]]) -> float:
    actions = ({"_index": index, "_id": s["name"][7:], "_source": s} for s in sources)
    start = time.perf_counter()
    ok, errors = helpers.bulk(client, actions, chunk_size=BATCH, max_retries=3)
    elapsed = time.perf_counter() - start
    assert ok == len(sources), errors
    return elapsed


def _raw_query(alias: str) -> dict[str, Any]:
    """The filtered search with per-class counts, as a raw-client user writes it."""
    prediction = {
        "bool": {
            "filter": [
                {"term": {"predictions.model_version": MODEL}},
                {"terms": {"predictions.top_class": ["cat", "dog", "bird"]}},
                {"range": {"predictions.confidence": {"gte": 0.5}}},
            ]
        }
    }
    return {
        "index": alias,
        "query": {
            "bool": {
                "filter": [
                    {"terms": {"dataset": ["train", "val"]}},
                    {"nested": {"path": "predictions", "query": prediction}},
                ]
            }
        },
        "aggs": {
            "counts": {
                "nested": {"path": "predictions"},
                "aggs": {
                    "matched": {
                        "filter": prediction,
                        "aggs": {
                            "values": {
                                "terms": {"field": "predictions.top_class", "size": 1000},
                                "aggs": {"images": {"reverse_nested": {}}},
                            }
                        },
                    }
                },
            }
        },
        "sort": [{"create_time": {"order": "desc"}}, {"name": {"order": "asc"}}],
        "size": 21,
        "track_total_hits": True,
    }


def _service_request() -> search_pb2.SearchImagesRequest:
    return search_pb2.SearchImagesRequest(
        filter=search_pb2.ImageFilter(
            datasets=["train", "val"],
            prediction=search_pb2.PredictionFilter(
                model_version=MODEL, classes=["cat", "dog", "bird"], min_confidence=0.5
            ),
        ),
        count_by=search_pb2.COUNT_FIELD_PREDICTED_CLASS,
        page_size=20,
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency(address: str, client: Elasticsearch, alias: str, iterations: int) -> dict[str, float]:
    raw_body = _raw_query(alias)
    request = _service_request()
    service_ms: list[float] = []
    raw_ms: list[float] = []
    noop_ms: list[float] = []
    check = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(20):  # warm both paths: connections, caches, JIT
            stub.SearchImages(request)
            client.search(**raw_body)
            health.Check(check)
        service_total = stub.SearchImages(request).total_size
        raw_total = client.search(**raw_body)["hits"]["total"]["value"]
        assert service_total == raw_total, (service_total, raw_total)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("filtered search with counts", total=iterations)
            for _ in range(iterations):  # interleaved, so drift affects both alike
                t0 = time.perf_counter()
                stub.SearchImages(request)
                t1 = time.perf_counter()
                client.search(**raw_body)
                t2 = time.perf_counter()
                health.Check(check)
                t3 = time.perf_counter()
                service_ms.append((t1 - t0) * 1000)
                raw_ms.append((t2 - t1) * 1000)
                noop_ms.append((t3 - t2) * 1000)
                progress.advance(task)
    return {
        "service_p50_ms": statistics.median(service_ms),
        "raw_p50_ms": statistics.median(raw_ms),
        "service_p99_ms": _percentile(service_ms, 0.99),
        "raw_p99_ms": _percentile(raw_ms, 0.99),
        "noop_p50_ms": statistics.median(noop_ms),
        "matching_docs": float(service_total),
    }


def _paging(address: str, originals: set[str], new_docs: int) -> dict[str, int]:
    seen: list[str] = []
    pages = 0
    stop = threading.Event()
    added = 0

    def writer() -> None:
        nonlocal added
        with grpc.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for start in range(0, new_docs, 50):
                # Spread over the whole time range: before and after the cursor.
                docs = [_doc(i, "late")[0] for i in range(start, min(start + 50, new_docs))]
                stub.IndexImages(search_pb2.IndexImagesRequest(documents=docs))
                added += len(docs)
                if stop.wait(0.02):
                    return

    with grpc.insecure_channel(address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        request = search_pb2.SearchImagesRequest(page_size=1000)
        thread = threading.Thread(target=writer)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("paging with the cursor", total=len(originals))
            while True:
                reply = stub.SearchImages(request)
                pages += 1
                if pages == 1:
                    thread.start()  # documents arrive while the cursor walks
                seen.extend(d.name for d in reply.documents)
                progress.update(task, completed=len(seen))
                if not reply.next_page_token:
                    break
                request.page_token = reply.next_page_token
        stop.set()
        thread.join()
    duplicates = len(seen) - len(set(seen))
    missing = len(originals - set(seen))
    return {"duplicates": duplicates, "missing": missing, "pages": pages, "added": added}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 documents, under a minute")
    parser.add_argument("--docs", type=int, help="documents to index (default 100,000)")
    args = parser.parse_args()
    n = args.docs or (5_000 if args.quick else 100_000)
    iterations = 100 if args.quick else 300
    new_docs = 1_000

    started_es = _ensure_es()
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    raw_prefix = f"{prefix}-raw"
    client = Elasticsearch(ES_URL, request_timeout=120)
    port = free_loopback_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "IMAGEMESH_SEARCH__BACKEND": "elasticsearch",
        "IMAGEMESH_SEARCH__ELASTICSEARCH__URL": ES_URL,
        "IMAGEMESH_SEARCH__ELASTICSEARCH__INDEX_PREFIX": prefix,
        "IMAGEMESH_SERVER__LOG_LEVEL": "WARNING",
        "IMAGEMESH_SERVER__ACCESS_LOG": "false",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "imagemesh", "serve", "search", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=sys.stderr,
    )
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the search service did not start")
                time.sleep(0.2)

        console.print(f"generating {n:,} documents")
        pairs = [_doc(i) for i in range(n)]
        docs = [d for d, _ in pairs]
        sources = [s for _, s in pairs]
        batches = [docs[i : i + BATCH] for i in range(0, n, BATCH)]

        # The raw index gets exactly the service's template (mapping and settings).
        template = index_template(raw_prefix, shards=1, replicas=0)
        client.indices.put_index_template(name=template_name(raw_prefix), **template)
        client.indices.create(index=index_name(raw_prefix))

        service_s = asyncio.run(_service_bulk(address, batches, "images", "IndexImages"))
        console.print(f"service: {n / service_s:,.0f} docs/s")
        raw_s = _raw_bulk(client, index_name(raw_prefix), sources)
        console.print(f"raw helpers.bulk: {n / raw_s:,.0f} docs/s")

        preds = [_prediction(i, d.name) for i, d in enumerate(docs)]
        pred_batches = [preds[i : i + BATCH] for i in range(0, n, BATCH)]
        pred_s = asyncio.run(
            _service_bulk(address, pred_batches, "predictions", "IndexPredictions")
        )
        console.print(f"service predictions: {n / pred_s:,.0f}/s")
        client.indices.refresh(index=f"{prefix}-images")

        lat = _latency(address, client, f"{prefix}-images", iterations)
        console.print(
            f"latency p50 service {lat['service_p50_ms']:.2f} ms vs raw {lat['raw_p50_ms']:.2f} ms"
        )
        paging = _paging(address, {d.name for d in docs}, new_docs)
        console.print(f"paging: {paging}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        for p in (prefix, raw_prefix):
            names = list(client.indices.get(index=f"{p}-images-v*", expand_wildcards="all"))
            if names:
                client.indices.delete(index=",".join(names))
            client.options(ignore_status=404).indices.delete_index_template(name=template_name(p))
        client.close()
        if started_es:
            subprocess.run(
                [str(ROOT / "deploy" / "local" / "engines.sh"), "down"],
                env={**os.environ, "ENGINES": "es"},
                check=False,
                stdout=sys.stderr,
            )

    result = {
        "bench": "search",
        "quick": args.quick,
        "docs": n,
        "ratio_bulk_index": round((n / service_s) / (n / raw_s), 3),
        "service_docs_per_s": round(n / service_s),
        "raw_docs_per_s": round(n / raw_s),
        "service_predictions_per_s": round(n / pred_s),
        "p50_overhead_ms": round(lat["service_p50_ms"] - lat["raw_p50_ms"], 3),
        "p99_overhead_ms": round(lat["service_p99_ms"] - lat["raw_p99_ms"], 3),
        "service_p50_ms": round(lat["service_p50_ms"], 3),
        "raw_p50_ms": round(lat["raw_p50_ms"], 3),
        "service_p99_ms": round(lat["service_p99_ms"], 3),
        "raw_p99_ms": round(lat["raw_p99_ms"], 3),
        "grpc_noop_p50_ms": round(lat["noop_p50_ms"], 3),
        "query_matches": int(lat["matching_docs"]),
        "paging_duplicates": paging["duplicates"],
        "paging_missing": paging["missing"],
        "paging_pages": paging["pages"],
        "paging_docs_added_meanwhile": paging["added"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
