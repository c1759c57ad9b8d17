"""How free text becomes words, the same way for every backend.

A word is a maximal run of Unicode letters and digits, lower-cased; everything else
(punctuation, `*`, `:`, quotes, underscores, whitespace) only separates words. The service
splits filenames and tags into words itself and indexes those words (space-separated) in
both backends, and reduces user text to words before any backend sees it. So both backends
match the same words, and query syntax can never reach a query parser: `label:cat` is the
two words `label` and `cat`, searched in filenames and tags only.

One known difference: Elasticsearch's standard tokenizer further splits ideographic scripts
into single characters (on both the indexed and the searched side), so a CJK word can match
a little more there than in SQLite.
"""

from __future__ import annotations

import re

__all__ = ["MAX_TEXT_CHARS", "MAX_TERMS", "document_words", "words"]

MAX_TEXT_CHARS = 1024
# More words than this cannot narrow a search usefully; the rest are ignored.
MAX_TERMS = 64

_WORD = re.compile(r"[^\W_]+")


def document_words(filename: str, tags: tuple[str, ...]) -> str:
    """The words a document is found by, space-separated: its filename's and its tags'."""
    seen: dict[str, None] = {}
    for part in (filename, *tags):
        for match in _WORD.finditer(part):
            seen.setdefault(match.group().lower(), None)
    return " ".join(seen)


def words(text: str) -> tuple[str, ...]:
    """The distinct words of `text`, lower-cased, in first-seen order (at most MAX_TERMS)."""
    seen: dict[str, None] = {}
    for match in _WORD.finditer(text):
        seen.setdefault(match.group().lower(), None)
        if len(seen) >= MAX_TERMS:
            break
    return tuple(seen)
