"""Configuration, from `IMAGEMESH_*` environment variables and an optional TOML file.

Precedence, highest first: explicit overrides passed by code, environment variables,
the TOML file named by `IMAGEMESH_CONFIG` (or `--config`), then the defaults below, which
are the embedded ones: a local-folder object store, SQLite search, Spark `local[*]`.
Nested fields use `__` in environment variables: `IMAGEMESH_STORAGE__BACKEND=s3`.
Everything is validated at start; `load_settings` raises `ConfigError` with every problem
listed, so a bad deployment fails at once with a message, never halfway through a call.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "ConfigError",
    "ElasticsearchSettings",
    "InferenceSettings",
    "S3Settings",
    "SearchBackend",
    "SearchSettings",
    "ServerSettings",
    "Settings",
    "SparkSettings",
    "StorageBackend",
    "StorageSettings",
    "TrainerSettings",
    "default_data_dir",
    "load_settings",
]

MIB = 1024 * 1024


def default_data_dir() -> Path:
    """Where embedded backends keep their data unless configured otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "imagemesh"


class _Section(BaseModel):
    """A configuration section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem found."""


class StorageBackend(StrEnum):
    """Which object store the storage service writes to."""

    LOCAL = "local"
    S3 = "s3"


class SearchBackend(StrEnum):
    """Which engine the search service indexes into."""

    SQLITE = "sqlite"
    ELASTICSEARCH = "elasticsearch"


