"""The router's HTTP-edge errors: each maps to a status and an OpenAI-style error body.

OpenAI's shape (and vLLM's)::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}

Inside an SSE stream the same object goes in one ``data:`` event (vLLM's streaming error form), which
the ``openai`` client raises as an ``APIError``.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from isthmus.core.errors import IsthmusError


class RouterHTTPError(IsthmusError):
    """An answer the router gives itself instead of relaying one.

    Attributes:
        status: HTTP status.
        message: human-readable, safe to show the client (never carries secrets).
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        code: OpenAI error code, or ``None``.
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON error body."""
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type: str, code: str | int | None = None) -> bytes:
    """An OpenAI-style error body."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})


def sse_error_event(message: str, code: int = 502, type: str = "upstream_error") -> bytes:
    """One SSE event carrying an error (no ``[DONE]`` follows it)."""
    err = {"object": "error", "message": message, "type": type, "param": None, "code": code}
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


def unauthorized() -> RouterHTTPError:
    return RouterHTTPError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                           "invalid_request_error", "invalid_api_key")


def model_not_found(model: str, known: tuple[str, ...]) -> RouterHTTPError:
    return RouterHTTPError(404, f"The model {model!r} does not exist; served models: {list(known)}",
                           "invalid_request_error", "model_not_found")


def unavailable(message: str, retry_after_s: int) -> RouterHTTPError:
    return RouterHTTPError(503, message, "server_error", "service_unavailable",
                           {"retry-after": str(retry_after_s)})
