"""The text the engine double generates: common words, drawn per request from a seeded generator.

The engine double samples no model, so its output is filler: each output token is one of a fixed
list of short English words that the tokenizer encodes as a single token (with its leading space).
The words of a request are drawn from a ``numpy.random.Generator`` seeded by the server's seed and
either the request's own ``seed`` or a digest of its prompt tokens, so the same prompt gets the same
text from the same server, as greedy decoding would. With the built-in tokenizer every word is one
4-byte token (``" the"``), so the generated text re-encodes to exactly as many tokens as were
generated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from isthmus.core.tokenizer import Tokenizer

FILLER_WORDS: tuple[str, ...] = (
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one",
    "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old", "see", "two",
    "way", "who", "did", "its", "let", "put", "say", "she", "too", "use",
)

_MASK64 = (1 << 64) - 1


class FillerText:
    """Output tokens for requests, and the text of each one.

    Raises ``ValueError`` if the tokenizer encodes none of :data:`FILLER_WORDS` (even as part of a
    sentence), which no real vocabulary does.
    """

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self._seed = seed & _MASK64
        ids: list[int] = []
        for word in FILLER_WORDS:
            enc = tokenizer.encode(" " + word)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if len(ids) < 4:  # an odd vocabulary: take the pieces of a sentence of the words instead
            ids = list(dict.fromkeys(tokenizer.encode(" " + " ".join(FILLER_WORDS))))
        if not ids:
            raise ValueError("the tokenizer produced no token for the filler words")
        self.token_ids: tuple[int, ...] = tuple(ids)
        # The text a token adds after another token: decoding a token alone may drop its leading
        # space (sentencepiece vocabularies), so decode it behind an anchor token and cut the anchor.
        anchor = ids[0]
        head = tokenizer.decode([anchor])
        self._text: dict[int, str] = {}
        for t in ids:
            both = tokenizer.decode([anchor, t])
            self._text[t] = both[len(head):] if both.startswith(head) else tokenizer.decode([t])

    def draw(self, n: int, prompt_ids: Sequence[int], request_seed: int | None = None) -> list[int]:
        """``n`` output token ids for a request with this prompt (and optional ``seed`` field)."""
        if request_seed is not None:
            key = [self._seed, 1, request_seed & _MASK64]
        else:
            digest = hashlib.blake2b(np.asarray(prompt_ids, dtype=np.int64).tobytes(), digest_size=8).digest()
            key = [self._seed, 0, int.from_bytes(digest, "little")]
        rng = np.random.default_rng(key)
        picks = rng.integers(0, len(self.token_ids), size=n)
        ids = self.token_ids
        return [ids[i] for i in picks.tolist()]

    def text(self, token_id: int) -> str:
        """The text one output token adds to the stream."""
        return self._text[token_id]
