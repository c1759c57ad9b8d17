"""How text becomes words (no network): the rule both backends index and search by."""

from __future__ import annotations

from search_service.text import MAX_TERMS, document_words, words


def test_words_are_lowercased_runs_of_letters_and_digits():
    assert words("Cat_001.PNG") == ("cat", "001", "png")
    assert words("Ünïcode Straße 東京") == ("ünïcode", "straße", "東京")


def test_query_syntax_is_only_separators():
    assert words('*:* label:cat "unbalanced (x OR y) -z ~2 ^3 /re.*/') == (
        "label",
        "cat",
        "unbalanced",
        "x",
        "or",
        "y",
        "z",
        "2",
        "3",
        "re",
    )
    assert words("*:* \" ' ( ) \\") == ()


def test_words_are_distinct_and_bounded():
    assert words("cat CAT cat dog") == ("cat", "dog")
    assert len(words(" ".join(f"w{i}" for i in range(500)))) == MAX_TERMS


def test_document_words_cover_filename_and_tags_only():
    assert document_words("Big_Cat.jpg", ("night shot", "Cat")) == "big cat jpg night shot"
