"""Step times looked up in a per-layer GPU profile measured under vLLM.

The profile is the one LLMServingSim's profiler writes (``profiles/<GPU>/<model>/<dtype>/tp<N>/``):
a model built with a single decoder layer is run by vLLM on synthetic batches and the CUDA kernel
time of each module is recorded, in microseconds, for

* dense ops (``dense.csv``): each op of one decoder layer (``qkv_proj``, ``o_proj``, ...) and the ops
  that run once per step (``embedding``, ``final_layernorm``), by the number of tokens in the batch;
* attention (``attention.csv``): one layer's attention kernel for a batch of one prefilling request
  (``prefill_chunk`` new tokens after ``kv_prefill`` tokens already in its KV cache: the profiler
  sets the request's computed tokens to ``kv_prefill``) plus ``n_decode`` decoding requests with
  ``kv_decode`` cached tokens each;
* per-sequence ops (``per_sequence.csv``): ``lm_head`` and ``sampler``, by the number of sequences.

:class:`TabularPerfModel` turns these into a :class:`~isthmus.core.perf.PerfModel`::

    t_step = 1e-6 * ( dense(T) + L * attn(c, h, n, k) + seq(S) ) + step_overhead_s      [seconds]

    dense(T) = L * sum_op mult_op * op_us(T) + sum_once op_us(T)                    [µs]
    T = prefill_tokens + num_decode        tokens in the forward pass
    S = num_prefill + num_decode           vLLM v1 computes logits and samples for every scheduled
                                           request (a partial prefill's sample is discarded)
    c = prefill_tokens
    h = prefill_attn / prefill_tokens - c / 2
    n = num_decode
    k = decode_ctx / num_decode

``L`` is the model's number of decoder layers; ``mult_op`` how often an op runs per layer (RMSNorm
twice in a Llama layer: :data:`LLAMA_LAYER_OPS`, the order of LLMServingSim's ``llama.yaml``).
``prefill_attn = sum_i c_i * (h_i + c_i / 2)`` over prefilling requests, so for a single prefilling
request ``h`` is exactly its history, the profile's ``kv_prefill``. When several requests prefill
in one step, ``h`` is negative (their causal work is less than one request of ``c`` tokens would
do); the attention row of each chunk size is then extended below ``h = 0`` along its secant between
``h = 0`` and ``h = c`` (the profile's own per-key cost at that chunk size), and never below the
profile's smallest prefill at no history. With ``c = 1024 + 1024`` tokens from two fresh prompts this
gives 217 µs per layer on the RTX 4090 profile against 2 x 108 µs measured for two separate
1024-token prefills.

Interpolation: multilinear in the values (not in log space; between grid points kernel time is
close to affine in every axis) over the product grid of the axes the profile sampled. Below an
axis's first sample the value is clamped (a decode context shorter than the shortest profiled one
costs what the shortest did), except that a small prefill chunk in a batch with decodes is blended
towards the decode-only measurement at ``c = 0``. Beyond an axis's last sample the last segment is
extended linearly (decode attention is linear in ``n * k``, so ``k`` beyond 16,384 is linear in
``k``). Grid cells the profile did not sample (mixed batches with more decodes than the profiler
could fit, or a sparser sweep) are filled before lookup: along ``n`` beyond the largest mixed
sample by adding the decode-only table's increment, elsewhere linearly along each axis in turn.

Monotone: within one kernel regime a batch with more work never takes less time. Where the profile
dips (cuBLAS switching tile shapes between neighbouring token counts, or timing jitter of a few
percent), each table is replaced by its running maximum along every axis before lookup: the dense
and per-sequence curves, and separately the decode-only, prefill-only and mixed attention tables.
Across regimes the profile is taken as measured, because the kernel configuration itself changes
between a batch of single-token queries and one that carries a prefill: adding a 16-token chunk to
two short decodes measures faster (9.7 against 13.8 µs) and adding it to 64 decodes of 16k context
three times slower than the decodes alone. Elsewhere profile grid points are reproduced exactly.

Not modelled here: tensor-parallel collectives (the profile is per GPU) and anything that is not
GPU kernel time; ``step_overhead_s`` carries a per-step host overhead when one is known.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

#: Ops of one Llama decoder layer and how often each runs per layer (two RMSNorms: input and
#: post-attention), in the order of LLMServingSim's ``profiler/models/llama.yaml``.
LLAMA_LAYER_OPS: Mapping[str, int] = {
    "layernorm": 2, "qkv_proj": 1, "rotary_emb": 1, "o_proj": 1, "gate_up_proj": 1, "act_fn": 1, "down_proj": 1,
}
#: Dense ops that run once per step (before the first and after the last layer).
LLAMA_ONCE_OPS: tuple[str, ...] = ("embedding", "final_layernorm")
#: Per-sequence ops, once per step.
LLAMA_SEQUENCE_OPS: tuple[str, ...] = ("lm_head", "sampler")


def _as_curve(name: str, xs: ArrayLike, ys: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Validated, sorted ``(x, y)`` samples of a 1-D curve; duplicates of ``x`` keep the last sample."""
    x = np.asarray(xs, dtype=np.float64).ravel()
    y = np.asarray(ys, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"{name}: need equally long, non-empty x and y arrays, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{name}: non-finite values")
    if np.any(x < 0) or np.any(y < 0):
        raise ValueError(f"{name}: negative values")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    keep = np.ones(x.size, dtype=bool)
    keep[:-1] = x[1:] != x[:-1]
    return x[keep], y[keep]


