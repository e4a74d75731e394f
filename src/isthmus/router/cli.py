"""``isthmus serve CONFIG.yaml``: the live router."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXIT_CONFIG = 2


def serve(
    config: Annotated[Path, typer.Argument(help="Router config (YAML).", show_default=False)],
    host: Annotated[str | None, typer.Option(help="Listen on this address (default: the config's).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Listen on this port (default: the config's).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error (default: the config's).")] = None,
) -> None:
    """Serve the OpenAI-compatible router in front of vLLM / SGLang replicas (or engine doubles).

    Routes each /v1/completions and /v1/chat/completions request with the configured policy, relays
    the answer byte for byte, and exports its own /metrics. SIGTERM drains in-flight requests.
    A bad config exits with code 2 and one line naming the file, line and field.
    """
    from isthmus.core.errors import ConfigError
    from isthmus.router.config import load_config

    try:
        cfg = load_config(config)
        updates: dict[str, object] = {}
        if host is not None or port is not None:
            updates["listen"] = cfg.listen.model_copy(update={k: v for k, v in (("host", host), ("port", port))
                                                              if v is not None})
        if log_level is not None:
            if log_level not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
            updates["log_level"] = log_level
        if updates:
            cfg = cfg.model_copy(update=updates)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    try:
        from isthmus.router.server import run
    except ImportError as exc:
        typer.echo(f"error: the router needs the 'serve' extra (pip install 'isthmus[serve]'): {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    run(cfg)
