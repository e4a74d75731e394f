"""``isthmus emulate``: one engine double per process.

The command function only parses options into an :class:`~isthmus.emulator.config.EmulatorConfig`;
the server and its dependencies are imported when it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from isthmus.core.errors import IsthmusError
from isthmus.core.instance import InstanceSpec

_ENGINE = "Engine (vLLM's flags)"
_FAULTS = "Fault injection"
_EVENTS = "KV events"


def _default(name: str) -> object:
    return InstanceSpec.__dataclass_fields__[name].default


def emulate(
    model: Annotated[str, typer.Option(help="Model profile the step times come from (built-in: Llama-3.1-8B, "
                                            "Llama-3-8B, Mistral-7B, Llama-2-7B).")] = "Llama-3.1-8B",
    gpu: Annotated[str, typer.Option(help="GPU profile (built-in: H100, A100-80GB, A30, V100, L4, L40S, "
                                          "RTX4090).")] = "H100",
    served_model_name: Annotated[str | None, typer.Option(
        help="Name clients send as 'model' (default: --model).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port; the log says which).")] = 8000,
    tokenizer: Annotated[Path | None, typer.Option(
        metavar="PATH", help="A tokenizer.json (or a directory holding one) to count and hash prompt tokens with "
                             "(default: built-in 4-byte chunks).")] = None,
    max_model_len: Annotated[int | None, typer.Option(
        min=2, rich_help_panel=_ENGINE,
        help="Context length (default: the model's, capped to what the KV cache holds).")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        min=1, rich_help_panel=_ENGINE, help=f"Sequences per step (default {_default('max_num_seqs')}).")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        min=1, rich_help_panel=_ENGINE,
        help=f"Token budget per step (default {_default('max_num_batched_tokens')}).")] = None,
    num_gpu_blocks: Annotated[int | None, typer.Option(
        "--num-gpu-blocks", "--num-gpu-blocks-override", min=1, rich_help_panel=_ENGINE,
        help="KV blocks (default: from GPU memory and model size, as vLLM computes them).")] = None,
    block_size: Annotated[int | None, typer.Option(
        min=1, rich_help_panel=_ENGINE, help=f"Tokens per KV block (default {_default('block_size')}).")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        min=0.01, max=1.0, rich_help_panel=_ENGINE,
        help=f"Share of GPU memory for weights and KV (default {_default('gpu_memory_utilization')}).")] = None,
    enable_prefix_caching: Annotated[bool, typer.Option(
        "--enable-prefix-caching/--no-enable-prefix-caching", rich_help_panel=_ENGINE)] = True,
    enable_chunked_prefill: Annotated[bool, typer.Option(
        "--enable-chunked-prefill/--no-enable-chunked-prefill", rich_help_panel=_ENGINE)] = True,
    time_scale: Annotated[float, typer.Option(
        help="Wall seconds per modelled second (0.01: steps run 100x faster than on the GPU).")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seeds the generated text and injected errors.")] = 0,
    max_body_bytes: Annotated[int, typer.Option(
        min=1, help="Largest request body; larger ones get 413.")] = 8 * 1024 * 1024,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0.0, help="On SIGTERM, seconds in-flight requests may take to finish (0: no limit).")] = 30.0,
    admin: Annotated[bool, typer.Option(
        "--admin/--no-admin", help="Serve POST /admin/fault and /reset_prefix_cache to loopback clients.")] = True,
    kv_events_endpoint: Annotated[str | None, typer.Option(
        metavar="tcp://127.0.0.1:PORT", rich_help_panel=_EVENTS,
        help="Publish KV-cache events on a ZMQ PUB socket bound here (port '*': any free port).")] = None,
    kv_events_connect: Annotated[bool, typer.Option(
        rich_help_panel=_EVENTS, help="Connect the PUB socket to the endpoint instead of binding it.")] = False,
    kv_events_encoding: Annotated[str, typer.Option(
        rich_help_panel=_EVENTS, help="'array' (older vLLM: tagged arrays) or 'map' (newer vLLM).")] = "array",
    kv_events_topic: Annotated[str, typer.Option(rich_help_panel=_EVENTS, help="ZMQ topic frame.")] = "",
    fault_refuse: Annotated[bool, typer.Option(
        rich_help_panel=_FAULTS, help="Reset every TCP connection on accept; serve nothing.")] = False,
    fault_error_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, rich_help_panel=_FAULTS,
        help="Share of generation requests answered with --fault-error-status.")] = 0.0,
    fault_error_status: Annotated[int, typer.Option(
        min=500, max=599, rich_help_panel=_FAULTS, help="Status of injected errors.")] = 500,
    fault_stall_after: Annotated[int | None, typer.Option(
        min=0, rich_help_panel=_FAULTS,
        help="Stop a stream after this many data events (a whole reply: hold it back).")] = None,
    fault_stall_seconds: Annotated[float | None, typer.Option(
        min=0.0, rich_help_panel=_FAULTS, help="How long a stall lasts (default: until the client leaves).")] = None,
    fault_die_after: Annotated[int | None, typer.Option(
        min=0, rich_help_panel=_FAULTS,
        help="Close a stream's connection abruptly after this many data events (a whole reply: after its "
             "headers).")] = None,
    fault_die_exit: Annotated[bool, typer.Option(
        rich_help_panel=_FAULTS, help="When dying, exit the whole process (status 1) instead.")] = False,
    fault_unhealthy: Annotated[bool, typer.Option(
        rich_help_panel=_FAULTS, help="GET /health answers 503.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
) -> None:
    """Serve a vLLM-compatible engine double: no GPU, real scheduling and prefix caching.

    OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), /health and vLLM's /metrics; the
    engine's steps take the time the performance model gives them, times --time-scale. See the
    isthmus.emulator module for the fault modes and the KV event format.
    """
    from isthmus.emulator.config import EmulatorConfig, FaultSpec, KvEventsEncoding

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if kv_events_encoding not in ("array", "map"):
        raise typer.BadParameter("must be 'array' or 'map'", param_hint="--kv-events-encoding")
    encoding: KvEventsEncoding = "array" if kv_events_encoding == "array" else "map"
    try:
        faults = FaultSpec(error_rate=fault_error_rate, error_status=fault_error_status,
                           stall_after=fault_stall_after, stall_s=fault_stall_seconds, die_after=fault_die_after,
                           die_exit=fault_die_exit, unhealthy=fault_unhealthy)
        config = EmulatorConfig(
            model=model, gpu=gpu, served_model_name=served_model_name, host=host, port=port, tokenizer=tokenizer,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            num_gpu_blocks=num_gpu_blocks, block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            time_scale=time_scale, seed=seed, max_body_bytes=max_body_bytes, kv_events_endpoint=kv_events_endpoint,
            kv_events_connect=kv_events_connect, kv_events_encoding=encoding, kv_events_topic=kv_events_topic,
            faults=faults, refuse_connections=fault_refuse, admin=admin, shutdown_timeout_s=shutdown_timeout,
            access_log=access_log,
        )
        from isthmus.emulator.server import serve

        serve(config)
    except IsthmusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
