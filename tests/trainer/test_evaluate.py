"""Evaluation numbers: checked against hand-computed values, and the PNG is a real image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.evaluate import evaluate, plot_confusion

NAMES = ("a", "b", "c")


def _one_hot(indices: list[int]) -> np.ndarray:
    probabilities = np.full((len(indices), 3), 0.1, dtype=np.float32)
    probabilities[np.arange(len(indices)), indices] = 0.8
    return probabilities


def test_scores_match_hand_computed_values() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 2, 2]
    result = evaluate(truth, _one_hot(predicted), NAMES)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.confusion == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    a, b, c = result.per_class
    assert (a.precision, a.recall, a.support) == (1.0, pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall) == (0.5, 0.5)
    assert c.precision == 0.5
    assert c.recall == 1.0
    assert c.f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert result.macro_f1 == pytest.approx(np.mean([a.f1, b.f1, c.f1]))


def test_a_class_never_predicted_scores_zero_not_nan() -> None:
    result = evaluate(np.array([0, 1, 2]), _one_hot([0, 0, 0]), NAMES)
    document = json.loads(result.to_json())
    assert document["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert document["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        evaluate(np.array([0]), np.zeros((1, 2)), NAMES)
    with pytest.raises(ValueError, match="class indices"):
        evaluate(np.array([5]), _one_hot([0]), NAMES)


def test_confusion_plot_is_a_png(tmp_path: Path) -> None:
    result = evaluate(np.array([0, 1, 2, 2]), _one_hot([0, 1, 2, 0]), NAMES)
    path = plot_confusion(result, tmp_path / "plot.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 600
        assert image.size[1] > 300
