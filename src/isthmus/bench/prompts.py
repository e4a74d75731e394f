"""Request text for a core :class:`~isthmus.core.request.Request`: prompts whose prefix structure is the trace's.

The workload layer gives each request a prompt *length* (``prompt_tokens``) and the chained hashes of
its full prompt blocks (``block_hashes``, ``block_size`` tokens each), never the text: Mooncake carries
512-token prefix hash ids (expanded to ``block_size`` blocks by
:func:`isthmus.core.hashing.expand_coarse_hash_ids`), ShareGPT token workloads carry Llama token ids
(hashed by :func:`isthmus.core.hashing.hash_token_blocks`; the ids themselves are dropped by
:func:`isthmus.workloads.build_requests`), Azure and the synthetic ``poisson`` kind carry no prefix
information, and no reader keeps prompt text. So the load generator *builds* text from the hashes:

* the prompt is ``prompt_tokens`` tokens of the built-in :class:`~isthmus.core.tokenizer.ByteChunkTokenizer`
  (``chunk_bytes`` bytes per token, 4 by default), all ASCII, so it is exactly
  ``prompt_tokens * chunk_bytes`` characters and every token is ``chunk_bytes`` characters;
* block ``i`` (characters ``[i * W, (i + 1) * W)`` with ``W = block_size * chunk_bytes``) of a hashed
  block is a pure function of ``block_hashes[i]`` alone (:func:`block_text`): ``"h"``, the hash as 16
  hex digits (two's complement, 64 bits), a space, then fixed filler words cut to ``W``. Equal hashes
  give equal text, distinct hashes distinct text (when ``W >= 17``; shorter blocks keep the hash's
  low hex digits only and may collide);
* the tokens after the hashed blocks (a trailing partial block, or every token of a request without
  hashes) start with ``"#"``, the ``salt`` and the request's id, so they are unique to the request
  and never equal a hashed block (which starts with ``"h"``).

Hence two requests share their first ``k`` block hashes exactly when their texts share the first
``k * W`` characters, i.e. their first ``k * block_size`` tokens; the engine double's prefix cache
(which chains hashes over those tokens) and the router's prefix hashes then see the same sharing the
simulator sees, block boundaries aligned. A real model's tokenizer will not split this text on the
same boundaries, but equal prefixes of text still give equal prefixes of tokens.

Everything here is pure (no I/O, no clock, no randomness).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from isthmus.core.hashing import DEFAULT_BLOCK_SIZE
from isthmus.core.request import Request

DEFAULT_CHUNK_BYTES = 4
"""Bytes per token of the built-in tokenizer the engine double and the router use by default."""

_MASK64 = (1 << 64) - 1
_FILLER = ("the routing of requests across regions by latency queues and cached prefixes "
           "keeps time to first token low for every client in every region ")
_HASHED_MARK = "h"
_UNIQUE_MARK = "#"


_FILLER_LONG = _FILLER * 32


def _fill(head: str, width: int) -> str:
    """``head`` then filler words, exactly ``width`` ASCII characters (``head`` cut if longer)."""
    if len(head) >= width:
        return head[:width]
    need = width - len(head)
    if need <= len(_FILLER_LONG):
        return head + _FILLER_LONG[:need]
    return head + (_FILLER * (need // len(_FILLER) + 1))[:need]


@lru_cache(maxsize=1 << 16)
def block_text(block_hash: int, width: int) -> str:
    """The ``width`` ASCII characters of a full prompt block whose hash is ``block_hash``.

    A pure function of ``(block_hash, width)``: ``"h" + 16 hex digits + " "`` then filler. With
    ``width >= 17`` distinct hashes (as 64-bit values) give distinct text; below that only the
    hash's ``width - 1`` lowest hex digits are kept.
    """
    if width < 1:
        raise ValueError(f"block width must be >= 1 character, got {width}")
    digits = f"{block_hash & _MASK64:016x}"
    if width < 1 + len(digits):
        return (_HASHED_MARK + digits[len(digits) - (width - 1):])[:width]
    return _fill(f"{_HASHED_MARK}{digits} ", width)


@dataclass(frozen=True, slots=True)
class PromptBuilder:
    """Builds the text of a request (module docstring).

    Attributes:
        block_size: tokens per block of ``Request.block_hashes`` (the workload's ``block_size``).
        chunk_bytes: bytes per token of the tokenizer the text is for (the built-in one: 4).
        salt: put into every request-unique tail (e.g. a run id), so that two runs against the same
            warm engines do not share tails; hashed blocks are not salted (they are meant to be
            shared).
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    salt: str = ""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 1 <= self.chunk_bytes <= 7:
            raise ValueError(f"chunk_bytes must be in 1..7, got {self.chunk_bytes}")
        if not self.salt.isascii():
            raise ValueError("salt must be ASCII (one character per byte)")

    @property
    def block_chars(self) -> int:
        """Characters (= bytes) per full block."""
        return self.block_size * self.chunk_bytes

    def text(self, request: Request) -> str:
        """The prompt of ``request``: ``request.prompt_tokens * chunk_bytes`` ASCII characters.

        Raises ``ValueError`` when the request has more full-block hashes than its length holds.
        """
        hashes = request.block_hashes
        width = self.block_chars
        if len(hashes) * self.block_size > request.prompt_tokens:
            raise ValueError(f"request {request.id}: {len(hashes)} block hashes of {self.block_size} tokens "
                             f"do not fit in {request.prompt_tokens} prompt tokens")
        head = 2 + 16  # "h", 16 hex digits, " ": block_text's layout, inlined for speed
        if hashes and head <= width <= head + len(_FILLER_LONG):
            filler = _FILLER_LONG[:width - head]
            parts = [f"{_HASHED_MARK}{h & _MASK64:016x} {filler}" for h in hashes]
        else:
            parts = [block_text(h, width) for h in hashes]
        rest = (request.prompt_tokens - len(hashes) * self.block_size) * self.chunk_bytes
        if rest:
            parts.append(_fill(f"{_UNIQUE_MARK}{self.salt}{request.id} ", rest))
        return "".join(parts)

    def __call__(self, request: Request) -> str:
        return self.text(request)


def prompt_text(request: Request, block_size: int = DEFAULT_BLOCK_SIZE, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                salt: str = "") -> str:
    """:meth:`PromptBuilder.text` with these settings."""
    return PromptBuilder(block_size, chunk_bytes, salt).text(request)
