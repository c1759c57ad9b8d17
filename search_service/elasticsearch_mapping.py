"""The Elasticsearch index layout: template, mapping, analyzer, index and alias names.

The index `{prefix}-images-v1` is created from the template `{prefix}-images` and reached
only through the alias `{prefix}-images`, so a new mapping can be rolled out by creating
`-v2` from a new template, reindexing, and moving the alias, with no downtime.

One document per image, its id the image's SHA-256. Predictions are `nested` documents, one
per model version, so "model v3 calls X with confidence >= 0.9" is one nested query whose
conditions hold on the same prediction. `filename` and `tags` are text with `.keyword`
subfields (for sorting and exact tag filters). Free text is matched against `search_text`
only: the words of the filename and tags as `search_service.text` splits them, written by
the service, so Elasticsearch and SQLite index exactly the same words (a server without the
analysis-common module, like the integ-test distribution, has only the standard analyzer,
whose UAX#29 rules SQLite cannot reproduce). Attributes are kept in `_source` unindexed (any
key, no mapping explosion) and indexed as `key=value` keywords.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MAPPING_VERSION",
    "alias_name",
    "index_name",
    "index_template",
    "template_name",
]

# Bump with a mapping change: the new index gets created beside the old one (see above).
MAPPING_VERSION = 1

_KEYWORD: dict[str, Any] = {"type": "keyword"}
_TEXT: dict[str, Any] = {"type": "text", "fields": {"keyword": {"type": "keyword"}}}


def alias_name(prefix: str) -> str:
    """The alias every read and write goes through."""
    return f"{prefix}-images"


def index_name(prefix: str, version: int = MAPPING_VERSION) -> str:
    """The concrete index of a mapping version."""
    return f"{prefix}-images-v{version}"


def template_name(prefix: str) -> str:
    """The index template's name."""
    return f"{prefix}-images"


def index_template(prefix: str, *, shards: int, replicas: int) -> dict[str, Any]:
    """The body of the composable index template for `{prefix}-images-v*`."""
    return {
        "index_patterns": [f"{prefix}-images-v*"],
        "priority": 200,
        "_meta": {"managed_by": "imagemesh search_service", "mapping_version": MAPPING_VERSION},
        "template": {
            "settings": {
                "number_of_shards": shards,
                "number_of_replicas": replicas,
            },
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "name": _KEYWORD,
                    "filename": _TEXT,
                    "tags": _TEXT,
                    "search_text": {"type": "text"},
                    "dataset": _KEYWORD,
                    "label": _KEYWORD,
                    "attributes": {"type": "object", "enabled": False},
                    "attribute_pairs": _KEYWORD,
                    "content_type": _KEYWORD,
                    "size_bytes": {"type": "long"},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "create_time": {"type": "date_nanos"},
                    "predictions": {
                        "type": "nested",
                        "properties": {
                            "model_version": _KEYWORD,
                            "top_class": _KEYWORD,
                            "confidence": {"type": "float"},
                            "top_k": {"type": "object", "enabled": False},
                            "predict_time": {"type": "date_nanos"},
                            "probabilities_array": {"type": "keyword", "index": False},
                        },
                    },
                },
            },
        },
    }
