"""The trainer: clean, extract features, train, evaluate and publish models on Spark."""
