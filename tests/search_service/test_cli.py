"""`imagemesh search` against a running search service (SQLite), table and JSON output."""

from __future__ import annotations

import asyncio
import json

import grpc

from imagemesh.cli import main
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from tests.search_service.corpus import V1, build_corpus
from tests.search_service.servers import WAIT, running_server, search_settings


async def test_search_command_prints_json_and_tables_and_fails_clearly(tmp_path, capsys):
    settings = search_settings("sqlite", tmp_path)
    corpus = build_corpus()
    async with running_server(settings) as address, grpc.aio.insecure_channel(address) as ch:
        stub = search_pb2_grpc.SearchServiceStub(ch)
        await stub.IndexImages(
            search_pb2.IndexImagesRequest(documents=[d.proto() for d in corpus], refresh=WAIT)
        )
        await stub.IndexPredictions(
            search_pb2.IndexPredictionsRequest(
                predictions=[p for d in corpus for p in d.prediction_protos()], refresh=WAIT
            )
        )
        reply = await stub.SearchImages(search_pb2.SearchImagesRequest(page_size=1))
        base = ["search", "--address", address]

        args = [*base, "cat", "--model-version", V1, "--count-by", "predicted-class", "--json"]
        code = await asyncio.to_thread(main, args)
        out = json.loads(capsys.readouterr().out)
        assert code == 0
        assert out["total_size"] == len(out["documents"]) > 0
        assert all("cat" in d["filename"].lower() for d in out["documents"])
        assert {c["value"] for c in out["counts"]} <= {"cat", "dog", "bird", "car", "tree"}

        code = await asyncio.to_thread(main, [*base, "--all", "--page-size", "7", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0
        assert len(out["documents"]) == reply.total_size == len(corpus)
        assert out["next_page_token"] == ""

        code = await asyncio.to_thread(main, [*base, "--count-by", "label", "--page-size", "3"])
        text = capsys.readouterr().out
        assert code == 0
        assert f"{len(corpus)} matching images" in text
        assert "counts" in text

        code = await asyncio.to_thread(main, [*base, "--order-by", "width"])
        err = capsys.readouterr().err
        assert code == 1
        assert "INVALID_ARGUMENT" in err
        assert "unknown field 'width'" in err
