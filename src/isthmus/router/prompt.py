"""From an OpenAI request body to what a policy needs: model, prompt length, block hashes, stream flag.

The body is parsed once (orjson) and forwarded upstream as the original bytes. The prompt is
tokenized with the tokenizer the engine double uses (:class:`isthmus.core.tokenizer.ByteChunkTokenizer`
by default: fixed UTF-8 byte chunks), chat ``messages`` rendered first with
:func:`isthmus.core.tokenizer.render_chat`, so that the router's block hashes
(:func:`isthmus.core.hashing.hash_token_blocks`) are the ones the engine double caches. A real
engine's own tokenizer differs; the hashes then still identify equal prompt prefixes, which is what
the router's prefix mirror needs.

Prompt forms of ``/v1/completions``: a string; a list of token ids (used as is); a list of strings
or of token-id lists (a batch: hashes of the first, length of all together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from isthmus.core.hashing import hash_token_blocks
from isthmus.core.tokenizer import ByteChunkTokenizer, Tokenizer, render_chat

DEFAULT_MAX_OUTPUT_TOKENS = 256


class BadRequest(ValueError):
    """The body is not a request the router can route (message says why, for a 400 answer)."""


@dataclass(slots=True)
class PromptInfo:
    """What the router reads of one request body.

    Attributes:
        model: the ``model`` field.
        stream: the ``stream`` field.
        prompt_tokens: prompt length in tokens (at least 1).
        block_hashes: chained hashes of the prompt's full blocks (empty when not asked for).
        max_output_tokens: ``max_completion_tokens`` / ``max_tokens``, else a default of 256.
        user: the ``user`` field, used as a session key by affinity policies.
        slo_class: the SLO class the body names in the field the router was told to read, if any.
    """

    model: str
    stream: bool
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    max_output_tokens: int
    user: str | None
    slo_class: str | None = None


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _encode(tokenizer: Tokenizer, text: str, ids: bool) -> tuple[Sequence[int], int]:
    """``text``'s token ids (empty when ``ids`` is false: only the count is needed) and their count."""
    if not ids:
        return (), tokenizer.count(text)
    out = tokenizer.encode(text)
    return out, len(out)


def _prompt_tokens(body: dict[str, Any], chat: bool, tokenizer: Tokenizer,
                   ids: bool = True) -> tuple[Sequence[int], int]:
    """Token ids to hash (the first prompt; may be empty when ``ids`` is false) and the total prompt length."""
    if chat:
        messages = body.get("messages")
        try:
            text = render_chat(messages)  # type: ignore[arg-type]  # validated inside
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return _encode(tokenizer, text, ids)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return _encode(tokenizer, prompt, ids)
    if _is_token_list(prompt) and prompt:
        return prompt, len(prompt)
    if isinstance(prompt, list) and prompt:
        seqs: list[Sequence[int]] = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                seqs.append(tokenizer.encode(p))
            elif _is_token_list(p):
                seqs.append(p)
            else:
                raise BadRequest(f"prompt[{i}] must be a string or a list of token ids")
        return seqs[0], sum(len(s) for s in seqs)
    raise BadRequest("'prompt' must be a non-empty string, list of strings or list of token ids")


def parse_request(raw: bytes, chat: bool, block_size: int, tokenizer: Tokenizer | None = None,
                  hashes: bool = True, slo_field: str | None = None) -> PromptInfo:
    """Read the routing facts of a ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` body.

    Args:
        raw: the body bytes.
        chat: the endpoint is chat completions (``messages``), else completions (``prompt``).
        block_size: tokens per KV block for the hashes.
        tokenizer: default :class:`~isthmus.core.tokenizer.ByteChunkTokenizer`.
        hashes: compute block hashes (skip for policies that never look at prefixes).
        slo_field: a body field naming the request's SLO class (a string), if the router reads one.

    Raises:
        BadRequest: malformed JSON, not an object, a missing or invalid field.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    max_out = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_out is None:
        max_out = DEFAULT_MAX_OUTPUT_TOKENS
    if isinstance(max_out, bool) or not isinstance(max_out, int) or max_out < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    user = body.get("user")
    slo_class = body.get(slo_field) if slo_field is not None else None
    if slo_class is not None and not isinstance(slo_class, str):
        raise BadRequest(f"'{slo_field}' must be a string naming an SLO class")
    ids, n = _prompt_tokens(body, chat, tokenizer if tokenizer is not None else ByteChunkTokenizer(), hashes)
    return PromptInfo(
        model=model,
        stream=stream,
        prompt_tokens=max(1, n),
        block_hashes=hash_token_blocks(ids, block_size) if hashes else (),
        max_output_tokens=max_out,
        user=user if isinstance(user, str) else None,
        slo_class=slo_class,
    )
