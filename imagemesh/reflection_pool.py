"""The descriptor pool server reflection answers from, extended to methods' full names.

grpcio-reflection resolves `file_containing_symbol` through the protobuf pool, which knows
messages, enums and services but not methods (grpc/grpc#34743): asked for
`imagemesh.inference.v1.InferenceService.Classify` it answers NOT_FOUND. That is what ghz asks
for (`--call package.Service.Method`) and `grpcurl describe` with a method, so both failed
against every Python gRPC server with "Symbol not found" (bojand/ghz#419) unless given the
.proto files. A method's file is its service's.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool

__all__ = ["MethodAwarePool"]


class MethodAwarePool:
    """A descriptor pool (the default one unless given) whose `FindFileContainingSymbol`
    also resolves `package.Service.Method`; everything else is the pool's own."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()

    # The name is the pool's: reflection calls it.
    def FindFileContainingSymbol(self, full_name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(full_name)
        except KeyError:
            # Raises KeyError too when it is no method either: reflection's NOT_FOUND.
            return self._pool.FindMethodByName(full_name).containing_service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
