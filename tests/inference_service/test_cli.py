"""`imagemesh models ...` and `imagemesh classify` against a running InferenceService."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imagemesh.cli import main
from tests.inference_service.fixtures import local_settings, png


async def test_publish_random_select_list_and_classify(
    tmp_path: Path,
    started,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_models,  # builds the session's models first: TensorFlow's threads are set once
) -> None:
    settings = local_settings(tmp_path)
    address = await started(settings)
    monkeypatch.setenv("IMAGEMESH_STORAGE__LOCAL_ROOT", str(settings.storage.local_root))
    monkeypatch.setenv("COLUMNS", "200")

    def cli(*args: str) -> int:
        return main([*args])

    # Nothing published yet: classify fails and says how to publish.
    image = tmp_path / "one.png"
    image.write_bytes(png(1))
    assert await asyncio.to_thread(cli, "classify", str(image), "--address", address) == 1
    assert "publish-random" in capsys.readouterr().err

    code = await asyncio.to_thread(
        cli,
        "models",
        "publish-random",
        "--classes",
        "a,b,c",
        "--seed",
        "3",
        "--select",
        "--address",
        address,
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out
    assert "now serving models/default/versions/" in out

    assert await asyncio.to_thread(cli, "models", "list", "--address", address) == 0
    out = capsys.readouterr().out
    assert "models/default/versions/" in out
    assert "a, b, c" in out

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code = await asyncio.to_thread(cli, "classify", str(image), str(bad), "--address", address)
    assert code == 1  # one file failed
    out = capsys.readouterr().out
    assert "INVALID_ARGUMENT" in out
    assert await asyncio.to_thread(cli, "classify", str(image), "--address", address) == 0

    code = await asyncio.to_thread(
        cli, "models", "select", "models/default/versions/nope", "--address", address
    )
    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err
