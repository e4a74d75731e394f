"""A real vocabulary from a model's ``tokenizer.json``, through the ``tokenizers`` library.

Shared by the engine double (``isthmus emulate --tokenizer PATH``) and the router (``tokenizer:
PATH`` in its config): both load the file through :func:`load_tokenizer`, so they produce the same
token ids and therefore the same block hashes for the same prompt. The library is imported only
when a file is given (it is the ``tokenizer`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isthmus.core.errors import ConfigError
from isthmus.core.tokenizer import ByteChunkTokenizer, Tokenizer


class HFTokenizer:
    """:class:`~isthmus.core.tokenizer.Tokenizer` over a ``tokenizers.Tokenizer``.

    ``add_special_tokens``: let the file's post-processor add its special tokens (a BOS, say) to
    every encoded text. Off by default: the chat template of :func:`isthmus.core.tokenizer.render_chat`
    is plain text, and both router and engine must agree on the choice anyway.
    """

    def __init__(self, tokenizer: Any, add_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._special = add_special_tokens

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=self._special).ids)

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=self._special).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())


def load_tokenizer(path: Path | None, add_special_tokens: bool = False) -> Tokenizer:
    """The tokenizer in ``path`` (a ``tokenizer.json`` or a directory holding one); ``None``: the
    built-in :class:`~isthmus.core.tokenizer.ByteChunkTokenizer`.

    Raises :class:`~isthmus.core.errors.ConfigError` naming the file when it is missing or
    unreadable, or when the ``tokenizers`` library is not installed.
    """
    if path is None:
        return ByteChunkTokenizer()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no such tokenizer file")
    try:
        from tokenizers import Tokenizer as _RustTokenizer
    except ImportError:
        raise ConfigError(f"{file}: reading a tokenizer file needs the 'tokenizers' package "
                          "(pip install 'isthmus[tokenizer]')") from None
    try:
        return HFTokenizer(_RustTokenizer.from_file(str(file)), add_special_tokens)
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise ConfigError(f"{file}: not a valid tokenizer.json: {exc}") from None
