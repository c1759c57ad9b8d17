"""Batch classification jobs: a selection of stored images classified locally or on Spark.

Layers, each in its own module:

- `jobs`: the job resource as plain data (states, selection, counts, failures), its state
  machine and its JSON form. No I/O.
- `store`: durable job records in the object store (`jobs/{job_id}.json`).
- `keys`: where a prediction's `.npy` (and the preprocessed input's) is stored, per model
  version and image: the same key for online `persist` and for batch jobs.
- `pipeline`: classifying a stream of image names (read, preprocess, predict in fixed-size
  batches, write `.npy`, index): the one code path both runners use.
- `predictor`, `indexer`, `selection`: adapters (the model, SearchService's IndexPredictions,
  resolving a dataset or search filter to names over gRPC).
- `local_runner`, `spark_runner`: where a job's images get classified.
- `manager`: creates, runs, follows and cancels jobs; recovers records after a restart.
- `servicer`: the gRPC transport of the five batch RPCs.
"""
