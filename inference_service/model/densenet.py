"""DenseNet121 backbone + Dense softmax head, with the backbone's preprocessing built in.

Every network here takes raw RGB pixels: float32 of shape (batch, height, width, 3) with values
in [0, 255]. The first layers apply DenseNet's own preprocessing (scale to [0, 1], subtract the
ImageNet mean, divide by its standard deviation: `keras.applications.densenet.preprocess_input`)
so that the service, the trainer and any in-process reference feed the model the same way and
cannot drift apart; the preprocessing is saved inside the `.keras` artifact with built-in layers
only, so loading one needs no custom objects.

- `build_backbone`: pixels -> 1024 features (global average pooling), for feature extraction.
- `build_head`: 1024 features -> class probabilities (one Dense layer with softmax).
- `build_classifier`: the two composed; the model the service serves.

TensorFlow and Keras are imported inside the functions: importing this module stays cheap, and
code that forks (Spark workers) can import TensorFlow only where it builds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ARCHITECTURE",
    "FEATURE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREPROCESSING",
    "build_backbone",
    "build_classifier",
    "build_head",
    "build_untrained_classifier",
    "preprocess_reference",
    "weights_origin",
]

ARCHITECTURE = "densenet121+dense-softmax"
PREPROCESSING = "densenet"
FEATURE_SIZE = 1024
# DenseNet's preprocessing ("torch" mode of keras.applications.imagenet_utils).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DenseNet121's five pooling stages halve the input five times: below 32 pixels the last
# feature map would be empty.
MIN_INPUT_SIZE = 32


def weights_origin(weights: str | Path | None) -> str:
    """How a model's metadata names its backbone weights: `imagenet`, a file name, or `none`."""
    if weights is None or str(weights).lower() == "none":
        return "none"
    if str(weights) == "imagenet":
        return "imagenet"
    return Path(weights).name


def _preprocessing_layers(inputs: Any) -> Any:
    import keras

    scaled = keras.layers.Rescaling(1.0 / 255.0, name="densenet_scale")(inputs)
    return keras.layers.Normalization(
        mean=list(IMAGENET_MEAN),
        variance=[s * s for s in IMAGENET_STD],
        name="densenet_normalize",
    )(scaled)


def build_backbone(
    input_size: tuple[int, int] = (32, 32), weights: str | Path | None = None
) -> Any:
    """A Keras model: pixels (batch, h, w, 3) in [0, 255] -> features (batch, 1024).

    `weights` is `"imagenet"` (Keras downloads them when online), a path to a weights file
    for DenseNet121 without its top, or None for a random initialisation.
    """
    import keras

    height, width = input_size
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(f"DenseNet121 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
    if (
        weights is not None
        and str(weights) not in {"imagenet", "none"}
        and not Path(weights).is_file()
    ):
        raise FileNotFoundError(f"backbone weights file {weights} does not exist")
    keras_weights = None if weights is None or str(weights) == "none" else str(weights)
    inputs = keras.Input((height, width, 3), name="pixels", dtype="float32")
    densenet = keras.applications.DenseNet121(
        include_top=False,
        weights=keras_weights,
        input_shape=(height, width, 3),
        pooling="avg",
    )
    features = densenet(_preprocessing_layers(inputs))
    return keras.Model(inputs, features, name="densenet121_backbone")


def build_head(num_classes: int, *, seed: int | None = None) -> Any:
    """A Keras model: features (batch, 1024) -> class probabilities (batch, num_classes)."""
    import keras

    if num_classes < 1:
        raise ValueError("a head needs at least one class")
    inputs = keras.Input((FEATURE_SIZE,), name="features", dtype="float32")
    probabilities = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name="probabilities",
    )(inputs)
    return keras.Model(inputs, probabilities, name="dense_softmax_head")


def build_classifier(backbone: Any, head: Any) -> Any:
    """The served model: pixels -> probabilities, sharing the layers of `backbone` and `head`.

    Training the head (on features the backbone extracted) trains the classifier's head too.
    """
    import keras

    inputs = keras.Input(backbone.input_shape[1:], name="pixels", dtype="float32")
    outputs = head(backbone(inputs))
    return keras.Model(inputs, outputs, name="densenet121_classifier")


def build_untrained_classifier(
    num_classes: int,
    input_size: tuple[int, int] = (32, 32),
    *,
    weights: str | Path | None = None,
    seed: int | None = None,
) -> Any:
    """A classifier whose head is untrained (and backbone too, with `weights=None`).

    Its answers mean nothing; it exists so that a fresh deployment, the demo and tests can
    serve something before the trainer publishes a real model.
    """
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    return build_classifier(build_backbone(input_size, weights), build_head(num_classes, seed=seed))


def preprocess_reference(pixels: np.ndarray) -> np.ndarray:
    """Keras's own DenseNet preprocessing of raw pixels, to check the built-in layers against."""
    import keras

    result: np.ndarray = keras.applications.densenet.preprocess_input(
        pixels.astype("float32", copy=True)
    )
    return result
