"""`imagemesh search [TEXT] [filters...]`: find images and count them, as a table or JSON.

Talks to a running SearchService over gRPC (default the local mesh at 127.0.0.1:50050), so
it needs no local configuration. `--all` follows the cursor to the last page; `--json`
prints one JSON object (documents, total, counts, next page token) for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.mesh import DEFAULT_PORTS
from imagemesh.search.v1 import search_pb2, search_pb2_grpc

__all__ = ["register", "run"]


_COUNT_BY = {
    "label": search_pb2.COUNT_FIELD_LABEL,
    "predicted-class": search_pb2.COUNT_FIELD_PREDICTED_CLASS,
    "dataset": search_pb2.COUNT_FIELD_DATASET,
}


def register(commands: Any) -> dict[str, Any]:
    """Adds `search` to the command line."""
    p = commands.add_parser("search", help="find images by metadata, predictions and text")
    p.add_argument("text", nargs="?", default="", help="literal words of filenames and tags")
    p.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORTS['all']}", help="host:port")
    p.add_argument("--dataset", action="append", default=[], help="repeatable (OR)")
    p.add_argument("--label", action="append", default=[], help="repeatable (OR)")
    p.add_argument("--tag", action="append", default=[], help="repeatable (all required)")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", action="append", default=[], help="images/{sha256}, repeatable")
    p.add_argument("--model-version", default="", help="models/{model}/versions/{version}")
    p.add_argument("--class", dest="classes", action="append", default=[], help="predicted")
    p.add_argument("--min-confidence", type=float)
    p.add_argument("--max-confidence", type=float)
    p.add_argument("--since", help="created at or after (ISO 8601)")
    p.add_argument("--until", help="created at or before (ISO 8601)")
    p.add_argument("--order-by", default="", help="e.g. 'confidence desc, filename'")
    p.add_argument("--page-size", type=int, default=20)
    p.add_argument("--page-token", default="")
    p.add_argument("--all", action="store_true", help="follow the cursor to the last page")
    p.add_argument("--count-by", choices=sorted(_COUNT_BY))
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    return {"search": run}


def _timestamp(text: str, flag: str) -> Timestamp:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"imagemesh search: {flag} must be ISO 8601, got {text!r}") from None
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def build_request(args: argparse.Namespace) -> search_pb2.SearchImagesRequest:
    """The SearchImages request the arguments describe."""
    flt = search_pb2.ImageFilter(
        datasets=args.dataset, labels=args.label, tags=args.tag, names=args.name
    )
    for pair in args.attr:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"imagemesh search: --attr takes KEY=VALUE, got {pair!r}")
        flt.attributes[key] = value
    if args.since or args.until:
        if args.since:
            flt.create_time.start_time.CopyFrom(_timestamp(args.since, "--since"))
        if args.until:
            flt.create_time.end_time.CopyFrom(_timestamp(args.until, "--until"))
    if (
        args.model_version
        or args.classes
        or args.min_confidence is not None
        or (args.max_confidence is not None)
    ):
        pred = flt.prediction
        pred.model_version = args.model_version
        pred.classes.extend(args.classes)
        if args.min_confidence is not None:
            pred.min_confidence = args.min_confidence
        if args.max_confidence is not None:
            pred.max_confidence = args.max_confidence
    return search_pb2.SearchImagesRequest(
        filter=flt,
        text=args.text,
        order_by=args.order_by,
        page_size=args.page_size,
        page_token=args.page_token,
        count_by=_COUNT_BY[args.count_by] if args.count_by else search_pb2.COUNT_FIELD_UNSPECIFIED,
    )


def _best(doc: search_pb2.ImageDocument) -> str:
    if not doc.predictions:
        return ""
    p = max(doc.predictions, key=lambda p: p.confidence)
    return f"{p.top_class} {p.confidence:.2f} ({p.model_version.rsplit('/', 1)[-1]})"


def _print_tables(console: Console, replies: list[search_pb2.SearchImagesResponse]) -> None:
    table = Table(title=f"{replies[0].total_size} matching images")
    for column in ("name", "filename", "dataset", "label", "tags", "best prediction", "created"):
        table.add_column(column)
    for reply in replies:
        for d in reply.documents:
            table.add_row(
                d.name[:19] + "…",
                d.filename,
                d.dataset,
                d.label,
                ", ".join(d.tags),
                _best(d),
                d.create_time.ToDatetime().isoformat(timespec="seconds"),
            )
    console.print(table)
    if replies[0].counts:
        counts = Table(title="counts")
        counts.add_column("value")
        counts.add_column("images", justify="right")
        for c in replies[0].counts:
            counts.add_row(c.value, str(c.count))
        console.print(counts)
    if replies[-1].next_page_token:
        console.print(f"next page: --page-token {replies[-1].next_page_token}")


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Runs the search; 1 with the server's message when it refuses or fails."""
    request = build_request(args)
    replies: list[search_pb2.SearchImagesResponse] = []
    console = Console(stderr=args.json)
    try:
        assert settings is not None
        with open_sync_channel(args.address, settings) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            with console.status("searching…") as status:
                while True:
                    reply = stub.SearchImages(request, timeout=args.timeout)
                    replies.append(reply)
                    if not (args.all and reply.next_page_token):
                        break
                    request.page_token = reply.next_page_token
                    fetched = sum(len(r.documents) for r in replies)
                    status.update(f"fetched {fetched} of {reply.total_size}…")
    except grpc.RpcError as exc:
        print(f"imagemesh search: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        out = {
            "total_size": replies[0].total_size,
            "documents": [
                MessageToDict(d, preserving_proto_field_name=True)
                for r in replies
                for d in r.documents
            ],
            "counts": [{"value": c.value, "count": c.count} for c in replies[0].counts],
            "next_page_token": replies[-1].next_page_token,
        }
        print(json.dumps(out, indent=2))
    else:
        _print_tables(console, replies)
    return 0