def _bracket(axis: Sequence[float], x: float) -> tuple[int, int, float]:
    """``(i, j, t)`` such that the value at ``x`` is ``v[i] + t * (v[j] - v[i])``.

    Clamped below ``axis[0]``; beyond ``axis[-1]`` the last segment is extended (``t > 1``).
    """
    n = len(axis)
    if n == 1 or x <= axis[0]:
        return 0, 0, 0.0
    j = bisect.bisect_right(axis, x)
    if j >= n:
        j = n - 1
    i = j - 1
    return i, j, (x - axis[i]) / (axis[j] - axis[i])


def _interp(axis: Sequence[float], values: Sequence[float], x: float) -> float:
    i, j, t = _bracket(axis, x)
    vi = values[i]
    return vi if t == 0.0 else vi + t * (values[j] - vi)


def _fill_line(coords: FloatArray, line: FloatArray) -> None:
    """Fill NaNs of ``line`` in place: linear between samples, last segment extended beyond them."""
    known = ~np.isnan(line)
    if known.all() or not known.any():
        return
    xk, yk = coords[known], line[known]
    missing = ~known
    xm = coords[missing]
    filled = np.interp(xm, xk, yk)
    if xk.size >= 2:
        hi = xm > xk[-1]
        filled[hi] = yk[-1] + (xm[hi] - xk[-1]) * (yk[-1] - yk[-2]) / (xk[-1] - xk[-2])
        lo = xm < xk[0]
        filled[lo] = yk[0] + (xm[lo] - xk[0]) * (yk[1] - yk[0]) / (xk[1] - xk[0])
    line[missing] = np.maximum(filled, 0.0)


def _fill_axis(grid: FloatArray, axis: int, coords: FloatArray) -> None:
    """Fill NaNs of ``grid`` in place along ``axis`` (see :func:`_fill_line`)."""
    moved = np.moveaxis(grid, axis, -1)  # a view: filling it fills ``grid``
    for idx in np.ndindex(moved.shape[:-1]):
        _fill_line(coords, moved[idx])


def _envelope(grid: FloatArray) -> FloatArray:
    """Smallest array ``>= grid`` that is non-decreasing along every axis (running maxima)."""
    out = grid
    for axis in range(grid.ndim):
        out = np.maximum.accumulate(out, axis=axis)
    return out


