"""The classification pipeline on a real local object store, the real model code and a
SearchService TEST DOUBLE (to count exactly what was indexed)."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.batch.indexer import GrpcPredictionIndexer
from inference_service.batch.keys import (
    image_object_key,
    input_array_name,
    prediction_array_name,
)
from inference_service.batch.pipeline import JobSpec, classify_names
from inference_service.batch.predictor import cached_predictor
from inference_service.decode import ImageLimits, decode_image
from tests.inference_service.batch.helpers import (
    MODEL_VERSION,
    load_npy,
    missing_name,
    put_garbage,
    put_images,
)


@pytest.fixture
def spec(storage_settings, search_double):
    return JobSpec(
        job_id="0000000000001-test",
        model_version=MODEL_VERSION,
        storage=storage_settings,
        search_address=search_double.address,
        top_k=3,
        batch_size=8,
        io_threads=4,
    )


def _run(spec, names, store, **kwargs):
    predictor = cached_predictor(spec.model_version, spec.storage, spec.batch_size)
    indexer = GrpcPredictionIndexer(spec.search_address)
    try:
        return classify_names(names, spec, predictor, store, indexer, **kwargs), predictor
    finally:
        indexer.close()


def test_every_image_gets_one_npy_matching_the_model_and_one_indexed_prediction(
    spec, store, search_double
):
    names = put_images(store, 21)  # not a multiple of the batch size: the last batch is padded
    outcome, predictor = _run(spec, names, store)

    assert (outcome.processed, outcome.failed, outcome.stopped) == (21, 0, False)
    pixels = np.stack(
        [
            decode_image(store.get_bytes(image_object_key(n[7:])), (32, 32), ImageLimits())
            for n in names
        ]
    )
    # Reference: the same model called on the whole set in one batch, in process.
    expected = predictor.predict(pixels)
    for name, row in zip(names, expected, strict=True):
        stored = load_npy(store.get_bytes(prediction_array_name(MODEL_VERSION, name[7:])))
        assert stored.dtype == np.float32
        assert stored.shape == (5,)
        np.testing.assert_allclose(stored, row, atol=1e-5)
        indexed = search_double.double.predictions[(name, MODEL_VERSION)]
        assert indexed.top_class == predictor.class_names[int(np.argmax(row))]
        assert len(indexed.top_classes) == 3
        assert indexed.probabilities_array == prediction_array_name(MODEL_VERSION, name[7:])
    assert set(search_double.double.index_calls.values()) == {1}


def test_a_bad_image_fails_alone_and_the_rest_go_on(spec, store, search_double):
    good = put_images(store, 5)
    garbage = put_garbage(store)
    unknown_to_search = good[0]
    search_double.double.unknown.add(unknown_to_search)
    names = [*good[:2], garbage, missing_name(), *good[2:]]

    outcome, _ = _run(spec, names, store)

    assert outcome.processed == 4
    assert outcome.failed == 3
    reasons = {f.image: (f.code, f.reason) for f in outcome.failures}
    assert reasons[garbage] == ("INVALID_ARGUMENT", "UNDECODABLE_IMAGE")
    assert reasons[missing_name()] == ("NOT_FOUND", "IMAGE_NOT_FOUND")
    assert reasons[unknown_to_search][0] == "NOT_FOUND"
    for name in good[1:]:
        assert store.exists(prediction_array_name(MODEL_VERSION, name[7:]))


def test_running_the_same_names_again_overwrites_instead_of_adding(spec, store, search_double):
    names = put_images(store, 10)
    _run(spec, names, store)
    keys_before = sorted(store.list_keys("arrays/"))
    outcome, _ = _run(spec, names, store)

    assert outcome.processed == 10
    assert sorted(store.list_keys("arrays/")) == keys_before
    assert len(keys_before) == 10
    # Upserts: the double counts calls, the real index keeps one prediction per version.
    assert len(search_double.double.predictions) == 10


def test_store_inputs_writes_the_preprocessed_input_too(spec, store):
    from dataclasses import replace

    names = put_images(store, 3)
    outcome, _ = _run(replace(spec, store_inputs=True), names, store)

    assert outcome.processed == 3
    for name in names:
        array = load_npy(store.get_bytes(input_array_name(MODEL_VERSION, name[7:])))
        assert array.shape == (32, 32, 3)
        assert array.dtype == np.float32
        assert array.min() >= 0.0
        assert array.max() <= 255.0


def test_a_stop_request_ends_after_the_batch_in_hand(spec, store):
    names = put_images(store, 40)
    calls = {"n": 0}

    def stop_after_two_batches():
        calls["n"] += 1
        return calls["n"] > 2

    outcome, _ = _run(spec, names, store, should_stop=stop_after_two_batches)

    assert outcome.stopped
    assert outcome.processed == 24  # three batches of 8 were read before the stop took effect
    written = list(store.list_keys("arrays/predictions/"))
    assert len(written) == outcome.processed
