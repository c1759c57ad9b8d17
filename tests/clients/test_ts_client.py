"""The TypeScript client, compiled from the code ts-proto generates, talks to a real mesh."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inference_service.model.registry import ModelRegistry
from storage_service.backends import open_object_store
from tests.inference_service.fixtures import (
    CLASS_NAMES,
    TinyModels,
    local_settings,
    png,
    publish,
)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ts-s3cret"


@pytest.fixture(scope="session")
def ts_client() -> Path:
    """The compiled CLI, built once per session by the same script `make ts-client` runs
    (npm ci is skipped when node_modules already matches the lock)."""
    subprocess.run(["bash", "scripts/build_ts.sh", "build"], cwd=ROOT, check=True, timeout=600)
    return ROOT / "clients" / "ts" / "dist" / "src" / "cli.js"


async def _run(cli: Path, *args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGEMESH_AUTH_TOKEN"}
    if token is not None:
        env["IMAGEMESH_AUTH_TOKEN"] = token  # the CLI's default for --token
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(cli),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _ok(cli: Path, *args: str) -> Any:
    code, out, err = await _run(cli, *args)
    assert code == 0, err
    return json.loads(out)


def _error(err: str) -> dict[str, Any]:
    """The `{"error": ...}` line a failed call prints on stderr."""
    error: dict[str, Any] = json.loads(err.strip().splitlines()[-1])["error"]
    return error


@pytest.fixture
async def mesh_with_model(tmp_path: Path, started: Any, tiny_models: TinyModels) -> tuple[str, str]:
    """Storage, search and inference in one server that asks for a token, with a model
    published; yields the address and the model version's name."""
    settings = local_settings(tmp_path)
    settings.auth_token = TOKEN
    version = publish(ModelRegistry(open_object_store(settings.storage)), tiny_models.first)
    address = await started(settings, ("storage", "search", "inference"))
    return address, version.name


async def test_ts_client_uploads_finds_and_classifies_images(
    ts_client: Path, mesh_with_model: tuple[str, str], tmp_path: Path
) -> None:
    address, model_version = mesh_with_model
    files: dict[str, tuple[str, bytes]] = {}  # path -> (label, content)
    for seed, label in ((1, "cat"), (2, "cat"), (3, "dog")):
        file = tmp_path / f"{label}-{seed}.png"
        content = png(seed)
        file.write_bytes(content)
        files[str(file)] = (label, content)

    names = set()
    for label in ("cat", "dog"):
        paths = [p for p, (lab, _) in files.items() if lab == label]
        reply = await _ok(
            ts_client, "--address", address, "upload", *paths, "--dataset", "ts", "--label", label
        )
        for path, image in zip(paths, reply["images"], strict=True):
            content = files[path][1]
            assert image["name"] == "images/" + hashlib.sha256(content).hexdigest()
            assert image["sizeBytes"] == len(content)
            assert (image["width"], image["height"], image["label"]) == (40, 48, label)
            assert image["duplicate"] is False
            names.add(image["name"])
    again = await _ok(ts_client, "--address", address, "upload", next(iter(files)))
    assert again["images"][0]["duplicate"] is True

    # Storage reports uploads to search asynchronously (its outbox): wait until all arrive.
    found: dict[str, Any] = {}
    for _ in range(100):
        found = await _ok(ts_client, "--address", address, "search", "--dataset", "ts")
        if found["totalSize"] == len(names):
            break
        await asyncio.sleep(0.1)
    assert {d["name"] for d in found["documents"]} == names
    assert found["counts"] == {"cat": 2, "dog": 1}
    dogs = await _ok(ts_client, "--address", address, "search", "--label", "dog")
    assert [d["label"] for d in dogs["documents"]] == ["dog"]

    result = await _ok(
        ts_client, "--address", address, "classify", next(iter(files)), "--top-k", "2"
    )
    assert result["modelVersion"] == model_version
    assert len(result["topClasses"]) == 2
    assert {c["className"] for c in result["topClasses"]} <= set(CLASS_NAMES)
    assert result["topClasses"][0]["probability"] >= result["topClasses"][1]["probability"]


async def test_ts_client_prints_the_status_code_of_a_failed_call(
    ts_client: Path, mesh_with_model: tuple[str, str], tmp_path: Path
) -> None:
    address, _ = mesh_with_model
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")

    code, out, err = await _run(ts_client, "--address", address, "classify", str(bad))
    assert (code, out) == (1, "")
    assert _error(err)["code"] == "INVALID_ARGUMENT"

    code, _, err = await _run(ts_client, "--address", address, "search", token=None)
    assert code == 1
    assert _error(err)["code"] == "UNAUTHENTICATED"
    code, _, _ = await _run(ts_client, "--address", address, "--token", TOKEN, "search", token=None)
    assert code == 0


async def test_ts_client_reports_an_unreachable_server(ts_client: Path) -> None:
    code, _, err = await _run(ts_client, "--address", "127.0.0.1:1", "search")
    assert code == 1
    assert _error(err)["code"] == "UNAVAILABLE"


async def test_ts_client_rejects_a_wrong_command_line(ts_client: Path) -> None:
    code, out, err = await _run(ts_client, "frobnicate")
    assert (code, out) == (2, "")
    assert "unknown command" in err
