"""Head training on features: learns a separable problem, keeps the best epoch, is seeded."""

from __future__ import annotations

import numpy as np

from trainer.head import HeadConfig, train_head


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    centres = np.random.default_rng(99).normal(0, 1, (3, 1024)).astype(np.float32)
    features = centres[labels] + rng.normal(0, 1.0, (n, 1024)).astype(np.float32)
    return features, labels


def test_head_learns_separable_features_and_reports_each_epoch() -> None:
    x, y = _blobs(600, 1)
    xv, yv = _blobs(200, 2)
    seen: list[int] = []
    result = train_head(
        x,
        y,
        xv,
        yv,
        num_classes=3,
        config=HeadConfig(epochs=4, batch_size=128),
        on_epoch=lambda s: seen.append(s.epoch),
    )
    assert seen == [1, 2, 3, 4]
    assert result.best_val_accuracy > 0.95
    predicted = result.head.predict(xv, verbose=0).argmax(axis=1)
    # The returned head carries the best epoch's weights.
    assert np.mean(predicted == yv) == result.best_val_accuracy


def test_same_seed_gives_the_same_history() -> None:
    x, y = _blobs(300, 3)
    xv, yv = _blobs(100, 4)
    config = HeadConfig(epochs=2, batch_size=64, seed=7)
    first = train_head(x, y, xv, yv, num_classes=3, config=config)
    second = train_head(x, y, xv, yv, num_classes=3, config=config)
    assert [s.val_accuracy for s in first.history] == [s.val_accuracy for s in second.history]
    np.testing.assert_allclose(
        first.head.get_weights()[0], second.head.get_weights()[0], rtol=1e-4, atol=1e-5
    )


def test_early_stopping_stops_after_patience_without_improvement() -> None:
    x, y = _blobs(300, 5)
    xv, yv = _blobs(100, 6)
    result = train_head(
        x, y, xv, yv, num_classes=3, config=HeadConfig(epochs=50, batch_size=64, patience=2)
    )
    # Perfect accuracy is reached early, cannot improve, and training stops 2 epochs later.
    assert len(result.history) == result.best_epoch + 2 < 50
