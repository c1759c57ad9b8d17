"""The generated dataset is deterministic, balanced and varied."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from trainer.datasets import CLASS_NAMES, generate_array, generate_images, to_png


def test_an_image_depends_only_on_seed_and_index() -> None:
    a = generate_array(123, seed=4).pixels
    assert np.array_equal(a, generate_array(123, seed=4).pixels)
    assert not np.array_equal(a, generate_array(123, seed=5).pixels)
    sliced = list(generate_images(3, seed=4, start=122))
    assert np.array_equal(sliced[1].pixels, a)


def test_labels_are_balanced_over_the_five_classes() -> None:
    labels = [img.label for img in generate_images(500)]
    assert {labels.count(name) for name in CLASS_NAMES} == {100}


def test_images_are_32x32_rgb_and_not_constant() -> None:
    for img in generate_images(20):
        assert img.pixels.shape == (32, 32, 3)
        assert img.pixels.dtype == np.uint8
        assert img.pixels.std() > 10


def test_classes_differ_by_shape_not_by_colour() -> None:
    # Mean colour must not give the class away: per-class mean colours stay close together.
    means = {name: [] for name in CLASS_NAMES}
    for img in generate_images(1000):
        means[img.label].append(img.pixels.reshape(-1, 3).mean(axis=0))
    per_class = np.array([np.mean(v, axis=0) for v in means.values()])
    assert np.ptp(per_class, axis=0).max() < 25


def test_png_round_trips_the_pixels() -> None:
    img = generate_array(9)
    decoded = np.asarray(Image.open(io.BytesIO(to_png(img.pixels))))
    assert np.array_equal(decoded, img.pixels)
