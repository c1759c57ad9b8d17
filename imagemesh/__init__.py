"""imagemesh: a gRPC service mesh that stores, searches and classifies images.

The `imagemesh` package holds what the three services share: the generated contracts
(`imagemesh.{common,storage,search,inference}.v1`), configuration, the server bootstrap,
error mapping and the command line. Each service lives in its own top-level package
(`storage_service`, `search_service`, `inference_service`).
"""

__version__ = "0.1.0"
