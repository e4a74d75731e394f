"""Text to token ids and back without a model file, and the chat prompt template.

The router and the engine double must turn a request into the *same* token ids, so that the chained
block hashes of :func:`isthmus.core.hashing.hash_token_blocks` agree between what the router predicts
and what the engine caches. Both use a :class:`Tokenizer`: a real one loaded from a model's
``tokenizer.json`` when configured (see ``isthmus.emulator.hf_tokenizer``), else the built-in
:class:`ByteChunkTokenizer` below, which needs no file and is identical in every process.

:class:`ByteChunkTokenizer` cuts the UTF-8 bytes of a text into fixed chunks of ``chunk_bytes`` bytes
(4 by default, the usual "about four characters per token" of English BPE vocabularies; the last
chunk may be shorter) and maps each chunk to an integer that *is* its bytes: the chunk read as a
big-endian unsigned integer with a marker bit just above it, ``id = (1 << 8 * len(chunk)) | value``.
So ids are stable (no table, no salted hash), decoding is exact, and two texts that share their first
``L`` bytes share their first ``L // chunk_bytes`` tokens, as prefix caching needs. Ids are large
(``256 <= id < 2 ** (8 * chunk_bytes + 1)``, below ``2 ** 33`` for 4-byte chunks) but fit an int64.

:func:`render_chat` turns an OpenAI ``messages`` list into one prompt string with a fixed template::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

i.e. each message is ``"<|" + role + "|>\\n" + content + "\\n"`` in order, and the prompt ends with
``"<|assistant|>\\n"`` (the generation prompt). A content given as a list of parts is the ``text`` of
its ``{"type": "text"}`` parts joined by ``"\\n"``; ``None`` content (an assistant turn that only
called tools) is empty. :func:`completion_prompt_ids` and :func:`chat_prompt_ids` give the token ids
of a request body's ``prompt`` or ``messages`` exactly as the engine double computes them, which is
what a router needs to predict the engine's block hashes. Everything here is pure: no I/O, no clock,
no global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

CHAT_ROLE_OPEN = "<|"
CHAT_ROLE_CLOSE = "|>\n"
CHAT_MESSAGE_END = "\n"
CHAT_GENERATION_PROMPT = "<|assistant|>\n"

_NUMPY_DTYPES = {1: ">u1", 2: ">u2", 4: ">u4"}


class Tokenizer(Protocol):
    """Text to token ids and back.

    ``encode`` must be a pure function of its text (same ids in every process and run); ``decode``
    of ids that ``encode`` produced must give back the text (for :class:`ByteChunkTokenizer`; real
    vocabularies may normalize).
    """

    def encode(self, text: str) -> list[int]: ...

    def count(self, text: str) -> int:
        """``len(self.encode(text))``; an implementation may count without building the ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class ByteChunkTokenizer:
    """Fixed-size UTF-8 byte chunks as tokens (module docstring); exact and process-independent.

    Attributes:
        chunk_bytes: bytes per token, 1 to 7 (ids stay below ``2 ** 57``).
    """

    chunk_bytes: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_bytes <= 7:
            raise ValueError(f"chunk_bytes must be in 1..7, got {self.chunk_bytes}")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: ``ceil(len(utf8) / chunk_bytes)`` of them."""
        data = text.encode("utf-8")
        k = self.chunk_bytes
        full = len(data) - len(data) % k
        dtype = _NUMPY_DTYPES.get(k)
        ids: list[int]
        if dtype is not None:
            values = np.frombuffer(data, dtype=dtype, count=full // k).astype(np.int64)
            ids = (values + (1 << (8 * k))).tolist()
        else:
            mark = 1 << (8 * k)
            ids = [mark | int.from_bytes(data[i:i + k], "big") for i in range(0, full, k)]
        if full < len(data):
            ids.append(self.token_id(data[full:]))
        return ids

    def count(self, text: str) -> int:
        """``len(self.encode(text))``, without building the ids."""
        return -(-len(text.encode("utf-8")) // self.chunk_bytes)

    def token_id(self, chunk: bytes) -> int:
        """The id of one chunk of 1 to ``chunk_bytes`` bytes."""
        if not 1 <= len(chunk) <= self.chunk_bytes:
            raise ValueError(f"a token holds 1 to {self.chunk_bytes} bytes, got {len(chunk)}")
        return (1 << (8 * len(chunk))) | int.from_bytes(chunk, "big")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token id; ``ValueError`` for an id this tokenizer cannot produce."""
        n = (token_id.bit_length() - 1) // 8
        if token_id < 256 or n > self.chunk_bytes or token_id.bit_length() != 8 * n + 1:
            raise ValueError(f"{token_id} is not a token id of a {self.chunk_bytes}-byte chunk tokenizer")
        return (token_id ^ (1 << (8 * n))).to_bytes(n, "big")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; bytes of a character cut by a partial sequence decode as U+FFFD."""
        return b"".join(self.token_bytes(int(t)) for t in ids).decode("utf-8", errors="replace")


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError(f"messages[{index}].content must be a string, a list of text parts or null")


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt string of an OpenAI ``messages`` list, by the template of the module docstring.

    Raises ``ValueError`` (naming the bad message) for an empty list, a message that is not an
    object, a missing or non-string ``role`` or content that is not text.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        out.append(f"{CHAT_ROLE_OPEN}{role}{CHAT_ROLE_CLOSE}{_content_text(msg.get('content'), i)}{CHAT_MESSAGE_END}")
    if add_generation_prompt:
        out.append(CHAT_GENERATION_PROMPT)
    return "".join(out)


_MAX_TOKEN_ID = (1 << 63) - 1


def _checked_ids(values: Sequence[Any]) -> list[int]:
    for t in values:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN_ID:
            raise ValueError("a token-id prompt must hold integers in [0, 2**63)")
    return list(values)


def completion_prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a ``/v1/completions`` ``prompt``, as the engine double computes them.

    A string is encoded; a list of ints is taken as token ids; a one-element list holding a string
    or a list of ints is that element. Raises ``ValueError`` for anything else, a batch of
    several prompts included.
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return _checked_ids(prompt)
        if len(prompt) > 1:
            raise ValueError("only one prompt per request is supported")
        only = prompt[0]
        if isinstance(only, str):
            return tokenizer.encode(only)
        if isinstance(only, list):
            return _checked_ids(only)
    if prompt is None:
        raise ValueError("'prompt' is required")
    raise ValueError("'prompt' must be a string, a list of token ids, or a list holding one of either")


def chat_prompt_ids(messages: Any, tokenizer: Tokenizer) -> list[int]:
    """Token ids of ``/v1/chat/completions`` ``messages``: :func:`render_chat`, then encode.
    Raises ``ValueError`` as :func:`render_chat` does."""
    return tokenizer.encode(render_chat(messages))
