"""The built-in tokenizer and the chat template: stable, exact, prefix-preserving."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.tokenizer import (
    ByteChunkTokenizer,
    Tokenizer,
    chat_prompt_ids,
    completion_prompt_ids,
    render_chat,
)

TOK = ByteChunkTokenizer()


def test_ids_are_the_bytes_with_a_marker() -> None:
    assert TOK.encode("abcdef") == [(1 << 32) | int.from_bytes(b"abcd", "big"), (1 << 16) | int.from_bytes(b"ef", "big")]
    assert TOK.encode("") == []
    assert len(TOK.encode("x" * 4000)) == 1000
    assert all(256 <= t < 2**33 for t in TOK.encode("héllo wörld, ünïcode ✓"))


@given(st.text(max_size=300), st.integers(min_value=1, max_value=7))
def test_decode_inverts_encode(text: str, k: int) -> None:
    tok = ByteChunkTokenizer(k)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == -(-len(text.encode()) // k)


@given(st.text(max_size=300), st.integers(min_value=1, max_value=7))
def test_count_is_the_number_of_ids(text: str, k: int) -> None:
    tok = ByteChunkTokenizer(k)
    assert tok.count(text) == len(tok.encode(text))


@given(st.text(min_size=1, max_size=200), st.text(max_size=100), st.text(max_size=100))
def test_shared_text_prefix_gives_shared_tokens_and_block_hashes(prefix: str, a: str, b: str) -> None:
    shared = len(prefix.encode()) // 4
    ta, tb = TOK.encode(prefix + a), TOK.encode(prefix + b)
    assert ta[:shared] == tb[:shared]
    blocks = shared // 16
    assert hash_token_blocks(ta)[:blocks] == hash_token_blocks(tb)[:blocks]


def test_same_ids_and_hashes_in_another_process() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    code = ("from isthmus.core.tokenizer import ByteChunkTokenizer as T; from isthmus.core.hashing import "
            f"hash_token_blocks as h; i = T().encode({text!r}); print(i[:5], h(i))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    ids = TOK.encode(text)
    assert there == f"{ids[:5]} {hash_token_blocks(ids)}"


def test_bad_ids_and_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        TOK.decode([5])
    with pytest.raises(ValueError):
        TOK.decode([1 << 40])  # a 5-byte chunk from a 4-byte tokenizer
    with pytest.raises(ValueError):
        ByteChunkTokenizer(8)
    with pytest.raises(ValueError):
        TOK.token_id(b"")


def test_protocol_is_satisfied() -> None:
    tok: Tokenizer = TOK
    assert tok.decode(tok.encode("ok")) == "ok"


def test_chat_template() -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]
    assert render_chat(msgs) == "<|system|>\nBe brief.\n<|user|>\na\nb\n<|assistant|>\n\n<|assistant|>\n"
    assert render_chat(msgs[:1], add_generation_prompt=False) == "<|system|>\nBe brief.\n"
    # a conversation that grows keeps its earlier prompt as a prefix (multi-turn prefix caching)
    one = render_chat(msgs[:2], add_generation_prompt=False)
    assert render_chat([*msgs[:2], {"role": "user", "content": "c"}]).startswith(one)


@pytest.mark.parametrize("bad", [[], "hi", [1], [{"content": "x"}], [{"role": "user", "content": 3}],
                                 [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]])
def test_chat_template_rejects_bad_messages(bad: object) -> None:
    with pytest.raises(ValueError):
        render_chat(bad)  # type: ignore[arg-type]


def test_prompt_ids_of_request_bodies() -> None:
    assert completion_prompt_ids("abcdefgh", TOK) == TOK.encode("abcdefgh")
    assert completion_prompt_ids(["abcd"], TOK) == TOK.encode("abcd")
    assert completion_prompt_ids([7, 8], TOK) == [7, 8] == completion_prompt_ids([[7, 8]], TOK)
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(msgs, TOK) == TOK.encode(render_chat(msgs))
    for bad in (None, [], ["a", "b"], [-1], [True], [1.5], 3, [{"x": 1}]):
        with pytest.raises(ValueError):
            completion_prompt_ids(bad, TOK)
