"""StorageService: images and `.npy` arrays on MinIO, any S3, or a local folder."""
