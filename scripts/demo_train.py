"""`make demo` step for the trainer: upload a generated dataset, train, publish, serve.

Runs the real command line against the demo's mesh: `imagemesh dataset generate` (through
StorageService's bulk stream) then `imagemesh train` with the seed's basic CNN, which learns
the generated shapes in a few epochs on two cores, and `--select`, so that the classify step
that follows is answered by a trained model.
"""

from __future__ import annotations

import subprocess
import sys

from rich.console import Console

__all__ = ["step_train"]

console = Console()

DATASET = "demo-shapes"


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "imagemesh", *args], check=True)


def step_train(address: str) -> None:
    """Generates 1,000 labelled images, trains the basic CNN on them and serves it."""
    console.print(f"  uploading 1,000 generated shapes to dataset [bold]{DATASET}[/bold]")
    _cli("dataset", "generate", "--count", "1000", "--dataset", DATASET, "--address", address)
    console.print(
        "  training the basic CNN (clean on Spark local[*], train, evaluate, publish, select)"
    )
    _cli(
        "train",
        "--dataset",
        DATASET,
        "--architecture",
        "basic-cnn",
        "--pixel-epochs",
        "6",
        "--select",
        "--address",
        address,
    )
