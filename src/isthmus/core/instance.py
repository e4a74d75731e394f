"""Static description of one serving replica."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """One replica: where it runs, on what, and the engine settings that shape its schedule.

    Attributes:
        id: unique replica id.
        region: region name (must exist in the topology).
        gpu: GPU profile name (see :mod:`isthmus.core.perf`).
        model: model profile name.
        num_kv_blocks: KV cache blocks; ``None`` derives it from GPU memory and model size the way
            vLLM does (``gpu_memory_utilization`` x memory - weights - activations).
        block_size: tokens per KV block (vLLM default 16).
        max_num_seqs: cap on running sequences per step.
        max_num_batched_tokens: token budget per step.
        enable_chunked_prefill: split long prompts over several steps (vLLM v1 default on).
        enable_prefix_caching: reuse cached prompt blocks (vLLM v1 default on).
        gpu_memory_utilization: share of GPU memory vLLM may use.
        reserve_full_isl: admit a waiting request only when blocks for its whole current sequence
            are free, not just for its first chunk (vLLM's ``scheduler_reserve_full_isl``, on by
            default in recent vLLM; it avoids admitting what would soon be preempted).
    """

    id: str
    region: str
    gpu: str
    model: str
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    reserve_full_isl: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(f"instance {self.id}: block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"instance {self.id}: num_kv_blocks must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"instance {self.id}: gpu_memory_utilization must be in (0, 1]")
