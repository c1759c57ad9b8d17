"""InferenceService: single images from a local DenseNet121, and batch jobs on Spark."""
