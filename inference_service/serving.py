"""Which model versions are loaded, which one serves, and switching between them safely.

A `ServedModel` is a loaded version: its metadata, compiled function and micro-batcher. The
`ModelManager` keeps the serving version plus the previously serving one (so that calls pinned
to it, and calls in flight during a switch, keep working), loads and warms a version before it
can serve, and swaps the serving pointer in one step on the event loop: a call picks its model
once, at its start, and finishes on it, so no call fails or mixes versions during a switch. An
evicted version is unloaded only after its last call has finished.

Calls may come from the event loop and from the synchronous front's threads at once: a call's
lookup and count, an eviction, and the unloading's check for calls in flight all happen under
one lock, so a version cannot be unloaded between a call finding it and counting itself in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagemesh.errors import FailedPrecondition, Unavailable

from . import metrics
from .batcher import BatcherConfig, MicroBatcher
from .model.artifact import ModelMetadata
from .model.registry import ModelRegistry

__all__ = ["ModelManager", "ServedModel", "no_model_message"]

_log = logging.getLogger(__name__)

# Builds the batch function for a Keras model (TensorFlow's, or a stand-in in batcher tests).
Compiler = Callable[[Any], Callable[[np.ndarray], np.ndarray]]


def no_model_message(model: str) -> str:
    """What Classify says when nothing can serve: how to get a model."""
    return (
        f"no version of model '{model}' is published yet. Publish one, e.g. an untrained "
        f"placeholder with `imagemesh models publish-random {model} --select` (or train one "
        "with the trainer), then serve it with `imagemesh models select "
        f"models/{model}/versions/<version>`"
    )


@dataclass
class ServedModel:
    """A loaded, warmed-up version and the calls currently using it."""

    metadata: ModelMetadata
    batcher: MicroBatcher
    keras_model: Any
    in_flight: int = 0
    # Set whenever no call uses it (waited on, off the event loop, by an eviction).
    idle: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        """`models/{model}/versions/{version}`."""
        return self.metadata.name


class ModelManager:
    """Loads versions from the registry and routes calls to the right one."""

    def __init__(
        self,
        registry: ModelRegistry,
        config: BatcherConfig,
        executor: Executor,
        compiler: Compiler,
        *,
        model: str,
        keep_loaded: int = 2,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        self.registry = registry
        self.model = model
        self._config = config
        self._executor = executor
        self._compiler = compiler
        self._keep_loaded = max(1, keep_loaded)
        self._loaded: dict[str, ServedModel] = {}
        self._serving: ServedModel | None = None
        self._switch_lock = asyncio.Lock()
        # Guards `_loaded`, `_serving` and every version's `in_flight` (see the module's doc).
        self._calls = threading.Lock()
        self._unloading: set[asyncio.Task[None]] = set()
        # Runs once before the first load (TensorFlow's thread pools must be sized before
        # its runtime starts, and loading a model starts it).
        self._prepare = prepare

    @property
    def serving(self) -> ServedModel | None:
        """The version serving calls that name none, if any."""
        return self._serving

    @property
    def loaded_names(self) -> list[str]:
        """The loaded versions, oldest selection first."""
        return list(self._loaded)

    async def start(self, pinned: str = "") -> ModelMetadata | None:
        """Serves `pinned` (a version id or full name), else the newest version, if any."""
        if pinned:
            name = (
                pinned if pinned.startswith("models/") else f"models/{self.model}/versions/{pinned}"
            )
        else:
            try:
                latest = await asyncio.to_thread(self.registry.latest, self.model)
            except Unavailable as exc:
                # The store may come back; serve nothing meanwhile rather than not start.
                _log.error("cannot look for a model to serve: %s", exc.message)
                return None
            if latest is None:
                _log.warning("%s", no_model_message(self.model))
                return None
            name = latest.name
        metadata, _previous = await self.select(name)
        return metadata

    async def select(self, name: str) -> tuple[ModelMetadata, str]:
        """Loads and warms `name` if needed, then makes it the serving version.

        Returns its metadata and the previously serving version's name ("" if none).
        `NotFound` if unpublished; `FailedPrecondition` if unloadable (nothing changes).
        """
        async with self._switch_lock:
            served = self._loaded.get(name)
            if served is None:
                served = await self._load(name)
            with self._calls:
                # Most recently selected last, for eviction order.
                self._loaded.pop(name, None)
                self._loaded[name] = served
                previous = self._serving
                # The switch itself: callers look the serving version up under the same lock.
                self._serving = served
            if previous is not served:
                metrics.MODEL_SWITCHES.inc()
                _log.info("serving %s (was %s)", name, previous.name if previous else "nothing")
            self._evict()
            return served.metadata, previous.name if previous else ""

    async def _load(self, name: str) -> ServedModel:
        if self._prepare is not None:
            await asyncio.to_thread(self._prepare)
            self._prepare = None
        metadata, keras_model = await asyncio.to_thread(self.registry.load, name)
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(self._executor, self._compiler, keras_model)
            batcher = MicroBatcher(runner, self._config, self._executor, label=name)
            shape = (metadata.input_height, metadata.input_width, 3)
            # Every padded batch shape once, each as its own job on the compute thread, so the
            # serving version keeps computing between them.
            for size in batcher.sizes:
                await loop.run_in_executor(
                    self._executor, runner, np.zeros((size, *shape), dtype=np.float32)
                )
        except Exception as exc:  # compiling or running a loaded model can fail in many ways
            raise FailedPrecondition(
                f"{name} loaded but cannot run: {type(exc).__name__}: {exc}"[:1000],
                reason="MODEL_ARTIFACT_INVALID",
            ) from exc
        batcher.start()
        _log.info("loaded and warmed %s (batch sizes %s)", name, batcher.sizes)
        return ServedModel(metadata, batcher, keras_model)

    def _evict(self) -> None:
        while len(self._loaded) > self._keep_loaded:
            with self._calls:
                served = self._loaded.pop(next(iter(self._loaded)))
            task = asyncio.get_running_loop().create_task(self._unload(served))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)

    async def _unload(self, served: ServedModel) -> None:
        # No new call can find it (it left `_loaded`); wait for those already using it.
        with self._calls:
            busy = served.in_flight > 0
            if busy:
                served.idle.clear()
        if busy:
            await asyncio.to_thread(served.idle.wait)
        await served.batcher.close()
        _log.info("unloaded %s", served.name)

    async def acquire(self, name: str = "") -> ServedModel:
        """The version a call will use: `name`, or the serving one. Pair with `release`.

        `FailedPrecondition` if nothing serves or `name` is published but not loaded;
        `NotFound` if `name` is not published.
        """
        served = self._counted_in(name)
        if served is not None:
            return served
        # Tells an unknown version (NOT_FOUND) from a known one that is not loaded.
        await asyncio.to_thread(self._not_loaded, name)
        raise AssertionError("not reached")  # pragma: no cover - _not_loaded raises

    def acquire_blocking(self, name: str = "") -> ServedModel:
        """`acquire`, from a thread other than the event loop's."""
        served = self._counted_in(name)
        if served is None:
            self._not_loaded(name)
        assert served is not None
        return served

    def _counted_in(self, name: str) -> ServedModel | None:
        with self._calls:
            served = self._loaded.get(name) if name else self._serving
            if served is not None:
                served.in_flight += 1
            return served

    def _not_loaded(self, name: str) -> None:
        """Raises why no loaded version answers to `name` (blocking: may ask the registry)."""
        if not name:
            raise FailedPrecondition(no_model_message(self.model), reason="NO_MODEL")
        self.registry.get(name)  # NotFound if it was never published
        raise FailedPrecondition(
            f"{name} is published but not loaded by this server; select it first with "
            f"`imagemesh models select {name}` (SelectModelVersion)",
            reason="MODEL_VERSION_NOT_LOADED",
        )

    def release(self, served: ServedModel) -> None:
        """Ends a call's use of `served` (from any thread)."""
        with self._calls:
            served.in_flight -= 1
            if served.in_flight == 0:
                served.idle.set()

    async def close(self) -> None:
        """Unloads everything, letting queued images finish."""
        async with self._switch_lock:
            with self._calls:
                loaded = list(self._loaded.values())
                self._loaded.clear()
                self._serving = None
        for served in loaded:
            await served.batcher.close()
        for task in list(self._unloading):
            await task

    def find_loaded(self, name: str) -> ServedModel | None:
        """The loaded version `name`, if loaded (no side effect)."""
        return self._loaded.get(name)