def _attention_grid(rows: ArrayLike) -> tuple[list[float], list[float], list[float], list[float], FloatArray]:
    """The profile's attention rows on a full product grid, µs per layer.

    Returns axes ``c = [0, chunks...]``, ``h = [histories...]``, ``n = [0, decodes...]``,
    ``k = [decode contexts...]`` and the values, shape ``(len(c), len(h), len(n), len(k))``:
    ``[0, :, 0, :]`` is zero (no attention), ``[0, :, n, k]`` the decode-only table (any ``h``),
    ``[c, h, 0, :]`` the prefill-only table (any ``k``).
    """
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 5 or a.shape[0] == 0:
        raise ValueError("attention: need rows of (prefill_chunk, kv_prefill, n_decode, kv_decode, time_us)")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("attention: negative or non-finite values")
    c, h, n, k, t = a.T
    pre = (c > 0) & (n == 0)
    dec = (c == 0) & (n > 0)
    mix = (c > 0) & (n > 0)
    if not (pre.any() and dec.any() and mix.any()):
        raise ValueError("attention: need prefill-only, decode-only and mixed rows")
    c_ax = np.unique(c[pre | mix])
    h_ax = np.unique(h[pre | mix])
    n_ax = np.unique(n[dec | mix])
    k_ax = np.unique(k[dec | mix])
    if k_ax[0] <= 0:
        raise ValueError("attention: a decode row has kv_decode = 0")
    cc = np.concatenate(([0.0], c_ax))
    nn = np.concatenate(([0.0], n_ax))

    dgrid = np.full((n_ax.size, k_ax.size), np.nan)
    dgrid[np.searchsorted(n_ax, n[dec]), np.searchsorted(k_ax, k[dec])] = t[dec]
    _fill_axis(dgrid, 1, k_ax)
    _fill_axis(dgrid, 0, n_ax)
    pgrid = np.full((c_ax.size, h_ax.size), np.nan)
    pgrid[np.searchsorted(c_ax, c[pre]), np.searchsorted(h_ax, h[pre])] = t[pre]
    _fill_axis(pgrid, 1, h_ax)
    _fill_axis(pgrid, 0, c_ax)

    grid = np.full((cc.size, h_ax.size, nn.size, k_ax.size), np.nan)
    grid[0, :, 0, :] = 0.0
    grid[0, :, 1:, :] = dgrid[None, :, :]
    grid[1:, :, 0, :] = pgrid[:, :, None]
    grid[1 + np.searchsorted(c_ax, c[mix]), np.searchsorted(h_ax, h[mix]),
         1 + np.searchsorted(n_ax, n[mix]), np.searchsorted(k_ax, k[mix])] = t[mix]
    mixed = grid[1:, :, 1:, :]  # view
    _fill_axis(mixed, 3, k_ax)
    _fill_axis(mixed, 1, h_ax)
    # Along n: beyond the largest mixed sample, add the decode-only increment; below, interpolate
    # from the prefill-only value at n = 0.
    for ci in range(1, cc.size):
        for hi in range(h_ax.size):
            for ki in range(k_ax.size):
                line = grid[ci, hi, :, ki]
                known = np.flatnonzero(~np.isnan(line[1:])) + 1
                if known.size == 0:
                    continue
                top = int(known[-1])
                for ni in range(top + 1, nn.size):
                    line[ni] = line[top] + dgrid[ni - 1, ki] - dgrid[top - 1, ki]
                _fill_line(nn, line)
    _fill_axis(mixed, 0, c_ax)
    if np.isnan(grid).any():
        raise ValueError("attention: the profile is too sparse to fill a grid (a chunk size or decode "
                         "count has no mixed rows at all)")
    # Monotone within each kernel regime; the decode-only and prefill-only layers are broadcast
    # along the axis they do not depend on, so their running maxima there change nothing.
    grid[0, :, 1:, :] = _envelope(grid[0, :, 1:, :])
    grid[1:, :, 0, :] = _envelope(grid[1:, :, 0, :])
    grid[1:, :, 1:, :] = _envelope(grid[1:, :, 1:, :])
    return cc.tolist(), h_ax.tolist(), nn.tolist(), k_ax.tolist(), grid


