"""Page tokens round-trip and reject forgery, reuse with another query, and expiry."""

from __future__ import annotations

import time

import pytest

from imagemesh.errors import InvalidArgument
from imagemesh.page_tokens import PageTokenCodec


def test_a_token_round_trips_its_position() -> None:
    codec = PageTokenCodec("k")
    token = codec.encode({"after": "images/abc", "n": 3}, query="dataset=a")
    assert codec.decode(token, query="dataset=a") == {"after": "images/abc", "n": 3}


@pytest.mark.parametrize(
    "mutate", [lambda t: t[:-2] + "AA", lambda t: "x" + t, lambda t: "", lambda t: "!!"]
)
def test_a_tampered_token_is_invalid_argument(mutate) -> None:
    codec = PageTokenCodec("k")
    token = codec.encode({"after": "x"}, query="q")
    with pytest.raises(InvalidArgument) as info:
        codec.decode(mutate(token), query="q")
    assert info.value.reason == "INVALID_PAGE_TOKEN"


def test_a_token_from_another_query_or_key_is_refused() -> None:
    token = PageTokenCodec("k").encode({"after": "x"}, query="dataset=a")
    with pytest.raises(InvalidArgument):
        PageTokenCodec("k").decode(token, query="dataset=b")
    with pytest.raises(InvalidArgument):
        PageTokenCodec("other").decode(token, query="dataset=a")


def test_an_expired_token_says_so() -> None:
    codec = PageTokenCodec("k")
    token = codec.encode({"after": "x"}, ttl_s=0.01)
    time.sleep(0.05)
    with pytest.raises(InvalidArgument) as info:
        codec.decode(token)
    assert info.value.reason == "EXPIRED_PAGE_TOKEN"
