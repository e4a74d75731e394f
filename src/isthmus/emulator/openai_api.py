"""The OpenAI API as vLLM serves it: request validation, response bodies and stream chunks.

Pure functions over parsed JSON; the HTTP side is in :mod:`isthmus.emulator.app`.

Requests. ``/v1/completions`` takes ``prompt`` as a string, a list of token ids, or a one-element
list of either; ``/v1/chat/completions`` takes ``messages``, rendered to one prompt by
:func:`isthmus.core.tokenizer.render_chat` (a router gets the same ids from
:func:`~isthmus.core.tokenizer.completion_prompt_ids` and
:func:`~isthmus.core.tokenizer.chat_prompt_ids`). Both take ``model`` (optional, else the served
model; any other name is a 404), ``stream``, ``stream_options`` (``include_usage``,
``continuous_usage_stats``; only with ``stream: true``), ``n`` (1 only), ``seed`` (seeds the
generated text) and the output length: ``max_tokens`` (completions: default 16, as vLLM) or
``max_completion_tokens`` / ``max_tokens`` (chat: default all the context left) and ``priority``
(vLLM's, an integer, default 0: the engine's waiting queue admits lower values first, arrival order
within one value; a non-integer is a 400 naming the field). The engine
generates exactly that many tokens (vLLM with ``ignore_eos``: the filler text has no
end-of-sequence); ``finish_reason`` is therefore always ``"length"``. A prompt that fills the
context, or a prompt plus ``max_tokens`` beyond ``max_model_len``, is a 400 with vLLM's message, as
in vLLM (nothing is silently cut). Every other field (``temperature``, ``stop``, ``logprobs``,
``echo``, ...) is accepted and ignored, as vLLM ignores fields it does not know.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status as ``code``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from isthmus.core.tokenizer import Tokenizer, chat_prompt_ids, completion_prompt_ids

DEFAULT_COMPLETION_MAX_TOKENS = 16

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}

DONE_EVENT = b"data: [DONE]\n\n"


def error_type(status: int) -> str:
    """vLLM's ``type`` for an error with this status (``BadRequestError``, ``NotFoundError``, ...)."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return "".join(w.capitalize() for w in phrase.replace("-", " ").split()) + "Error"


class ApiError(Exception):
    """An error answered with an OpenAI-style body.

    Attributes:
        status: HTTP status.
        message: human-readable reason.
        param: the request field at fault, if one is.
    """

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A validated generation request.

    Attributes:
        chat: a chat completion (else a text completion).
        prompt_ids: the prompt's token ids.
        max_tokens: tokens to generate (>= 1).
        stream: answer with server-sent events.
        include_usage: end the stream with a usage chunk.
        continuous_usage: put the running usage in every chunk.
        seed: the request's ``seed``, if any.
        priority: scheduling priority, lower first (vLLM's convention; 0 unless the body gives one).
    """

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    seed: int | None
    priority: int = 0


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer", key)
    return v


def _opt_bool(data: Mapping[str, Any], key: str) -> bool:
    v = data.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be a boolean", key)
    return v


def parse_generation(data: Any, *, chat: bool, served_model: str, tokenizer: Tokenizer,
                     max_model_len: int) -> GenerationParams:
    """Validate a ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` body.

    Raises :class:`ApiError`: 404 for another model, 400 for anything else that is wrong.
    """
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = data.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model")
        if model != served_model:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
    n = _opt_int(data, "n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stream = _opt_bool(data, "stream")
    options = data.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        include_usage = _opt_bool(options, "include_usage")
        continuous = _opt_bool(options, "continuous_usage_stats")
    seed = _opt_int(data, "seed")
    priority = _opt_int(data, "priority")

    if chat:
        try:
            prompt_ids = chat_prompt_ids(data.get("messages"), tokenizer)
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from None
        max_tokens = _opt_int(data, "max_completion_tokens")
        key = "max_completion_tokens"
        if max_tokens is None:
            max_tokens = _opt_int(data, "max_tokens")
            key = "max_tokens"
    else:
        try:
            prompt_ids = completion_prompt_ids(data.get("prompt"), tokenizer)
        except ValueError as exc:
            raise ApiError(400, str(exc), "prompt") from None
        key = "max_tokens"
        max_tokens = _opt_int(data, "max_tokens") if "max_tokens" in data else DEFAULT_COMPLETION_MAX_TOKENS
    p = len(prompt_ids)
    if p == 0:
        raise ApiError(400, "The prompt is empty.", "messages" if chat else "prompt")
    if p >= max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your request "
                            f"has {p} input tokens. Please reduce the length of the input messages.",
                       "messages" if chat else "prompt")
    if max_tokens is None:
        max_tokens = max_model_len - p
    if max_tokens < 1:
        raise ApiError(400, f"'{key}' must be at least 1, got {max_tokens}", key)
    if p + max_tokens > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                            f"{p + max_tokens} tokens ({p} in the messages, {max_tokens} in the completion). "
                            "Please reduce the length of the messages or completion.", key)
    return GenerationParams(chat=chat, prompt_ids=prompt_ids, max_tokens=max_tokens, stream=stream,
                            include_usage=include_usage, continuous_usage=continuous, seed=seed,
                            priority=0 if priority is None else priority)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A whole ``text_completion`` response."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "prompt_logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(rid: str, created: int, model: str, text: str, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
    """A whole ``chat.completion`` response."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(doc: Any) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return b"data: " + orjson.dumps(doc) + b"\n\n"


class StreamFormatter:
    """The chunks of one streamed response, in vLLM's shapes."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, prompt_tokens: int,
                 continuous_usage: bool) -> None:
        self._head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": created, "model": model}
        self._chat = chat
        self._prompt_tokens = prompt_tokens
        self._continuous = continuous_usage

    def role_chunk(self) -> bytes:
        """The first chunk of a chat stream: the assistant role and no text."""
        doc: dict[str, Any] = {**self._head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
        if self._continuous:
            doc["usage"] = usage(self._prompt_tokens, 0)
        return sse(doc)

    def token_chunk(self, text: str, completion_tokens: int, last: bool) -> bytes:
        """One token's chunk; the last one carries ``finish_reason: "length"``."""
        reason = "length" if last else None
        choice: dict[str, Any]
        if self._chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": reason,
                      "stop_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
        doc: dict[str, Any] = {**self._head, "choices": [choice]}
        if self._continuous:
            doc["usage"] = usage(self._prompt_tokens, completion_tokens)
        return sse(doc)

    def usage_chunk(self, completion_tokens: int) -> bytes:
        """The final chunk under ``include_usage``: no choices, the totals."""
        return sse({**self._head, "choices": [], "usage": usage(self._prompt_tokens, completion_tokens)})

    @staticmethod
    def error_chunk(status: int, message: str) -> bytes:
        """An error reported inside a stream (vLLM's shape)."""
        return sse(error_body(status, message))