class TabularPerfModel:
    """A :class:`~isthmus.core.perf.PerfModel` that interpolates a measured per-layer profile.

    The maths, units and the treatment of the profile's edges are in the module docstring. Pure:
    built from arrays, no I/O; immutable after construction.

    Args:
        dense_tokens: token counts at which the dense time was measured.
        dense_us: whole-model dense kernel time per step at those counts, µs (every layer's dense
            ops plus the once-per-step ones; see :meth:`from_profile`).
        sequences: sequence counts at which the per-sequence time was measured.
        sequence_us: per-sequence kernel time per step (``lm_head`` + ``sampler``), µs.
        attention_rows: ``(N, 5)`` rows ``(prefill_chunk, kv_prefill, n_decode, kv_decode, time_us)``
            of one layer's attention kernel.
        num_layers: decoder layers ``L``; attention is multiplied by it.
        step_overhead_s: constant added to every step, seconds.

    Raises:
        ValueError: malformed or too sparse tables, a non-positive layer count or a negative overhead.
    """

    __slots__ = ("_a", "_c", "_dense", "_dense_x", "_h", "_k", "_n", "_seq", "_seq_x", "_strides",
                 "num_layers", "step_overhead_s")

    def __init__(
        self,
        dense_tokens: ArrayLike,
        dense_us: ArrayLike,
        sequences: ArrayLike,
        sequence_us: ArrayLike,
        attention_rows: ArrayLike,
        num_layers: int,
        step_overhead_s: float = 0.0,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not (step_overhead_s >= 0.0 and math.isfinite(step_overhead_s)):
            raise ValueError(f"step_overhead_s must be finite and >= 0, got {step_overhead_s}")
        dx, dy = _as_curve("dense", dense_tokens, dense_us)
        sx, sy = _as_curve("per_sequence", sequences, sequence_us)
        self._dense_x: list[float] = dx.tolist()
        self._dense: list[float] = np.maximum.accumulate(dy).tolist()
        self._seq_x: list[float] = sx.tolist()
        self._seq: list[float] = np.maximum.accumulate(sy).tolist()
        c, h, n, k, grid = _attention_grid(attention_rows)
        self._c, self._h, self._n, self._k = c, h, n, k
        self._a: list[float] = grid.ravel().tolist()
        self._strides = (len(h) * len(n) * len(k), len(n) * len(k), len(k))
        self.num_layers = num_layers
        self.step_overhead_s = step_overhead_s

    @classmethod
    def from_profile(
        cls,
        dense_ops: Mapping[str, tuple[ArrayLike, ArrayLike]],
        sequence_ops: Mapping[str, tuple[ArrayLike, ArrayLike]],
        attention_rows: ArrayLike,
        num_layers: int,
        layer_ops: Mapping[str, int] = LLAMA_LAYER_OPS,
        once_ops: Sequence[str] = LLAMA_ONCE_OPS,
        step_overhead_s: float = 0.0,
    ) -> TabularPerfModel:
        """Compose the whole-model tables from the profile's per-op curves.

        Args:
            dense_ops: op name -> (token counts, µs per call) from ``dense.csv``.
            sequence_ops: op name -> (sequence counts, µs) from ``per_sequence.csv``; all are summed.
            attention_rows: the rows of ``attention.csv``.
            num_layers: decoder layers of the served model (the profile ran one).
            layer_ops: op -> calls per decoder layer.
            once_ops: ops that run once per step.
            step_overhead_s: see the class.

        Each op's curve is linearly interpolated onto the union of all token counts (clamped at
        its ends) before summing: ``dense = L * sum mult * op + sum once``.

        Raises:
            ValueError: an op the composition needs is missing, or the profile has a dense op the
                composition does not place (its time would be silently dropped).
        """
        needed = set(layer_ops) | set(once_ops)
        missing = sorted(needed - set(dense_ops))
        if missing:
            raise ValueError(f"dense profile lacks ops {missing}")
        extra = sorted(set(dense_ops) - needed)
        if extra:
            raise ValueError(f"dense profile has ops {extra} that the layer composition does not place")
        if not sequence_ops:
            raise ValueError("per-sequence profile is empty")
        dense_curves = {name: _as_curve(f"dense op {name}", *xy) for name, xy in dense_ops.items()}
        tokens = np.unique(np.concatenate([x for x, _ in dense_curves.values()]))
        total = np.zeros_like(tokens)
        for name, (x, y) in dense_curves.items():
            mult = num_layers * layer_ops[name] if name in layer_ops else 1
            total += mult * np.interp(tokens, x, y)
        seq_curves = [_as_curve(f"per-sequence op {name}", *xy) for name, xy in sequence_ops.items()]
        seqs = np.unique(np.concatenate([x for x, _ in seq_curves]))
        seq_total = np.zeros_like(seqs)
        for x, y in seq_curves:
            seq_total += np.interp(seqs, x, y)
        return cls(tokens, total, seqs, seq_total, attention_rows, num_layers, step_overhead_s)

    # ------------------------------------------------------------------------------- lookups
    def dense_us(self, tokens: float) -> float:
        """Whole-model dense kernel time for ``tokens`` tokens in the batch, µs."""
        return _interp(self._dense_x, self._dense, tokens)

    def sequence_us(self, sequences: float) -> float:
        """``lm_head`` + ``sampler`` time for ``sequences`` sampled sequences, µs."""
        return _interp(self._seq_x, self._seq, sequences)

    def attention_us(self, prefill_chunk: float, prefill_history: float, num_decode: float,
                     decode_context: float) -> float:
        """One layer's attention kernel time, µs.

        Args:
            prefill_chunk: prompt tokens computed this step (``c``).
            prefill_history: tokens already cached before the chunk (``h``; negative for several
                prefilling requests, see the module docstring).
            num_decode: decoding requests (``n``).
            decode_context: their mean cached tokens (``k``).
        """
        if num_decode <= 0:
            if prefill_chunk <= 0:
                return 0.0
            prefill_chunk = max(prefill_chunk, self._c[1])
        c_ax, h_ax = self._c, self._h
        ci0, ci1, tc = _bracket(c_ax, prefill_chunk)
        ni0, ni1, tn = _bracket(self._n, num_decode)
        ki0, ki1, tk = _bracket(self._k, decode_context)
        sc, sh, sn = self._strides
        a = self._a
        neg = prefill_history < 0.0
        hi0, hi1, th = (0, 0, 0.0) if neg else _bracket(h_ax, prefill_history)
        total = 0.0
        for ci, wc in ((ci0, 1.0 - tc), (ci1, tc)):
            if wc == 0.0:
                continue
            crow = c_ax[ci]
            for ni, wn in ((ni0, 1.0 - tn), (ni1, tn)):
                if wn == 0.0:
                    continue
                for ki, wk in ((ki0, 1.0 - tk), (ki1, tk)):
                    if wk == 0.0:
                        continue
                    base = ci * sc + ni * sn + ki
                    if neg and crow > 0.0:
                        v0 = a[base]
                        j0, j1, tj = _bracket(h_ax, crow)
                        vc = a[base + j0 * sh] + tj * (a[base + j1 * sh] - a[base + j0 * sh])
                        floor = a[sc + ni * sn + ki]
                        v = max(v0 + (vc - v0) / crow * prefill_history, floor)
                    else:
                        v = a[base + hi0 * sh]
                        if th != 0.0:
                            v += th * (a[base + hi1 * sh] - v)
                    total += wc * wn * wk * v
        return total

    def step_time(
        self, prefill_tokens: int, prefill_attn: float, num_prefill: int, num_decode: int, decode_ctx: int
    ) -> float:
        """Seconds for one step of the given shape (see :class:`~isthmus.core.perf.PerfModel`)."""
        tokens = prefill_tokens + num_decode
        if tokens <= 0:
            return self.step_overhead_s
        history = prefill_attn / prefill_tokens - prefill_tokens / 2.0 if prefill_tokens > 0 else 0.0
        context = decode_ctx / num_decode if num_decode > 0 else 0.0
        attn = self.attention_us(prefill_tokens, history, num_decode, context)
        us = self.dense_us(tokens) + self.num_layers * attn + self.sequence_us(num_prefill + num_decode)
        return us * 1e-6 + self.step_overhead_s
