"""Step-time models: how long one engine iteration takes for a given batch.

The engine calls :meth:`PerfModel.step_time` once per scheduler step with the batch's aggregate shape.
The built-in model is the roofline form of MODELS.md §1 (the common core of DistServe's fits and
BLIS's roofline model)::

    t_step = c0 + c_seq * n_seqs
           + max(W_bytes / (BW * bw_eff),                       # weights streamed once per step
                 2 * P_body * (N_prefill / mfu_prefill + N_decode / mfu_decode) / FLOPS
                 + 2 * V * H * n_seqs / (FLOPS * mfu_decode))   # dense compute; LM head per sequence
           + k_p * sum_i chunk_i * (ctx_i + chunk_i / 2)        # prefill attention (causal)
           + k_d * sum_j ctx_j                                  # decode attention (KV reads)

with ``P_body = P - 2 * V * H`` (the embedding is a lookup and the LM head runs once per sampled
sequence, not per token), ``k_p = 4 * layers * n_heads * head_dim / (FLOPS * mfu_prefill)`` (QK^T and
PV, two FLOPs per multiply-add) and ``k_d = kv_bytes_per_token / (BW * kv_bw_eff)``.

Each coefficient's source is in the docstring of the spec that carries it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from isthmus.core.errors import UnknownProfileError


class PerfModel(Protocol):
    """Duration of one engine step, seconds, from the batch's aggregate shape.

    Args:
        prefill_tokens: prompt tokens computed this step, summed over prefilling requests.
        prefill_attn: ``sum_i chunk_i * (ctx_i + chunk_i / 2)`` over prefilling requests, where
            ``ctx_i`` is the tokens already in the KV cache before the chunk (cached prefix included).
        num_prefill: requests prefilling this step.
        num_decode: requests decoding one token this step.
        decode_ctx: ``sum_j ctx_j`` over decoding requests (tokens in their KV cache).
    """

    def step_time(
        self, prefill_tokens: int, prefill_attn: float, num_prefill: int, num_decode: int, decode_ctx: int
    ) -> float: ...


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A GPU type's public peak figures and the efficiencies reached under vLLM.

    Attributes:
        name: profile name.
        tflops: dense BF16/FP16 tensor peak, TFLOP/s (vendor datasheets).
        mem_bw_tbs: HBM / GDDR bandwidth, TB/s (vendor datasheets).
        memory_bytes: memory as the CUDA driver reports it (what vLLM's utilization applies to).
        mfu_prefill: achieved share of ``tflops`` on prefill GEMMs.
        mfu_decode: achieved share of ``tflops`` on decode GEMMs.
        bw_eff: achieved share of ``mem_bw_tbs`` when streaming weights.
        source: where the figures come from.
        kv_bw_eff: achieved share of ``mem_bw_tbs`` when decode attention reads the KV cache
            (scattered 16-token pages, lower than weight streaming); ``None`` = ``0.8 * bw_eff``,
            the ratio measured on the RTX 4090 profile.
    """

    name: str
    tflops: float
    mem_bw_tbs: float
    memory_bytes: float
    mfu_prefill: float
    mfu_decode: float
    bw_eff: float
    source: str
    kv_bw_eff: float | None = None

    @property
    def kv_efficiency(self) -> float:
        return self.kv_bw_eff if self.kv_bw_eff is not None else 0.8 * self.bw_eff


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A dense transformer's shape.

    Attributes:
        name: profile name.
        params: parameter count (embeddings and LM head included).
        layers, hidden, heads, kv_heads, head_dim, vocab: architecture (the model's ``config.json``).
        bytes_per_param: 2 for BF16/FP16 weights.
        activation_bytes: memory vLLM's start-up profiling reserves besides weights and KV (peak
            activations at ``max_num_batched_tokens`` = 2048, CUDA graphs, allocator slack).
        source: where the figures come from.
    """

    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    bytes_per_param: int
    activation_bytes: float
    source: str

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: ``2 * layers * kv_heads * head_dim * 2`` bytes (BF16)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


# Efficiencies: MFU for H100 and A100 are BLIS's values calibrated against vLLM
# (shared/traces/blis_params/hardware_config.json). bw_eff 0.78 reproduces the observed decode anchors
# of MODELS.md §1 (Llama-3.1-8B: 6.5 ms/token on H100, 13.3 ms/token on A100-40GB at concurrency 1:
# 16.06 GB / (3.35 TB/s * 0.78) = 6.1 ms, 16.06 GB / (1.555 TB/s * 0.78) = 13.2 ms). For GPUs BLIS
# does not cover, the MFU is an assumption stated in ``source``.
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H100", 989.5, 3.35, 85.0e9, 0.45, 0.30, 0.78,
                "H100 SXM datasheet; MFU from BLIS hardware_config.json; bw_eff from the 6.5 ms TPOT anchor"),
        GpuSpec("A100-80GB", 312.0, 2.039, 85.1e9, 0.38, 0.18, 0.78,
                "A100 SXM 80GB datasheet; MFU from BLIS hardware_config.json; bw_eff from the 13.3 ms TPOT anchor"),
        GpuSpec("A30", 165.0, 0.933, 25.3e9, 0.38, 0.18, 0.78,
                "A30 datasheet (165 TF BF16 dense, 933 GB/s, 24 GB); MFU and bw_eff assumed equal to A100 (same Ampere GA100 die)"),
        GpuSpec("V100", 125.0, 0.900, 34.1e9, 0.30, 0.15, 0.75,
                "V100 SXM2 32GB datasheet (125 TF FP16 tensor, 900 GB/s); MFU assumed below Ampere (no BF16, older tensor cores)"),
        GpuSpec("L4", 121.0, 0.300, 23.8e9, 0.32, 0.08, 0.78,
                "L4 datasheet (121 TF BF16 dense, 300 GB/s, 24 GB); MFU assumed equal to BLIS's L40S (same Ada generation)"),
        GpuSpec("RTX4090", 165.2, 1.008, 25.25e9, 0.90, 0.45, 0.97,
                "Ada whitepaper (165.2 TF BF16 with FP32 accumulate, 1008 GB/s); memory as vLLM 0.19 reported it; "
                "MFU and bw_eff from LLMServingSim's per-layer vLLM profile of Llama-3.1-8B (dense GEMMs at 2048 tokens "
                "run at ~158 TF/s; a 1-token decode streams 16 GB in 16.3 ms; decode attention reads KV at ~78 % "
                "of peak)", kv_bw_eff=0.78),
        GpuSpec("L40S", 362.05, 0.864, 48.3e9, 0.32, 0.08, 0.78,
                "L40S datasheet; MFU from BLIS hardware_config.json"),
    )
}

# activation_bytes for the 7-8B models: vLLM 0.19 on an RTX 4090 left 2,588 blocks (41,408 tokens,
# 5.43 GB) for Llama-3.1-8B from 0.9 x 25.25 GB - 16.06 GB of weights, so the rest, 1.24 GB, went to
# activations and graphs (llmservingsim_data/vllm_ground_truth/RTX4090/Llama-3.1-8B/meta.json).
_ACT_7B = 1.24e9
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("Llama-3.1-8B", 8.03e9, 32, 4096, 32, 8, 128, 128256, 2, _ACT_7B,
                  "meta-llama/Llama-3.1-8B config.json (GQA, 8 KV heads: 128 KiB KV per token)"),
        ModelSpec("Llama-3-8B", 8.03e9, 32, 4096, 32, 8, 128, 128256, 2, _ACT_7B,
                  "meta-llama/Meta-Llama-3-8B config.json (same shape as Llama-3.1-8B)"),
        ModelSpec("Mistral-7B", 7.25e9, 32, 4096, 32, 8, 128, 32768, 2, _ACT_7B,
                  "mistralai/Mistral-7B-Instruct-v0.3 config.json (GQA, 8 KV heads: 128 KiB KV per token)"),
        ModelSpec("Llama-2-7B", 6.74e9, 32, 4096, 32, 32, 128, 32000, 2, _ACT_7B,
                  "meta-llama/Llama-2-7b-hf config.json (MHA: 512 KiB KV per token)"),
    )
}

_ALIASES: dict[str, str] = {
    "a100": "A100-80GB", "a100-80g": "A100-80GB", "a100-80gb": "A100-80GB", "a100-sxm": "A100-80GB",
    "h100": "H100", "h100-80gb": "H100", "a30": "A30", "v100": "V100", "l4": "L4", "l40s": "L40S",
    "rtx4090": "RTX4090", "rtx-4090": "RTX4090", "4090": "RTX4090",
    "llama-3.1-8b": "Llama-3.1-8B", "meta-llama/llama-3.1-8b": "Llama-3.1-8B",
    "meta-llama/llama-3.1-8b-instruct": "Llama-3.1-8B",
    "llama-3-8b": "Llama-3-8B", "meta-llama/meta-llama-3-8b": "Llama-3-8B",
    "mistral-7b": "Mistral-7B", "mistralai/mistral-7b-instruct-v0.3": "Mistral-7B",
    "llama-2-7b": "Llama-2-7B", "meta-llama/llama-2-7b-hf": "Llama-2-7B",
}


def gpu_spec(name: str) -> GpuSpec:
    """The built-in GPU profile called ``name`` (case-insensitive, common aliases accepted)."""
    key = name if name in GPUS else _ALIASES.get(name.lower(), name)
    if key not in GPUS:
        raise UnknownProfileError(f"unknown GPU {name!r}; built-in: {sorted(GPUS)}")
    return GPUS[key]


def model_spec(name: str) -> ModelSpec:
    """The built-in model profile called ``name`` (case-insensitive, common aliases accepted)."""
    key = name if name in MODELS else _ALIASES.get(name.lower(), name)
    if key not in MODELS:
        raise UnknownProfileError(f"unknown model {name!r}; built-in: {sorted(MODELS)}")
    return MODELS[key]


class RooflinePerfModel:
    """The roofline step-time model of the module docstring for one (GPU, model) pair.

    ``c0_s`` (0.13 ms) and ``c_seq_s`` (4.4 µs per sequence) are BLIS's fitted per-step and
    per-sequence overheads (MODELS.md §1). Immutable; coefficients are computed once.
    """

    __slots__ = ("_dense_d", "_dense_p", "_head", "_k_d", "_k_p", "_weights", "c0_s", "c_seq_s", "gpu", "model")

    def __init__(self, gpu: GpuSpec, model: ModelSpec, c0_s: float = 0.13e-3, c_seq_s: float = 4.4e-6) -> None:
        self.gpu = gpu
        self.model = model
        self.c0_s = c0_s
        self.c_seq_s = c_seq_s
        flops = gpu.tflops * 1e12
        bw = gpu.mem_bw_tbs * 1e12
        vh = float(model.vocab * model.hidden)
        body = model.params - 2.0 * vh
        self._weights = model.weight_bytes / (bw * gpu.bw_eff)
        self._dense_p = 2.0 * body / (flops * gpu.mfu_prefill)
        self._dense_d = 2.0 * body / (flops * gpu.mfu_decode)
        self._head = 2.0 * vh / (flops * gpu.mfu_decode)
        self._k_p = 4.0 * model.layers * model.heads * model.head_dim / (flops * gpu.mfu_prefill)
        self._k_d = model.kv_bytes_per_token / (bw * gpu.kv_efficiency)

    def __repr__(self) -> str:
        return f"RooflinePerfModel({self.gpu.name}, {self.model.name})"

    def step_time(
        self, prefill_tokens: int, prefill_attn: float, num_prefill: int, num_decode: int, decode_ctx: int
    ) -> float:
        n = num_prefill + num_decode
        dense = self._dense_p * prefill_tokens + self._dense_d * num_decode + self._head * n
        w = self._weights
        return (self.c0_s + self.c_seq_s * n + (w if w > dense else dense)
                + self._k_p * prefill_attn + self._k_d * decode_ctx)

    def decode_run(self, n: int, ctx0: int, k_max: int, budget_s: float) -> tuple[int, float]:
        """Closed form of :func:`decode_run` for this model: step ``i`` lasts ``a + b * i``."""
        a = self.step_time(0, 0.0, 0, n, ctx0)
        b = self._k_d * n
        # total(k) = k*a + b*k*(k-1)/2 <= budget_s, k >= 1
        if math.isinf(budget_s):
            k = k_max
        elif b > 0.0:
            disc = (a - b / 2.0) ** 2 + 2.0 * b * budget_s
            k = int(((b / 2.0 - a) + math.sqrt(max(disc, 0.0))) / b) if disc > 0 else 0
        else:
            k = int(budget_s / a) if a > 0 else k_max
        k = max(1, min(k_max, k))
        while k > 1 and k * a + b * k * (k - 1) / 2.0 > budget_s:
            k -= 1
        while k < k_max and (k + 1) * a + b * (k + 1) * k / 2.0 <= budget_s:
            k += 1
        return k, k * a + b * k * (k - 1) / 2.0

    def prefill_s_per_token(self, prompt_tokens: int = 1024) -> float:
        """Mean prefill time per token of a ``prompt_tokens`` prompt run alone (GORGO's ``t_p``)."""
        return self.step_time(prompt_tokens, prompt_tokens * prompt_tokens / 2.0, 1, 0, 0) / prompt_tokens

    def num_kv_blocks(self, block_size: int = 16, gpu_memory_utilization: float = 0.9) -> int:
        """KV blocks vLLM would allocate: ``(util * memory - weights - activations) / block bytes``."""
        free = self.gpu.memory_bytes * gpu_memory_utilization - self.model.weight_bytes - self.model.activation_bytes
        blocks = int(free // (self.model.kv_bytes_per_token * block_size))
        if blocks < 1:
            raise UnknownProfileError(
                f"{self.model.name} does not fit on {self.gpu.name} at utilization {gpu_memory_utilization}"
            )
        return blocks


def builtin_perf_model(gpu: str, model: str) -> RooflinePerfModel:
    """The roofline model for a built-in (GPU, model) pair."""
    return RooflinePerfModel(gpu_spec(gpu), model_spec(model))


def decode_run(perf: PerfModel, n: int, ctx0: int, k_max: int, budget_s: float) -> tuple[int, float]:
    """How many consecutive decode-only steps of ``n`` requests fit, and how long they take.

    Step ``i`` (from 0) has ``n`` decoding requests with ``ctx0 + i * n`` tokens of context in
    total. Returns ``(k, seconds)`` with ``1 <= k <= k_max``: the first step always runs, and each
    further one only if the total stays within ``budget_s``. Models with a closed form provide a
    ``decode_run`` method of the same signature, which is used instead of stepping the loop.
    """
    fast = getattr(perf, "decode_run", None)
    if fast is not None:
        k_fast, total_fast = fast(n, ctx0, k_max, budget_s)
        return int(k_fast), float(total_fast)
    step_time = perf.step_time
    total = 0.0
    k = 0
    while k < k_max:
        dt = step_time(0, 0.0, 0, n, ctx0 + k * n)
        if k and total + dt > budget_s:
            break
        total += dt
        k += 1
    return k, total
