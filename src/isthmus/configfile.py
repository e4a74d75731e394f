"""Strict YAML configuration files with errors that name the file, the line and the field.

Shared by the shells that read user configuration (scenarios, the router). Loading rejects
duplicate keys (plain PyYAML keeps the last one silently) and builds only plain data (a
``SafeLoader``); every location in the document is mapped to its line, so a pydantic validation
error becomes ``file.yaml:14: replicas.0.gpu: unknown GPU 'B200'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from isthmus.core.errors import ConfigError, UnknownProfileError
from isthmus.core.perf import gpu_spec, model_spec

Loc = tuple[str | int, ...]


class FieldError(ValueError):
    """A validation failure located below the model that raises it.

    Raised inside a pydantic validator; :func:`format_validation_error` appends ``loc`` to the
    location pydantic reports for the validator's model, so the message names the exact field.
    """

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_index(node: yaml.Node | None, loc: Loc = (), out: dict[Loc, int] | None = None) -> dict[Loc, int]:
    """Map every location in a composed YAML tree to its 1-based line."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*loc, str(key_node.value))
            out[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for k, item in enumerate(node.value):
            child = (*loc, k)
            out[child] = item.start_mark.line + 1
            _line_index(item, child, out)
    return out


def read_yaml(path: Path, what: str = "config") -> tuple[Any, dict[Loc, int]]:
    """The document in ``path`` and the line of every location in it.

    Raises:
        ConfigError: the file is missing or unreadable (``no such {what} file``), or is not valid
            YAML (``path:line:column: YAML syntax error: ...``), or repeats a key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
        lines = _line_index(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    return data, lines


M = TypeVar("M", bound=BaseModel)


def load_model(path: Path, model: type[M], what: str) -> tuple[M, dict[Loc, int]]:
    """The YAML mapping in ``path`` validated as ``model``, and the line of each of its fields.

    Raises:
        ConfigError: naming the file, the line and the dotted path of the first bad fields (``what``
            names the kind of file in messages).
    """
    data, lines = read_yaml(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data), lines
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, lines)) from None


def line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """Line of ``loc``, or of its nearest ancestor present in the file."""
    for n in range(len(loc), -1, -1):
        key = tuple(str(p) if isinstance(p, str) else p for p in loc[:n])
        if key in lines:
            return lines[key]
    return None


def dotted(loc: Loc) -> str:
    """``replicas.0.gpu`` for ``("replicas", 0, "gpu")``."""
    return ".".join(str(p) for p in loc) or "(top level)"


def where(path: Path | None, loc: Loc, lines: Mapping[Loc, int] | None) -> str:
    """``path:line: dotted.field`` for ``loc`` (the line left out when unknown)."""
    line = line_of(loc, lines) if lines else None
    if path is None:
        return dotted(loc)
    return f"{path}:{line}: {dotted(loc)}" if line is not None else f"{path}: {dotted(loc)}"


def format_validation_error(exc: ValidationError, source: Path | None, lines: Mapping[Loc, int] | None = None,
                            prefix: Loc = (), limit: int = 5) -> str:
    """One line naming the file, the line and the dotted path of each bad field (at most ``limit``)."""
    parts: list[str] = []
    errors = exc.errors(include_url=False)
    # A container whose items failed is also reported "too short"; the item errors say it better.
    failed = [tuple(e["loc"]) for e in errors]
    errors = [e for e in errors if not (e["type"] == "too_short" and any(
        len(f) > len(e["loc"]) and f[: len(e["loc"])] == tuple(e["loc"]) for f in failed))]
    for err in errors[:limit]:
        loc: Loc = (*prefix, *err["loc"])
        msg = err["msg"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = (*loc, *cause.loc)
            msg = cause.message
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where(source, loc, lines)}: {msg}")
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more")
    return "; ".join(parts)


def gpu_name(name: str) -> str:
    """The built-in GPU profile's canonical name for ``name`` (aliases accepted); ``ValueError`` if none."""
    try:
        return gpu_spec(name).name
    except UnknownProfileError as exc:
        raise ValueError(str(exc)) from None


def model_name(name: str) -> str:
    """The built-in model profile's canonical name for ``name``; ``ValueError`` if none."""
    try:
        return model_spec(name).name
    except UnknownProfileError as exc:
        raise ValueError(str(exc)) from None
