"""The trainer's Spark stages on the real standalone cluster, reading from and writing to MinIO.

Cleaning drops a broken image and a re-encoded duplicate on the workers; feature extraction on
the workers writes cached shards that equal in-process extraction, and a second pass finds
everything cached. Then the whole pipeline runs on Spark and publishes a loadable model.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from imagemesh.config import S3Settings, SparkSettings, StorageBackend, StorageSettings
from imagemesh.spark.app import SparkApp
from inference_service.model.registry import ModelRegistry
from storage_service.backends import open_object_store
from tests.fixtures.engines import S3Bucket, SparkCluster
from trainer.clean import finish_clean
from trainer.datasets import generate_array
from trainer.distributed import extract_spark, inspect_spark, read_pixels
from trainer.features import BackboneSpec, Extractor, FeatureCache, load_backbone
from trainer.head import HeadConfig
from trainer.images import LabelledImage, image_key, put_generated
from trainer.pipeline import TrainOptions, run_training

IMAGES = 60


@pytest.fixture
def app(spark_master: SparkCluster) -> Iterator[SparkApp]:
    spark = SparkApp(SparkSettings(master=spark_master.master_url, app_name="trainer-test"))
    yield spark
    spark.stop()


@pytest.fixture
def storage(minio_bucket: S3Bucket) -> StorageSettings:
    return StorageSettings(
        backend=StorageBackend.S3,
        s3=S3Settings(
            endpoint=minio_bucket.host,
            access_key=minio_bucket.access_key,
            secret_key=minio_bucket.secret_key,
            bucket=minio_bucket.name,
        ),
    )


def _put(store: object, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(image_key(sha), data)  # type: ignore[attr-defined]
    return sha


def test_spark_clean_and_cached_extraction_match_in_process_results(
    app: SparkApp, storage: StorageSettings
) -> None:
    store = open_object_store(storage)
    records = put_generated(store, IMAGES, seed=8)
    bmp = io.BytesIO()
    Image.fromarray(generate_array(0, seed=8).pixels).save(bmp, format="BMP")
    copy = LabelledImage(_put(store, bmp.getvalue()), records[0].label)
    broken = LabelledImage(_put(store, b"\x89PNG truncated"), "circle")
    context = app.context()

    inspected = inspect_spark(context, storage, [*records, copy, broken], (32, 32))
    cleaned = finish_clean(inspected)
    assert cleaned.report["dropped"]["undecodable"]["examples"] == [broken.sha256]
    assert cleaned.report["dropped"]["duplicate"]["count"] == 1
    assert cleaned.report["images_kept"] == IMAGES

    spec = BackboneSpec((32, 32), None, seed=3)
    backbone = load_backbone(store, spec)  # the driver stores the weights the workers load
    shas = [r.sha256 for r in records]
    assert extract_spark(context, storage, spec, shas, partition_images=16) == IMAGES
    cache = FeatureCache(store, spec.identity)
    assert cache.missing(shas) == []
    from_spark = cache.load(shas[:8])
    in_process = Extractor(backbone).features(read_pixels(store, shas[:8], (32, 32)))
    np.testing.assert_allclose(from_spark, in_process, rtol=1e-4, atol=1e-4)


def test_pipeline_on_spark_publishes_and_second_run_extracts_nothing(
    app: SparkApp, storage: StorageSettings
) -> None:
    store = open_object_store(storage)
    records = put_generated(store, IMAGES, seed=9)
    options = TrainOptions(model="spark-test", head=HeadConfig(epochs=2, batch_size=16))
    first = run_training(
        records, store=store, storage=storage, options=options, spark_context=app.context
    )
    second = run_training(
        records, store=store, storage=storage, options=options, spark_context=app.context
    )
    assert (first.extracted, second.extracted, second.cached) == (IMAGES, 0, IMAGES)
    metadata, _ = ModelRegistry(store).load(second.model_version)
    assert metadata.metrics["val_accuracy"] == pytest.approx(second.evaluation.accuracy)
