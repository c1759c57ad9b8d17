"""The trainer: clean, extract features, train, evaluate and publish models on Spark.

Modules, in pipeline order:

- `datasets`: the deterministic 5-class 32x32 generated image set.
- `source`: datasets through StorageService (ListImages; BulkUploadImages for uploads).
- `images`: labelled images, their object keys, strict decoding.
- `clean`: per-image inspection and the driver-side drop / report / stratified split.
- `features`: backbone identity, the `.npy` feature-shard cache, batched extraction.
- `distributed`: the inspection and extraction stages in process or on Spark workers.
- `head`: fast head training on cached features (one `tf.function` per epoch).
- `networks`: the seed's basic CNN and whole-network fine-tuning on pixels.
- `evaluate`: accuracy, per-class precision/recall/F1, confusion matrix JSON and PNG.
- `pipeline`: `run_training`, every stage with progress, publishing through the registry.
"""
