"""UTF-8 assembly across token boundaries and stop strings that span tokens."""
from __future__ import annotations

import pytest

from pymemory.text import TextAssembler, common_prefix_length


def feed_bytes(assembler: TextAssembler, chunks: list[bytes]) -> list[str]:
    return [assembler.push(c) for c in chunks] + [assembler.flush()]


def test_multibyte_characters_split_across_tokens_are_released_whole():
    data = "Grüße 🌍 日本".encode("utf-8")
    chunks = [data[i:i + 1] for i in range(len(data))]  # worst case: one byte per token
    pieces = feed_bytes(TextAssembler(), chunks)
    assert "".join(pieces) == "Grüße 🌍 日本"
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_final_character_becomes_replacement_char():
    pieces = feed_bytes(TextAssembler(), [b"ok", "🌍".encode()[:2]])
    assert "".join(pieces) == "ok\ufffd"


def test_stop_string_spanning_tokens_is_not_shown():
    a = TextAssembler(stop=["\nUser:"])
    out = feed_bytes(a, [b"Hi there", b"\nUs", b"er: more", b"text"])
    assert "".join(out) == "Hi there"
    assert a.stopped and a.stop_string == "\nUser:"


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    a = TextAssembler(stop=["STOP"])
    assert a.push(b"abc ST") == "abc "
    assert a.push(b"ATE") == "STATE"
    assert not a.stopped


def test_earliest_of_several_stop_strings_wins():
    a = TextAssembler(stop=["bb", "a"])
    assert "".join(feed_bytes(a, [b"xxbbya"])) == "xx"
    assert a.stop_string == "bb"


def test_stop_must_be_strings():
    with pytest.raises(TypeError):
        TextAssembler(stop=[b"x"])  # type: ignore[list-item]


def test_common_prefix_length():
    assert common_prefix_length("abcd", "abxy") == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length("", "a") == 0
