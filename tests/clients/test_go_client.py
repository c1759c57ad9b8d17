"""The Go client, built from the generated Go code, talks to a real mesh."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from imagemesh.server import MeshServer

GO_MODULE = Path(__file__).resolve().parents[2] / "clients" / "go"


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `imagemesh-go` binary, built once per session (Go caches the build)."""
    binary = tmp_path_factory.mktemp("go") / "imagemesh-go"
    subprocess.run(
        ["go", "build", "-o", str(binary), "./cmd/imagemesh-go"],
        cwd=GO_MODULE,
        check=True,
        timeout=600,
    )
    return binary


async def _run(binary: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(binary), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_go_client_reads_each_services_health(
    go_client: Path, mesh: tuple[MeshServer, str]
) -> None:
    code, out, err = await _run(go_client, "health", mesh[1])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines == [
        "(server) SERVING",
        "imagemesh.storage.v1.StorageService SERVING",
        "imagemesh.search.v1.SearchService SERVING",
        "imagemesh.inference.v1.InferenceService SERVING",
    ]


async def test_go_client_reports_an_unreachable_server(go_client: Path) -> None:
    code, _, err = await _run(go_client, "health", "127.0.0.1:1")
    assert code == 1
    assert "imagemesh-go:" in err
