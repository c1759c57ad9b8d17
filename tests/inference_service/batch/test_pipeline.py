"""The classification pipeline on a real local object store, the real model code and the real
SearchService (SQLite), whose index is read back to see exactly what was indexed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from imagemesh.errors import Unavailable
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
def spec(storage_settings, search):
    return JobSpec(
        job_id="0000000000001-test",
        model_version=MODEL_VERSION,
        storage=storage_settings,
        search_address=search.address,
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
    spec, store, search
):
    names = put_images(store, 21)  # not a multiple of the batch size: the last batch is padded
    search.index_images(names)
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
    indexed = search.predictions_by(MODEL_VERSION)
    assert sorted(indexed) == sorted(names)
    for name, row in zip(names, expected, strict=True):
        stored = load_npy(store.get_bytes(prediction_array_name(MODEL_VERSION, name[7:])))
        assert stored.dtype == np.float32
        assert stored.shape == (5,)
        np.testing.assert_allclose(stored, row, atol=1e-5)
        # The image's own row, not a padding row or a neighbour's: same class and confidence.
        [prediction] = indexed[name]
        assert prediction.top_class == predictor.class_names[int(np.argmax(row))]
        assert prediction.confidence == pytest.approx(float(np.max(row)), abs=1e-5)
        assert len(prediction.top_classes) == 3
        assert prediction.probabilities_array == prediction_array_name(MODEL_VERSION, name[7:])


def test_a_bad_image_fails_alone_and_the_rest_go_on(spec, store, search):
    good = put_images(store, 5)
    garbage = put_garbage(store)
    # Stored, but search has no document for it: its prediction has nothing to attach to.
    unknown_to_search = good[0]
    search.index_images([*good[1:], garbage])
    names = [*good[:2], garbage, missing_name(), *good[2:]]

    outcome, _ = _run(spec, names, store)

    assert outcome.processed == 4
    assert outcome.failed == 3
    reasons = {f.image: (f.code, f.reason) for f in outcome.failures}
    assert reasons[garbage] == ("INVALID_ARGUMENT", "UNDECODABLE_IMAGE")
    assert reasons[missing_name()] == ("NOT_FOUND", "IMAGE_NOT_FOUND")
    assert reasons[unknown_to_search] == ("NOT_FOUND", "IMAGE_NOT_INDEXED")
    for name in good[1:]:
        assert store.exists(prediction_array_name(MODEL_VERSION, name[7:]))
    # The rest are indexed; no document was made up for the unknown image.
    assert sorted(search.predictions_by(MODEL_VERSION)) == sorted(good[1:])
    assert unknown_to_search not in search.documents()


def test_running_the_same_names_again_overwrites_instead_of_adding(spec, store, search):
    names = put_images(store, 10)
    search.index_images(names)
    _run(spec, names, store)
    keys_before = sorted(store.list_keys("arrays/"))
    outcome, _ = _run(spec, names, store)

    assert outcome.processed == 10
    assert sorted(store.list_keys("arrays/")) == keys_before
    assert len(keys_before) == 10
    # Upserts: the index still holds one prediction per image and model version.
    indexed = search.predictions_by(MODEL_VERSION)
    assert sorted(indexed) == sorted(names)
    assert {name: len(predictions) for name, predictions in indexed.items()} == dict.fromkeys(
        names, 1
    )


def test_store_inputs_writes_the_preprocessed_input_too(spec, store, search):
    from dataclasses import replace

    names = put_images(store, 3)
    search.index_images(names)
    outcome, _ = _run(replace(spec, store_inputs=True), names, store)

    assert outcome.processed == 3
    for name in names:
        array = load_npy(store.get_bytes(input_array_name(MODEL_VERSION, name[7:])))
        assert array.shape == (32, 32, 3)
        assert array.dtype == np.float32
        assert array.min() >= 0.0
        assert array.max() <= 255.0


def test_a_stop_request_ends_after_the_batch_in_hand(spec, store, search):
    names = put_images(store, 40)
    search.index_images(names)
    calls = {"n": 0}

    def stop_after_two_batches():
        calls["n"] += 1
        return calls["n"] > 2

    outcome, _ = _run(spec, names, store, should_stop=stop_after_two_batches)

    assert outcome.stopped
    assert outcome.processed == 24  # three batches of 8 were read before the stop took effect
    written = list(store.list_keys("arrays/predictions/"))
    assert len(written) == outcome.processed
    assert len(search.predictions_by(MODEL_VERSION)) == outcome.processed


def _wait_for_arrays(store, count, within_s=120.0):
    """Waits until `count` prediction arrays are written (a batch is written, then indexed)."""
    deadline = time.monotonic() + within_s
    while len(list(store.list_keys("arrays/predictions/"))) < count:
        assert time.monotonic() < deadline, "the batch was never written"
        time.sleep(0.01)


def test_a_search_restart_while_a_batch_is_indexed_loses_no_prediction(spec, store, search):
    names = put_images(store, 8)  # one batch
    search.index_images(names)
    search.stop()  # a real outage: nothing listens on the port

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_run, spec, names, store)
        # The batch's arrays are written before its index call: from here on that call is
        # failing and being retried, and the restart must land inside the retries.
        _wait_for_arrays(store, 8)
        search.start()
        outcome, _ = running.result()

    assert (outcome.processed, outcome.failed) == (8, 0)
    indexed = search.predictions_by(MODEL_VERSION)
    assert {name: len(predictions) for name, predictions in indexed.items()} == dict.fromkeys(
        names, 1
    )


def test_a_search_outage_that_outlasts_the_retries_fails_the_run(spec, store, search):
    names = put_images(store, 8)
    search.index_images(names)
    search.stop()

    with pytest.raises(Unavailable, match="refused IndexPredictions"):
        _run(spec, names, store)

    # The arrays were written; a re-run once search is back indexes them (writes are upserts).
    assert len(list(store.list_keys("arrays/predictions/"))) == 8
    search.start()
    outcome, _ = _run(spec, names, store)
    assert (outcome.processed, outcome.failed) == (8, 0)
    assert sorted(search.predictions_by(MODEL_VERSION)) == sorted(names)
