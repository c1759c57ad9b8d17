"""Servicers whose every RPC answers UNIMPLEMENTED with a message that says so.

A service's contract is published before all of it is built; until an RPC is implemented,
it must say plainly that it is not, rather than pretend to work.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["unimplemented_servicer"]


def unimplemented_servicer(base: type, service: str, *, keep: type | None = None) -> Any:
    """An instance of `base` whose RPCs not defined on `keep` abort with UNIMPLEMENTED."""
    namespace: dict[str, Any] = {}
    implemented = set(vars(keep)) if keep is not None else set()
    for attr, value in vars(base).items():
        if attr.startswith("_") or not callable(value) or attr in implemented:
            continue

        def make(rpc: str) -> Any:
            async def handler(
                self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{service}.{rpc} is not implemented by this server yet",
                )

            return handler

        namespace[attr] = make(attr)
    bases = (keep, base) if keep is not None else (base,)
    cls = type(f"Unimplemented{base.__name__}", bases, namespace)
    return cls()