class ServerSettings(_Section):
    """gRPC server settings shared by every service."""

    host: str = "127.0.0.1"
    # None means the default port of what is served: 50050 for the whole mesh,
    # 50051/50052/50053 for storage/search/inference alone.
    port: int | None = Field(default=None, ge=0, le=65535)
    # Large enough for a bulk-upload message or a feature shard, small enough that one
    # client cannot make the server buffer an unbounded message.
    max_message_bytes: int = Field(default=64 * MIB, ge=MIB, le=1024 * MIB)
    grace_period_s: float = Field(default=10.0, ge=0, le=600)
    keepalive_time_s: float = Field(default=30.0, gt=0)
    keepalive_timeout_s: float = Field(default=10.0, gt=0)
    # Connections are recycled so that load balancers can rebalance; the grace is long
    # because downloads and job watches are long-lived streams.
    max_connection_age_s: float = Field(default=1800.0, gt=0)
    max_connection_age_grace_s: float = Field(default=600.0, ge=0)
    # Port for Prometheus metrics over HTTP; 0 disables it.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    log_level: str = "INFO"
    access_log: bool = True
    # A service that registers blocking handlers for its latency-bound methods (the
    # InferenceService's Classify and ClassifyStream), served alone, is served by grpc's
    # synchronous server in front of the process's grpc.aio server (see imagemesh.front:
    # 0.5-0.8 ms less per lone Classify here). Off: grpc.aio serves everything.
    blocking_front: bool = True
    # The front's handler threads: each call it serves natively or forwards holds one (a
    # stream for its whole life). An eighth of them (at least two) are kept for calls that do
    # not stream, health checks among them: a stream beyond the rest is refused with
    # RESOURCE_EXHAUSTED. More short calls than threads wait for one.
    front_threads: int = Field(default=128, ge=4, le=4096)
    # TLS: a certificate chain and key (PEM) make the port TLS-only; a client CA on top makes
    # it mutual TLS (clients must present a certificate that CA signed). The same files are
    # the service's identity when it calls other services, and `tls_ca_file` is whom it
    # trusts when it does.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_ca_file: Path | None = None

    @model_validator(mode="after")
    def _tls_files_make_sense(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist or is not a file")
        return self

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return upper


class S3Settings(_Section):
    """An S3-compatible object store (MinIO, SeaweedFS, AWS S3, ...)."""

    endpoint: str = "127.0.0.1:9000"
    access_key: str = "imagemesh"
    secret_key: str = "imagemesh-secret"
    bucket: str = "imagemesh"
    secure: bool = False
    region: str | None = None


class StorageSettings(_Section):
    """The storage service's backend and limits."""

    backend: StorageBackend = StorageBackend.LOCAL
    local_root: Path = Field(default_factory=lambda: default_data_dir() / "objects")
    s3: S3Settings = Field(default_factory=S3Settings)
    max_object_bytes: int = Field(default=2 * 1024 * MIB, ge=1)
    # Decoded pixels above this are refused as a likely decompression bomb.
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    # Secret that signs page tokens; set it in production so tokens survive restarts
    # and cannot be forged. Empty means a random per-process key.
    page_token_secret: str = ""
    # Where the storage service keeps its local state: the durable search-index outbox
    # (SQLite) and spill files of large uploads in progress. None means a
    # `storage-state` folder beside `local_root`. Give it a persistent volume.
    state_dir: Path | None = None
    # How many images of one bulk-upload stream are stored at once.
    bulk_concurrency: int = Field(default=32, ge=1, le=1024)

    def resolved_state_dir(self) -> Path:
        """`state_dir`, or its default beside `local_root`."""
        return self.state_dir or Path(self.local_root).parent / "storage-state"


class ElasticsearchSettings(_Section):
    """An Elasticsearch cluster (the server's major version must be 8)."""

    url: str = "http://127.0.0.1:9200"
    index_prefix: str = "imagemesh"
    username: str | None = None
    password: str | None = None
    request_timeout_s: float = Field(default=30.0, gt=0)
    # One shard keeps per-class counts exact and is right up to tens of millions of documents.
    number_of_shards: int = Field(default=1, ge=1, le=64)
    number_of_replicas: int = Field(default=0, ge=0, le=8)
    # Documents per bulk request; IndexImages calls larger than this are streamed in chunks.
    bulk_chunk_size: int = Field(default=1000, ge=1, le=10_000)
    # Retries of documents rejected with 429 (and requests failing with 502/503/504), with
    # exponential backoff from `initial_backoff_s` up to `max_backoff_s`.
    max_retries: int = Field(default=3, ge=0, le=20)
    initial_backoff_s: float = Field(default=0.5, gt=0)
    max_backoff_s: float = Field(default=10.0, gt=0)
    # Threads (and pooled connections) the blocking client runs on.
    workers: int = Field(default=8, ge=1, le=256)


class SearchSettings(_Section):
    """The search service's backend."""

    backend: SearchBackend = SearchBackend.SQLITE
    sqlite_path: Path = Field(default_factory=lambda: default_data_dir() / "search.sqlite3")
    elasticsearch: ElasticsearchSettings = Field(default_factory=ElasticsearchSettings)
    # Secret that signs search page tokens; empty means a random per-process key.
    page_token_secret: str = ""
    # How long a search cursor stays valid (the contract promises at least 10 minutes).
    page_token_ttl_s: float = Field(default=900.0, gt=0, le=86_400)


class SparkSettings(_Section):
    """Where large batches and training stages run."""

    master: str = "local[*]"
    executor_memory: str = "2g"
    # PYSPARK_PYTHON for the workers; empty means the interpreter running the service.
    python: str = ""
    # The address executors reach the driver at (SPARK_LOCAL_IP); loopback on one machine.
    driver_host: str = "127.0.0.1"
    app_name: str = "imagemesh"
    # Spark's web UI costs memory and a port per application; off unless asked for.
    ui_enabled: bool = False
    # Cores the application may take on a standalone cluster; 0 means every free core.
    cores_max: int = Field(default=0, ge=0)
    # Seconds to wait for a spark:// master to answer before a job fails as unavailable.
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    # Images per Spark task: small enough that a lost executor costs little work and the
    # progress (counted per finished task) moves every second or two, large enough that the
    # per-task overhead stays small: ~20 ms once the worker's heap is frozen (pyspark's
    # per-task gc.collect over TensorFlow's objects cost ~0.28 s before), against ~0.5 s of
    # model time per 256 images per worker (measured: 16 partitions of 250 ran as fast as 2
    # of 2,000).
    partition_images: int = Field(default=256, ge=1, le=100_000)
    # Start the application and load the serving model in its Python workers when the
    # service starts (in the background: SERVING is not delayed), so that the first batch job
    # does not pay the 15-25 s of a cold start.
    warm_on_start: bool = False


class InferenceSettings(_Section):
    """The inference service's model and batcher."""

    model: str = "default"
    # Empty means the newest published version of `model`.
    model_version: str = ""
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    # The longest the batcher waits for a fuller batch (it stops sooner when calls stop
    # coming); see inference_service.batcher for the measurement behind 20 ms.
    max_queue_delay_ms: float = Field(default=20.0, ge=0, le=1000)
    queue_capacity: int = Field(default=1024, ge=1)
    # Selections larger than this run on Spark when a batch job's mode is AUTO. Measured by
    # bench/batch.py (2 cores): Spark overtakes a LOCAL job past ~150-250 images on a warm
    # application but only past ~10,000-22,000 on a cold one (30-45 s of start-up); 5,000 keeps
    # small jobs off Spark's start-up and caps what a LOCAL job takes from online calls to
    # ~25-70 s of the service's model (LOCAL ran at 73-210 images/s).
    spark_threshold: int = Field(default=5000, ge=0)
    # Images per model call in batch jobs (padded to this size so the model traces once).
    batch_job_batch_size: int = Field(default=64, ge=1, le=4096)
    # Threads per batch-job worker reading images and writing arrays (I/O, not compute).
    batch_job_io_threads: int = Field(default=16, ge=1, le=256)
    # Seconds between a running job's progress writes to its durable record; a record not
    # refreshed for `batch_job_lease_s` belongs to a service that is gone.
    batch_job_heartbeat_s: float = Field(default=2.0, gt=0, le=60)
    batch_job_lease_s: float = Field(default=60.0, gt=0)
    # Batches computed at the same time, each by its own thread on the one loaded model (the
    # model's instances); 0 means one per core. Measured on two cores (32x32 DenseNet121,
    # batches of 32): two instances of one thread each computed 1,050-1,180 images/s where
    # one instance on both cores computed 560-690, and one image took 13.5 ms instead of 17.
    model_instances: int = Field(default=0, ge=0, le=64)
    # TensorFlow's thread pools; 0 means: intra = the cores divided among the instances,
    # inter = the instances (inter 1 would run the instances' batches one at a time).
    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=0, ge=0)
    # TensorFlow's oneDNN kernels; the service sets TF_ENABLE_ONEDNN_OPTS from this (whatever
    # the environment says). Off: on the 32x32 model here a batch of one took 1.2-1.7 ms less
    # without them and batches ran 3-12 % faster; see
    # inference_service.runtime.configure_onednn for the measurement.
    onednn: bool = False
    # Guards on a Classify image: encoded bytes, and decoded pixels (width x height; above it
    # an image is refused as a likely decompression bomb, before decoding).
    max_image_bytes: int = Field(default=32 * MIB, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    # Secret that signs ListModelVersions page tokens; empty means a random per-process key.
    page_token_secret: str = ""


class TrainerSettings(_Section):
    """The trainer's defaults (`imagemesh train`); command-line options override them."""

    # Clean and extract on Spark (`spark` settings); off runs them in the CLI's process.
    use_spark: bool = True
    # The model name new versions are published under.
    model: str = "default"
    # Images per backbone call when extracting features.
    feature_batch_size: int = Field(default=256, ge=1, le=4096)
    # Images per Spark task (and per cached feature shard) when extracting features.
    extract_partition_images: int = Field(default=256, ge=1, le=100_000)


class Settings(BaseSettings):
    """All of imagemesh's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEMESH_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    # Where each service reaches the others when they run as separate processes; empty
    # means "in this process" (the one-process mesh).
    storage_address: str = ""
    search_address: str = ""
    inference_address: str = ""
    # Bearer token required from clients when set; empty means no authentication.
    auth_token: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("IMAGEMESH_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Reads and validates the configuration; raises `ConfigError` listing every problem."""
    previous = os.environ.get("IMAGEMESH_CONFIG")
    try:
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist or is not a file")
            os.environ["IMAGEMESH_CONFIG"] = str(path)
        toml_path = os.environ.get("IMAGEMESH_CONFIG")
        if toml_path and not Path(toml_path).is_file():
            raise ConfigError(f"IMAGEMESH_CONFIG={toml_path} does not exist or is not a file")
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(root)"
            env_name = "IMAGEMESH_" + "__".join(str(p).upper() for p in error["loc"])
            problems.append(f"  {where} ({env_name}): {error['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(problems)) from None
    except ValueError as exc:  # a malformed TOML file or env value that is not JSON
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop("IMAGEMESH_CONFIG", None)
            else:
                os.environ["IMAGEMESH_CONFIG"] = previous
