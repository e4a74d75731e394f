"""Settings of one engine double, resolved and checked once at start-up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from isthmus.core.errors import ConfigError, IsthmusError
from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import RooflinePerfModel, builtin_perf_model

KvEventsEncoding = Literal["array", "map"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted (413 beyond); 8 MiB holds a 2-million-character prompt."""

DEFAULT_CONTEXT_LEN = 8192
"""Context length of a model profile not listed in :data:`MODEL_CONTEXT_LEN`."""

MODEL_CONTEXT_LEN: dict[str, int] = {
    # ``max_position_embeddings`` of each built-in profile's config.json: vLLM's default max_model_len
    "Llama-3.1-8B": 131072,
    "Llama-3-8B": 8192,
    "Mistral-7B": 32768,
    "Llama-2-7B": 4096,
}


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Failures the engine double injects (see :mod:`isthmus.emulator` for how each one shows).

    Attributes:
        error_rate: share of generation requests answered with ``error_status`` instead, in [0, 1]
            (drawn from the seeded generator, so a run is repeatable).
        error_status: HTTP status of an injected error (500 to 599).
        stall_after: stop sending a stream after this many ``data:`` events (0: after the
            headers); ``None``: no stall. A non-streamed reply is held back instead.
        stall_s: how long a stall lasts, seconds; ``None``: until the client goes away.
        die_after: end a stream abruptly after this many ``data:`` events (a non-streamed
            request gets no reply at all); ``None``: never.
        die_exit: when dying, end the whole process (``os._exit(1)``) instead of only closing that
            connection.
        unhealthy: ``GET /health`` answers 503.
    """

    error_rate: float = 0.0
    error_status: int = 500
    stall_after: int | None = None
    stall_s: float | None = None
    die_after: int | None = None
    die_exit: bool = False
    unhealthy: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ConfigError(f"fault error_rate must be in [0, 1], got {self.error_rate}")
        if not 500 <= self.error_status <= 599:
            raise ConfigError(f"fault error_status must be a 5xx status, got {self.error_status}")
        for name in ("stall_after", "die_after"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"fault {name} must be >= 0, got {v}")
        if self.stall_s is not None and not (self.stall_s >= 0.0 and math.isfinite(self.stall_s)):
            raise ConfigError(f"fault stall_s must be a finite number >= 0, got {self.stall_s}")

    @property
    def active(self) -> bool:
        """Whether any fault is set."""
        return self != FaultSpec()


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything ``isthmus emulate`` takes; :meth:`resolve` derives the engine's figures.

    Engine settings left ``None`` take :class:`~isthmus.core.instance.InstanceSpec`'s defaults
    (vLLM's); ``num_gpu_blocks`` ``None`` derives the KV block count from the GPU and model
    profiles the way vLLM does; ``max_model_len`` ``None`` is the model's context length
    (:data:`MODEL_CONTEXT_LEN`) capped to what the KV cache holds.

    Attributes:
        model: built-in model profile (step times, KV bytes per token).
        gpu: built-in GPU profile.
        served_model_name: the name clients must send as ``model``; ``None``: ``model``.
        host, port: where to listen (port 0: any free port, logged when ready).
        tokenizer: a ``tokenizer.json`` to tokenize with; ``None``: the built-in byte-chunk one.
        time_scale: wall seconds per modelled second (0.01 runs 100x faster than the GPU would).
        seed: seeds generated text and injected errors.
        max_body_bytes: request bodies above this get 413.
        kv_events_endpoint: ZMQ endpoint the KV-event PUB socket binds (``None``: no events).
        kv_events_connect: connect the PUB socket to the endpoint instead of binding it.
        kv_events_encoding: ``"array"`` (older vLLM) or ``"map"`` (newer vLLM).
        kv_events_topic: ZMQ topic frame.
        faults: failures injected from the start (``POST /admin/fault`` changes them).
        refuse_connections: accept TCP connections and reset them at once; no HTTP at all.
        admin: serve ``/admin/fault`` and ``/reset_prefix_cache`` (to loopback clients only).
        shutdown_timeout_s: on SIGTERM, how long in-flight requests may take to finish.
        access_log: log every HTTP request.
    """

    model: str = "Llama-3.1-8B"
    gpu: str = "H100"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    tokenizer: Path | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    time_scale: float = 1.0
    seed: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    kv_events_endpoint: str | None = None
    kv_events_connect: bool = False
    kv_events_encoding: KvEventsEncoding = "array"
    kv_events_topic: str = ""
    faults: FaultSpec = field(default_factory=FaultSpec)
    refuse_connections: bool = False
    admin: bool = True
    shutdown_timeout_s: float = 30.0
    access_log: bool = False

    def __post_init__(self) -> None:
        if not (self.time_scale > 0.0 and math.isfinite(self.time_scale)):
            raise ConfigError(f"--time-scale must be a positive number, got {self.time_scale}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ConfigError("--max-body-bytes must be >= 1")
        if self.kv_events_encoding not in ("array", "map"):
            raise ConfigError(f"--kv-events-encoding must be 'array' or 'map', got {self.kv_events_encoding!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("--max-model-len must be >= 2")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("--shutdown-timeout must be >= 0")

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.served_model_name or self.model

    def resolve(self) -> ResolvedEngine:
        """The perf model, the replica's spec, its KV block count and the context length.

        Raises :class:`~isthmus.core.errors.ConfigError` for an unknown profile, invalid engine
        settings, or an explicit ``max_model_len`` larger than the KV cache (as vLLM refuses it).
        """
        try:
            perf = builtin_perf_model(self.gpu, self.model)
            engine_kw: dict[str, int | float | bool] = {
                k: v for k, v in (("max_num_seqs", self.max_num_seqs),
                                  ("max_num_batched_tokens", self.max_num_batched_tokens),
                                  ("block_size", self.block_size),
                                  ("gpu_memory_utilization", self.gpu_memory_utilization))
                if v is not None
            }
            spec = InstanceSpec("emulator", "local", perf.gpu.name, perf.model.name, num_kv_blocks=self.num_gpu_blocks,
                                enable_prefix_caching=self.enable_prefix_caching,
                                enable_chunked_prefill=self.enable_chunked_prefill,
                                **engine_kw)  # type: ignore[arg-type]
            blocks = spec.num_kv_blocks or perf.num_kv_blocks(spec.block_size, spec.gpu_memory_utilization)
        except (ValueError, IsthmusError) as exc:
            raise ConfigError(str(exc)) from None
        capacity = blocks * spec.block_size
        # without chunked prefill a whole prompt must fit one step's token budget
        step_cap = capacity if spec.enable_chunked_prefill else min(capacity, spec.max_num_batched_tokens)
        if self.max_model_len is None:
            max_len = min(MODEL_CONTEXT_LEN.get(perf.model.name, DEFAULT_CONTEXT_LEN), step_cap)
        elif self.max_model_len > capacity:
            raise ConfigError(f"--max-model-len {self.max_model_len} is larger than the KV cache holds "
                              f"({blocks} blocks x {spec.block_size} = {capacity} tokens)")
        elif self.max_model_len > step_cap:
            raise ConfigError(f"--max-model-len {self.max_model_len} is larger than --max-num-batched-tokens "
                              f"{spec.max_num_batched_tokens} without chunked prefill")
        else:
            max_len = self.max_model_len
        return ResolvedEngine(perf=perf, spec=spec, num_blocks=blocks, max_model_len=max_len)


@dataclass(frozen=True, slots=True)
class ResolvedEngine:
    """What :meth:`EmulatorConfig.resolve` derives: the figures the engine runs with."""

    perf: RooflinePerfModel
    spec: InstanceSpec
    num_blocks: int
    max_model_len: int
