"""Evaluating a classifier from its predictions: accuracy, per-class scores, confusion matrix.

Everything is computed from two arrays, the true class indices and the predicted probabilities,
so stored predictions can be evaluated again later and must give the same numbers. The
confusion matrix counts rows = true class, columns = predicted class. A class never predicted
has precision 0 (not NaN), a class absent from the truth has recall 0, so the JSON is always
valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ClassScores", "Evaluation", "evaluate", "plot_confusion"]


@dataclass(frozen=True)
class ClassScores:
    """Precision, recall, F1 and support (true examples) of one class."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    """The evaluation of predictions against the truth."""

    class_names: tuple[str, ...]
    accuracy: float
    macro_f1: float
    per_class: tuple[ClassScores, ...]
    # confusion[i][j]: examples of true class i predicted as class j.
    confusion: tuple[tuple[int, ...], ...]
    count: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document."""
        return {
            "class_names": list(self.class_names),
            "count": self.count,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {
                s.name: {
                    "precision": s.precision,
                    "recall": s.recall,
                    "f1": s.f1,
                    "support": s.support,
                }
                for s in self.per_class
            },
            "confusion_matrix": [list(row) for row in self.confusion],
        }

    def to_json(self) -> bytes:
        """The document as indented JSON bytes."""
        return json.dumps(self.to_dict(), indent=2).encode()

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        """Flat metrics for a model version's metadata."""
        flat = {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}
        for s in self.per_class:
            flat[f"{prefix}f1_{s.name}"] = s.f1
        return flat


def evaluate(
    true_labels: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...]
) -> Evaluation:
    """Scores `probabilities` (n, classes) against `true_labels` (n,) of class indices."""
    k = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape[1] != k:
        raise ValueError(f"probabilities must be (n, {k}), got {probabilities.shape}")
    if true_labels.shape != (probabilities.shape[0],):
        raise ValueError("one true label per row of probabilities is needed")
    if true_labels.size and (true_labels.min() < 0 or true_labels.max() >= k):
        raise ValueError(f"true labels must be class indices in [0, {k})")
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (true_labels.astype(np.int64), predicted), 1)
    n = int(true_labels.shape[0])
    correct = np.diag(confusion)
    predicted_totals = confusion.sum(axis=0)
    true_totals = confusion.sum(axis=1)
    scores = []
    for i, name in enumerate(class_names):
        precision = float(correct[i] / predicted_totals[i]) if predicted_totals[i] else 0.0
        recall = float(correct[i] / true_totals[i]) if true_totals[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append(ClassScores(name, precision, recall, f1, int(true_totals[i])))
    return Evaluation(
        class_names=tuple(class_names),
        accuracy=float(correct.sum() / n) if n else 0.0,
        macro_f1=float(np.mean([s.f1 for s in scores])) if scores else 0.0,
        per_class=tuple(scores),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        count=n,
    )


def plot_confusion(evaluation: Evaluation, path: Path, *, title: str = "") -> Path:
    """Draws the confusion matrix (row-normalised colours, counts written in) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in servers and Spark drivers
    import matplotlib.pyplot as plt

    matrix = np.array(evaluation.confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    k = len(evaluation.class_names)
    size = max(5.0, 1.0 + 0.9 * k)
    fig, (ax, bars) = plt.subplots(
        1, 2, figsize=(size * 1.9, size), gridspec_kw={"width_ratios": [1.25, 1]}
    )
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), evaluation.class_names, rotation=35, ha="right")
    ax.set_yticks(range(k), evaluation.class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.55 else "black"
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title("confusion matrix")
    # Per-class precision / recall / F1 side by side: where the errors come from at a glance.
    positions = np.arange(k)
    width = 0.27
    for offset, (label, values) in enumerate(
        (
            ("precision", [s.precision for s in evaluation.per_class]),
            ("recall", [s.recall for s in evaluation.per_class]),
            ("F1", [s.f1 for s in evaluation.per_class]),
        )
    ):
        bars.bar(positions + (offset - 1) * width, values, width, label=label)
    bars.set_xticks(positions, evaluation.class_names, rotation=35, ha="right")
    # Zoom on the range the scores occupy, so differences between classes are visible.
    lowest = min([evaluation.accuracy] + [min(s.precision, s.recall) for s in evaluation.per_class])
    bars.set_ylim(max(0.0, np.floor((lowest - 0.1) * 10) / 10), 1.02)
    bars.axhline(evaluation.accuracy, color="grey", linestyle="--", linewidth=1)
    bars.text(
        -0.45,
        evaluation.accuracy + 0.01,
        f"accuracy {evaluation.accuracy:.1%}",
        ha="left",
        va="bottom",
        color="dimgrey",
        fontsize=9,
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
    )
    bars.legend(loc="lower left", fontsize=8)
    bars.set_title("per-class scores")
    fig.suptitle(title or f"validation: {evaluation.count} images", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
