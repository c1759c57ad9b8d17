"""Top-k ranking of a model's probabilities: both sorting paths, ties in class order."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.service import _PYTHON_SORT_CLASSES, _rank


def _expected(probabilities: np.ndarray, k: int) -> list[int]:
    # Descending probability; equal probabilities in the model's class order.
    return sorted(range(len(probabilities)), key=lambda i: (-probabilities[i], i))[:k]


@pytest.mark.parametrize("classes", [5, _PYTHON_SORT_CLASSES, _PYTHON_SORT_CLASSES + 1, 1000])
def test_top_k_is_the_most_probable_classes_ties_in_class_order(classes: int) -> None:
    rng = np.random.default_rng(classes)
    # Few distinct values, so that many classes tie.
    probabilities = rng.integers(0, 4, classes).astype(np.float32) / 8
    names = [f"class{i}" for i in range(classes)]
    for k in (1, 3, classes):
        ranked = _rank(probabilities, names, k)
        assert [c.index for c in ranked] == _expected(probabilities, k)
        assert [c.name for c in ranked] == [names[c.index] for c in ranked]
        assert [c.probability for c in ranked] == [float(probabilities[c.index]) for c in ranked]
        assert all(isinstance(c.probability, float) for c in ranked)
