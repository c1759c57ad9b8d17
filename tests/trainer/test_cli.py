"""`imagemesh dataset generate|import` and `imagemesh train` against the one-process mesh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imagemesh.cli import main
from imagemesh.config import Settings
from trainer.datasets import generate_array, to_png


async def test_generate_import_train_and_serve(
    mesh: tuple[object, str],
    embedded_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, address = mesh
    monkeypatch.setenv("IMAGEMESH_STORAGE__LOCAL_ROOT", str(embedded_settings.storage.local_root))
    monkeypatch.setenv("IMAGEMESH_SEARCH__SQLITE_PATH", str(embedded_settings.search.sqlite_path))
    monkeypatch.setenv("COLUMNS", "200")

    def cli(*args: str) -> int:
        return main([*args, "--address", address])

    # An empty dataset is refused with what to do.
    assert await asyncio.to_thread(cli, "train", "--dataset", "nothing", "--no-spark") == 2
    assert "imagemesh dataset generate" in capsys.readouterr().err

    generate = ("dataset", "generate", "--count", "60", "--dataset", "shapes", "--seed", "2")
    assert await asyncio.to_thread(cli, *generate) == 0
    assert "60 stored" in capsys.readouterr().out
    assert await asyncio.to_thread(cli, *generate) == 0
    assert "60 already there" in capsys.readouterr().out

    folder = tmp_path / "folder"
    for index in range(6):
        image = generate_array(index, seed=5)
        (folder / image.label).mkdir(parents=True, exist_ok=True)
        (folder / image.label / f"{index}.png").write_bytes(to_png(image.pixels))
    imported = ("dataset", "import", str(folder), "--dataset", "imported")
    assert await asyncio.to_thread(cli, *imported) == 0
    assert "6 stored" in capsys.readouterr().out
    assert await asyncio.to_thread(cli, "dataset", "import", str(tmp_path / "none")) == 2

    train = ("train", "--dataset", "shapes", "--architecture", "basic-cnn", "--no-spark")
    code = await asyncio.to_thread(cli, *train, "--pixel-epochs", "1", "--select")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "published models/default/versions/" in out
    assert "InferenceService now serves models/default/versions/" in out
    for stage in ("clean", "extract", "train", "evaluate", "publish"):
        assert stage in out
    # The default recipe publishes a head on stored DenseNet121 weights (format 2): the
    # service loads and serves that too.
    head_only = ("train", "--dataset", "shapes", "--epochs", "1", "--no-spark", "--select")
    assert await asyncio.to_thread(cli, *head_only) == 0
    out = capsys.readouterr().out
    published = out.split("InferenceService now serves ")[1].split()[0]
    sample = tmp_path / "sample.png"
    sample.write_bytes(to_png(generate_array(0, seed=9).pixels))
    assert await asyncio.to_thread(cli, "classify", str(sample)) == 0
    served = capsys.readouterr().out
    assert published.startswith("models/default/versions/")
    assert published in served
    # Bad training input after a good call: a clear message, and the mesh keeps serving.
    bad = await asyncio.to_thread(
        cli,
        "train",
        "--dataset",
        "imported",
        "--fine-tune",
        "--architecture",
        "basic-cnn",
        "--no-spark",
    )
    assert bad == 2
    assert "--fine-tune applies to densenet121 only" in capsys.readouterr().err
    assert await asyncio.to_thread(cli, "models", "list") == 0
