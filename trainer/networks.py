"""Training on pixels: the seed's basic CNN baseline, and fine-tuning the whole classifier.

Both take raw RGB pixels in [0, 255] (scaling is the network's first layer), like every model
the inference service serves, and return a model mapping pixels to class probabilities. Both
train with Keras `fit` (the per-batch overhead is small next to the convolutions), seeded,
with early stopping on validation accuracy restoring the best epoch's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BASIC_CNN_ARCHITECTURE",
    "FINE_TUNED_ARCHITECTURE",
    "PixelTrainConfig",
    "PixelTrainResult",
    "build_basic_cnn",
    "train_on_pixels",
]

BASIC_CNN_ARCHITECTURE = "basic-cnn"
FINE_TUNED_ARCHITECTURE = "densenet121+dense-softmax (fine-tuned)"


@dataclass(frozen=True)
class PixelTrainConfig:
    """How a network is trained on pixels."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 4
    seed: int = 0


@dataclass
class PixelTrainResult:
    """The trained model (best epoch's weights) and its history."""

    model: Any
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


def build_basic_cnn(
    num_classes: int, input_size: tuple[int, int] = (32, 32), *, seed: int = 0
) -> Any:
    """A small CNN: three conv blocks (32, 64, 128 filters), global pooling, a softmax layer."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    height, width = input_size
    inputs = keras.Input((height, width, 3), name="pixels", dtype="float32")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    # BatchNormalization momentum 0.9 (Keras's default is 0.99): the running statistics used
    # at validation catch up within tens of steps, so short runs validate meaningfully.
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2, seed=seed)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="basic_cnn")


def train_on_pixels(
    model: Any,
    train_pixels: np.ndarray,
    train_labels: np.ndarray,
    val_pixels: np.ndarray,
    val_labels: np.ndarray,
    *,
    config: PixelTrainConfig | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> PixelTrainResult:
    """Trains every layer of `model` on (pixels, integer labels); best epoch's weights kept."""
    import keras

    config = config or PixelTrainConfig()
    keras.utils.set_random_seed(config.seed)
    model.trainable = True
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
    )

    class _Report(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            if on_epoch is not None:
                on_epoch(epoch + 1, dict(logs or {}))

    history = model.fit(
        train_pixels.astype(np.float32),
        train_labels,
        validation_data=(val_pixels.astype(np.float32), val_labels),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy",
                mode="max",
                patience=config.patience,
                restore_best_weights=True,
            ),
            _Report(),
        ],
    )
    accuracies = [float(v) for v in history.history.get("val_accuracy", [])]
    best = int(np.argmax(accuracies)) if accuracies else 0
    rows = [{k: float(v[i]) for k, v in history.history.items()} for i in range(len(accuracies))]
    return PixelTrainResult(
        model=model,
        best_epoch=best + 1,
        best_val_accuracy=accuracies[best] if accuracies else 0.0,
        history=rows,
    )
