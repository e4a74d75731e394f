"""The ``tokenizer.json`` loader, now in :mod:`isthmus.tokenizer_file` (shared with the router)."""

from isthmus.tokenizer_file import HFTokenizer, load_tokenizer

__all__ = ["HFTokenizer", "load_tokenizer"]
