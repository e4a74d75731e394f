"""Lodestar: an online-learned routing policy, made network-aware.

After Lim, Zhao, Godfrey, Shan, Xu and Xie, "Lodestar: An Online-Learning LLM Inference Router",
arXiv:2606.00946 (2026); MODELS.md §3. One feature vector per (request, candidate replica); a shared
MLP (3 hidden layers of 128, ReLU) predicts the request's TTFT on every candidate in one batched
numpy forward pass; the lowest prediction (reward ``-TTFT``, argmax) wins. The same weights score
every replica (no replica id is a feature), so one model serves any cluster size. isthmus adds what
Lodestar lacks: the RTT from the request's origin (and from the deciding router) and a same-region
flag, so the learned policy prices the network across regions.

Online learning. The policy records, at decision time, the feature row of the replica it chose,
keyed by request id; :meth:`LodestarPolicy.observe` joins it with the outcome's TTFT into one
training sample. The first model is fitted after ``warmup`` samples, then a new one every
``refit_every`` samples, on the ``window`` most recent samples plus a replay buffer of ``replay``
older ones kept for diversity (:class:`SampleStore`). Fitting uses scikit-learn's ``MLPRegressor``
(the ``learn`` extra, imported only when a fit runs); a fitted model is an immutable
:class:`MlpModel` swapped in by one reference assignment, so a decision uses one whole model.

Who fits. ``training="inline"`` (the simulator's default) fits synchronously inside ``observe`` when
the sample count calls for it. In the simulator that happens at the virtual time the triggering
outcome is known and costs no virtual time: the simulated requests are not charged for training,
and everything is a function of the seed. ``training="external"``: ``observe`` only records; the
shell (the live router) polls :meth:`LodestarPolicy.refit_due`, takes
:meth:`LodestarPolicy.training_data` (a copy) on its event loop, fits it elsewhere with an
:class:`MlpTrainer` (a worker thread or process) and hands the result to
:meth:`LodestarPolicy.install`. Decisions continue on the old model meanwhile.

Guards (the paper's): when the mean KV use of the healthy replicas exceeds ``kv_pressure`` (0.8),
the candidates are first narrowed to ``narrow_to`` (2) by consistent hashing of the prompt's prefix
(:class:`~isthmus.policies.affinity.HashRing`), so requests sharing a prefix meet on the same
replicas instead of spreading their KV footprint; the policy falls back to the Preble heuristic
(:class:`~isthmus.policies.preble.PreblePolicy`) before the first model, when a candidate's
features fall outside the range the model was trained on (widened by ``ood_margin``), and when
scoring fails or gives a non-finite value.

Purity: no clock, no I/O, no global random generator. Time is ``snapshot.now`` and the outcomes'
own times; randomness (ε-greedy exploration, the seeds of the fits) comes from the generator the
registry passes in. Model and sample store convert to and from a ``dict`` of numpy arrays and to
and from bytes (``numpy.savez`` in memory), for the router to persist.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from isthmus.core.policy import HOLD, CostBreakdown, Decision, Outcome
from isthmus.core.request import Request
from isthmus.core.snapshot import ClusterSnapshot, InstanceView
from isthmus.policies._support import available_views, check_non_negative, check_positive, parse_params
from isthmus.policies.affinity import HashRing, stable_hash64
from isthmus.policies.preble import PrebleParams, PreblePolicy

FEATURES: tuple[str, ...] = (
    "prompt_tokens_log2",
    "hit_ratio",
    "running",
    "waiting",
    "queued_prefill_tokens_log2",
    "running_tokens_log2",
    "kv_usage",
    "prefill_ms_per_token",
    "uncached_prefill_s",
    "queued_prefill_s",
    "rtt_origin_s",
    "rtt_router_s",
    "same_region",
    "view_age_s",
)
"""Names of the feature columns, in order (see :func:`feature_matrix`)."""

N_FEATURES = len(FEATURES)
_MIN_TTFT_S = 1e-4  # floor under a TTFT before its log is taken
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------ params
@dataclass(frozen=True, slots=True)
class LodestarParams:
    """Parameters of ``lodestar``; defaults are the paper's where it gives one (MODELS.md §3).

    Attributes:
        warmup: samples (completed requests) before the first fit (paper: 5,000).
        refit_every: new samples between two fits (paper: ~1,000).
        window: most recent samples each fit uses (paper: 5,000).
        replay: older samples kept for diversity and added to each fit (paper: 5,000).
        hidden_layers, hidden_units: the MLP's shape (paper: 3 x 128, ReLU).
        epochs: passes over the data of the first fit (``MLPRegressor.max_iter``).
        refit_epochs: passes of each later fit, which starts from the previous weights.
        batch_size: minibatch size of the Adam optimizer.
        learning_rate: Adam's initial step size.
        l2: L2 penalty (``MLPRegressor.alpha``).
        log_target: fit ``log(TTFT)`` instead of TTFT in seconds (ranking is the same for an exact
            model; the log keeps the long tail from dominating the squared loss).
        epsilon: ε-greedy exploration: with this probability a model-made decision goes to a
            uniformly random candidate instead (paper: off by default, 0.1 available).
        kv_pressure: the KV-pressure guard fires when the mean KV use (0..1) of the healthy
            replicas exceeds this (paper: 0.8).
        narrow_to: candidates left by the KV-pressure guard (paper: 2).
        prefix_blocks: the prefix hashed by that guard: the first this-many full blocks (their
            chained hash identifies them all); a prompt with no full block hashes its request id.
        ring_nodes: virtual nodes per replica on the guard's hash ring.
        ood_margin: a candidate is out of range when a feature leaves the training range
            ``[lo, hi]`` widened by this share of ``hi - lo`` on each side; then the heuristic decides.
        training: ``"inline"`` (fit inside ``observe``; the simulator) or ``"external"`` (the shell
            fits: :meth:`LodestarPolicy.refit_due`, :meth:`~LodestarPolicy.training_data`,
            :meth:`~LodestarPolicy.install`).
        swap_delay_s: inline training: the model fitted when an outcome becomes known at time ``t``
            is used from ``t + swap_delay_s`` on (models the time a background fit takes; 0 = the
            next decision), seconds.
        fit_threads: BLAS threads a fit may use (1: fits on a shared machine are much faster
            single-threaded than with oversubscribed BLAS threads).
        max_pending: decisions whose outcome is awaited, at most; the oldest are forgotten beyond.
        fallback: parameters of the Preble heuristic used by the guards.
    """

    warmup: int = 5000
    refit_every: int = 1000
    window: int = 5000
    replay: int = 5000
    hidden_layers: int = 3
    hidden_units: int = 128
    epochs: int = 30
    refit_epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    l2: float = 1e-4
    log_target: bool = True
    epsilon: float = 0.0
    kv_pressure: float = 0.8
    narrow_to: int = 2
    prefix_blocks: int = 4
    ring_nodes: int = 64
    ood_margin: float = 0.5
    training: str = "inline"
    swap_delay_s: float = 0.0
    fit_threads: int = 1
    max_pending: int = 100_000
    fallback: PrebleParams = field(default_factory=PrebleParams)

    def __post_init__(self) -> None:
        for name in ("warmup", "refit_every", "window", "hidden_layers", "hidden_units", "epochs", "refit_epochs",
                     "batch_size", "narrow_to", "prefix_blocks", "ring_nodes", "fit_threads", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"lodestar: {name} must be >= 1, got {getattr(self, name)}")
        if self.replay < 0:
            raise ValueError(f"lodestar: replay must be >= 0, got {self.replay}")
        check_positive("lodestar", learning_rate=self.learning_rate)
        check_non_negative("lodestar", l2=self.l2, ood_margin=self.ood_margin, swap_delay_s=self.swap_delay_s)
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"lodestar: epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.kv_pressure <= 1.0:
            raise ValueError(f"lodestar: kv_pressure must be in [0, 1], got {self.kv_pressure}")
        if self.training not in ("inline", "external"):
            raise ValueError(f"lodestar: training must be 'inline' or 'external', got {self.training!r}")


# ---------------------------------------------------------------------------------------- features
def feature_matrix(request: Request, snapshot: ClusterSnapshot, views: Sequence[InstanceView],
                   matched: Mapping[str, int], default_t_p_s: float) -> np.ndarray:
    """One row per view of ``views``, columns :data:`FEATURES`, float64.

    With ``L_p`` the prompt tokens, ``m`` the view's cached leading blocks (from ``matched``), ``B``
    the block size and ``t_p`` the view's prefill seconds per token (its profile, else
    ``default_t_p_s``):

    - ``prompt_tokens_log2 = log2(1 + L_p)``;
    - ``hit_ratio = min(m * B, L_p) / L_p`` (share of the prompt cached there, 0..1);
    - ``running``, ``waiting``: requests (the view's counts);
    - ``queued_prefill_tokens_log2``, ``running_tokens_log2``: ``log2(1 + tokens)`` of the prompt
      tokens waiting for prefill and of those running (decoding) there;
    - ``kv_usage``: 0..1;
    - ``prefill_ms_per_token = 1000 * t_p`` (the GPU type, as a speed figure of its profile);
    - ``uncached_prefill_s = t_p * max(L_p - m * B, 0)`` and ``queued_prefill_s = t_p *
      queued_prefill_tokens``, seconds (the speed figure applied to the two token counts);
    - ``rtt_origin_s = rtt(origin, region)`` and ``rtt_router_s = rtt(here, region)``, seconds;
    - ``same_region``: 1 when the replica is in the request's origin region, else 0;
    - ``view_age_s``: how stale the view is, seconds.
    """
    lp = request.prompt_tokens
    bs = snapshot.block_size
    origin = request.origin
    here = snapshot.here
    rtt_s = snapshot.rtt_s
    rtt_o: dict[str, float] = {}
    rtt_h: dict[str, float] = {}
    lp_log = math.log2(1.0 + lp)
    log2 = math.log2
    rows: list[tuple[float, ...]] = []
    for v in views:
        region = v.region
        ro = rtt_o.get(region)
        if ro is None:
            ro = rtt_o[region] = rtt_s(origin, region)
            rtt_h[region] = rtt_s(here, region)
        t_p = v.prefill_s_per_token
        if t_p != t_p:  # nan: profile unknown
            t_p = default_t_p_s
        hit = matched.get(v.id, 0) * bs
        if hit > lp:
            hit = lp
        q = v.queued_prefill_tokens
        rows.append((lp_log, hit / lp, v.running, v.waiting, log2(1.0 + q), log2(1.0 + v.running_tokens),
                     v.kv_usage, 1e3 * t_p, t_p * (lp - hit), t_p * q, ro, rtt_h[region],
                     1.0 if region == origin else 0.0, v.age))
    return np.array(rows, dtype=np.float64).reshape(len(rows), N_FEATURES)


# ------------------------------------------------------------------------------------------- model
def _frozen(a: Any, name: str, ndim: int) -> np.ndarray:
    out = np.array(a, dtype=np.float64, copy=True)
    if out.ndim != ndim:
        raise ValueError(f"MlpModel: {name} must have {ndim} dimension(s), got shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"MlpModel: {name} holds non-finite values")
    out.setflags(write=False)
    return out


class MlpModel:
    """A fitted TTFT predictor: standardization, ReLU MLP, de-standardization. Immutable.

    ``predict(x)`` for rows ``x`` of :data:`FEATURES`: ``h_0 = (x - x_mean) / x_scale``,
    ``h_k = relu(h_{k-1} @ W_k + b_k)`` for the hidden layers, ``z = h @ W_out + b_out`` (one
    output), ``y = z * y_scale + y_mean``; ``y`` is ``log(TTFT / 1 s)`` when ``log_target``, else
    TTFT in seconds. :meth:`ttft_s` undoes the log. ``x_lo``/``x_hi`` are the per-feature range of
    the data it was fitted on (for the out-of-range guard). ``version`` numbers the fits of one
    trainer; ``trained_on`` is the sample count of the policy when its data was taken.

    Every array is copied, checked (shapes chain, values finite) and made read-only at
    construction: a model is complete before anyone can hold it, and nobody can change it after.

    Raises:
        ValueError: inconsistent shapes or non-finite values.
    """

    __slots__ = ("_fast", "biases", "log_target", "trained_on", "version", "weights", "x_hi", "x_lo", "x_mean",
                 "x_scale", "y_mean", "y_scale")

    def __init__(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], *, x_mean: np.ndarray,
                 x_scale: np.ndarray, y_mean: float, y_scale: float, x_lo: np.ndarray, x_hi: np.ndarray,
                 log_target: bool, version: int = 0, trained_on: int = 0) -> None:
        if len(weights) != len(biases) or not weights:
            raise ValueError("MlpModel: need one bias per weight matrix, at least one layer")
        self.weights = tuple(_frozen(w, f"weights[{k}]", 2) for k, w in enumerate(weights))
        self.biases = tuple(_frozen(b, f"biases[{k}]", 1) for k, b in enumerate(biases))
        width = self.weights[0].shape[0]
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.shape[0] != width or b.shape[0] != w.shape[1]:
                raise ValueError(f"MlpModel: layer {k} has shape {w.shape} / {b.shape} after width {width}")
            width = w.shape[1]
        if width != 1:
            raise ValueError(f"MlpModel: the last layer must have one output, got {width}")
        self.x_mean = _frozen(x_mean, "x_mean", 1)
        self.x_scale = _frozen(x_scale, "x_scale", 1)
        self.x_lo = _frozen(x_lo, "x_lo", 1)
        self.x_hi = _frozen(x_hi, "x_hi", 1)
        d = self.weights[0].shape[0]
        for name in ("x_mean", "x_scale", "x_lo", "x_hi"):
            if getattr(self, name).shape != (d,):
                raise ValueError(f"MlpModel: {name} must have {d} entries")
        if np.any(self.x_scale <= 0):
            raise ValueError("MlpModel: x_scale must be > 0")
        if not (math.isfinite(y_mean) and math.isfinite(y_scale) and y_scale > 0):
            raise ValueError("MlpModel: y_mean must be finite and y_scale finite and > 0")
        self.y_mean = float(y_mean)
        self.y_scale = float(y_scale)
        self.log_target = bool(log_target)
        self.version = int(version)
        self.trained_on = int(trained_on)
        # The forward pass runs in float32 with the input standardization folded into the first
        # layer: half the memory traffic and twice the SIMD width of float64, which is what a
        # 3 x 128 network over a few dozen candidates is bound by (relative error ~1e-6, far below
        # any difference that decides an argmin in practice).
        w0 = self.weights[0] / self.x_scale[:, None]
        b0 = self.biases[0] - (self.x_mean / self.x_scale) @ self.weights[0]
        self._fast = tuple((np.ascontiguousarray(w, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32))
                           for w, b in zip((w0, *self.weights[1:]), (b0, *self.biases[1:]), strict=True))

    @property
    def n_features(self) -> int:
        return int(self.weights[0].shape[0])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's output for each row of ``x`` (``log`` seconds or seconds, see the class)."""
        h = np.asarray(x, dtype=np.float32)
        last = len(self._fast) - 1
        for k, (w, b) in enumerate(self._fast):
            h = h @ w
            h += b
            if k < last:
                np.maximum(h, 0.0, out=h)
        out: np.ndarray = h[:, 0].astype(np.float64) * self.y_scale + self.y_mean
        return out

    def ttft_s(self, x: np.ndarray) -> np.ndarray:
        """Predicted TTFT of each row of ``x``, seconds."""
        y = self.predict(x)
        out: np.ndarray = np.exp(y) if self.log_target else y
        return out

    def in_range(self, x: np.ndarray, margin: float) -> bool:
        """Every value of ``x`` within ``[lo - margin * (hi - lo), hi + margin * (hi - lo)]`` of its column."""
        span = (self.x_hi - self.x_lo) * margin
        return bool(np.all(x >= self.x_lo - span) and np.all(x <= self.x_hi + span))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model as named numpy arrays (for :meth:`from_arrays`, ``numpy.savez``)."""
        out: dict[str, np.ndarray] = {
            "n_layers": np.array(len(self.weights)),
            "x_mean": self.x_mean, "x_scale": self.x_scale, "x_lo": self.x_lo, "x_hi": self.x_hi,
            "y": np.array([self.y_mean, self.y_scale]),
            "meta": np.array([int(self.log_target), self.version, self.trained_on], dtype=np.int64),
        }
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"w{k}"] = w
            out[f"b{k}"] = b
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> MlpModel:
        """The model :meth:`to_arrays` described (raises ``ValueError``/``KeyError`` if malformed)."""
        n = int(arrays["n_layers"])
        y = np.asarray(arrays["y"], dtype=np.float64)
        meta = np.asarray(arrays["meta"], dtype=np.int64)
        return cls([arrays[f"w{k}"] for k in range(n)], [arrays[f"b{k}"] for k in range(n)],
                   x_mean=arrays["x_mean"], x_scale=arrays["x_scale"], y_mean=float(y[0]), y_scale=float(y[1]),
                   x_lo=arrays["x_lo"], x_hi=arrays["x_hi"], log_target=bool(meta[0]), version=int(meta[1]),
                   trained_on=int(meta[2]))

    def to_bytes(self) -> bytes:
        """The model as an in-memory ``.npz`` archive."""
        return _to_npz(self.to_arrays())

    @classmethod
    def from_bytes(cls, data: bytes) -> MlpModel:
        return cls.from_arrays(_from_npz(data))


def _to_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **dict(arrays))  # type: ignore[arg-type]
    return buf.getvalue()


def _from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class TrainingSet:
    """What one fit learns from: feature rows ``x`` (n x :data:`N_FEATURES`), TTFTs ``y`` (seconds),
    the policy's sample count when it was taken, and the seed the fit must use. Arrays are copies."""

    x: np.ndarray
    y: np.ndarray
    samples_seen: int
    seed: int


def _cell(x: np.ndarray, ttft_s: float) -> tuple[int, ...]:
    """The diversity cell of a sample: coarse bins of what makes TTFTs differ (see :class:`SampleStore`)."""
    return (
        int(x[1] * 4.0),  # hit ratio in quarters
        min(int(math.log2(1.0 + x[3])), 7),  # waiting requests, log2 bins
        min(int(x[4] / 2.0), 10),  # queued prefill tokens, factor-4 bins
        min(int(x[0] / 2.0), 10),  # prompt length, factor-4 bins
        round(math.log2(max(x[7], 1e-6)) * 2.0),  # GPU speed, half-octaves
        int(x[12]),  # same region
        max(-12, min(12, math.floor(math.log2(max(ttft_s, _MIN_TTFT_S))))),  # TTFT octave
    )


class SampleStore:
    """Training samples: the ``window`` most recent, and a replay buffer of older ones kept diverse.

    A sample is one feature row and the TTFT it led to. New samples enter the window (a ring);
    the one a full window pushes out is offered to the replay buffer. Diversity: each sample falls
    in a cell of coarse bins (hit ratio, waiting requests, queued tokens, prompt length, GPU speed,
    same region, TTFT octave); while the buffer is full, a new sample replaces the oldest sample of
    the most populated cell (the first such cell in order of creation on ties). Rare situations --
    a saturated replica, a slow GPU, a cache hit on a remote region -- thus keep their samples long
    after they stop occurring, while common ones are thinned. Everything is deterministic.
    """

    def __init__(self, window: int, replay: int) -> None:
        self.window = window
        self.replay = replay
        self._wx = np.zeros((window, N_FEATURES))
        self._wy = np.zeros(window)
        self._wn = 0  # samples in the window
        self._head = 0  # next slot to write
        self._rx = np.zeros((replay, N_FEATURES))
        self._ry = np.zeros(replay)
        self._free = list(range(replay - 1, -1, -1))
        self._cells: dict[tuple[int, ...], deque[int]] = {}
        self.seen = 0  # samples ever added

    def __len__(self) -> int:
        return self._wn + (self.replay - len(self._free))

    def add(self, x: np.ndarray, ttft_s: float) -> None:
        """Add one sample (``x``: one feature row; ``ttft_s``: seconds)."""
        h = self._head
        if self._wn == self.window:
            self._offer(self._wx[h].copy(), float(self._wy[h]))
        else:
            self._wn += 1
        self._wx[h] = x
        self._wy[h] = ttft_s
        self._head = (h + 1) % self.window
        self.seen += 1

    def _offer(self, x: np.ndarray, y: float) -> None:
        if self.replay == 0:
            return
        key = _cell(x, y)
        if self._free:
            slot = self._free.pop()
        else:
            biggest = max(self._cells.values(), key=len)
            slot = biggest.popleft()
            if not biggest:  # cannot happen for the largest of a full buffer unless replay == 1
                self._cells = {k: d for k, d in self._cells.items() if d}
        self._rx[slot] = x
        self._ry[slot] = y
        self._cells.setdefault(key, deque()).append(slot)

    def _replay_slots(self) -> list[int]:
        return [s for d in self._cells.values() for s in d]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All samples, copied: the window oldest first, then the replay buffer cell by cell."""
        if self._wn < self.window:
            order = np.arange(self._wn)
        else:
            order = (np.arange(self.window) + self._head) % self.window
        slots = np.array(self._replay_slots(), dtype=np.int64)
        return (np.concatenate([self._wx[order], self._rx[slots]]),
                np.concatenate([self._wy[order], self._ry[slots]]))

    def replay_size(self) -> int:
        return self.replay - len(self._free)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The store as numpy arrays; :meth:`from_arrays` rebuilds an identical store."""
        if self._wn < self.window:
            order = np.arange(self._wn)
        else:
            order = (np.arange(self.window) + self._head) % self.window
        slots = np.array(self._replay_slots(), dtype=np.int64)
        return {"window_x": self._wx[order], "window_y": self._wy[order], "replay_x": self._rx[slots],
                "replay_y": self._ry[slots], "sizes": np.array([self.window, self.replay, self.seen], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> SampleStore:
        window, replay, seen = (int(v) for v in arrays["sizes"])
        store = cls(window, replay)
        for x, y in zip(arrays["replay_x"], arrays["replay_y"], strict=True):
            store._offer(np.array(x, dtype=np.float64), float(y))
        for x, y in zip(arrays["window_x"], arrays["window_y"], strict=True):
            store.add(np.array(x, dtype=np.float64), float(y))
        store.seen = seen
        return store


# ------------------------------------------------------------------------------------------ trainer
class MlpTrainer:
    """Fits :class:`MlpModel` s with scikit-learn's ``MLPRegressor`` (Adam, ReLU, squared loss).

    The first fit picks the standardization of features and target from its data and trains
    ``epochs`` passes from a random start; later fits keep that standardization and the previous
    weights (``warm_start``) and train ``refit_epochs`` passes, so a refit costs a fraction of the
    first. Each fit's shuffling and start come from ``data.seed``: the same sequence of training sets
    gives the same sequence of models. Not thread-safe: one trainer per training thread. A fit runs
    with at most ``fit_threads`` BLAS threads and with scikit-learn's convergence warnings silenced
    (a fixed number of epochs is the intent); both are process-wide settings, restored afterwards.
    """

    def __init__(self, params: LodestarParams) -> None:
        self.params = params
        self._est: Any = None
        self._x_mean = np.zeros(N_FEATURES)
        self._x_scale = np.ones(N_FEATURES)
        self._y_mean = 0.0
        self._y_scale = 1.0
        self.fits = 0

    def _target(self, y: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(y, _MIN_TTFT_S)) if self.params.log_target else y.astype(np.float64)

    def fit(self, data: TrainingSet) -> MlpModel:
        """A model fitted on ``data`` (see the class docstring). Raises ``ValueError`` on empty data."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor
        from threadpoolctl import threadpool_limits

        p = self.params
        x, y = data.x, data.y
        if len(x) == 0 or x.shape[1] != N_FEATURES:
            raise ValueError(f"lodestar: cannot fit on data of shape {x.shape}")
        t = self._target(y)
        if self._est is None:
            self._x_mean = x.mean(axis=0)
            sd = x.std(axis=0)
            self._x_scale = np.where(sd > 1e-12, sd, 1.0)
            self._y_mean = float(t.mean())
            sd_y = float(t.std())
            self._y_scale = sd_y if sd_y > 1e-12 else 1.0
            self._est = MLPRegressor(
                hidden_layer_sizes=(p.hidden_units,) * p.hidden_layers, activation="relu", solver="adam",
                alpha=p.l2, batch_size=p.batch_size, learning_rate_init=p.learning_rate, max_iter=p.epochs,
                shuffle=True, random_state=data.seed, tol=0.0, n_iter_no_change=p.epochs + 1, warm_start=True)
        else:
            self._est.set_params(max_iter=p.refit_epochs, n_iter_no_change=p.refit_epochs + 1,
                                 random_state=data.seed)
        xs = (x - self._x_mean) / self._x_scale
        ts = (t - self._y_mean) / self._y_scale
        with warnings.catch_warnings(), threadpool_limits(limits=p.fit_threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._est.fit(xs, ts)
        self.fits += 1
        return MlpModel(self._est.coefs_, self._est.intercepts_, x_mean=self._x_mean, x_scale=self._x_scale,
                        y_mean=self._y_mean, y_scale=self._y_scale, x_lo=x.min(axis=0), x_hi=x.max(axis=0),
                        log_target=p.log_target, version=self.fits, trained_on=data.samples_seen)


# ------------------------------------------------------------------------------------------- policy
class _FixedPrefix:
    """A prefix view that answers every lookup with one precomputed match (shared with the fallback)."""

    __slots__ = ("_matched",)

    def __init__(self, matched: Mapping[str, int]) -> None:
        self._matched = matched

    def match(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        return self._matched


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a well-spread 64-bit function of ``x`` (deterministic everywhere)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class LodestarPolicy:
    """Score every candidate with the learned TTFT model; guards fall back to Preble.

    ``choose``:

    1. candidates: the available replicas (healthy, not full); none: ``HOLD``;
    2. KV-pressure guard: if the mean ``kv_usage`` of the healthy replicas exceeds ``kv_pressure``
       and there are more than ``narrow_to`` candidates, keep the first ``narrow_to`` distinct
       replicas met clockwise on a consistent-hash ring of the candidates from the hash of the
       prompt's first ``prefix_blocks`` blocks (:meth:`narrow`);
    3. features (:func:`feature_matrix`) for each candidate, with one ``snapshot.prefix.match``;
    4. no model yet, a feature out of the model's range, a scoring error or a non-finite score: the
       Preble heuristic decides among the same candidates (its reason is prefixed by the guard's);
    5. otherwise the candidate with the lowest predicted TTFT (ties: snapshot order); with
       probability ``epsilon`` a uniformly random candidate instead.

    Whoever decides, the chosen replica's feature row is kept under the request id until
    :meth:`observe` joins it with the TTFT, and Preble's window costs are told of the routed
    request (:meth:`PreblePolicy.note_routed`), so the fallback knows the whole traffic. A staged
    model (inline training with ``swap_delay_s > 0``) is put in use by the first decision at or
    after its ready time. The estimate: network = RTT(origin -> replica region), prefill = its
    ``t_p * uncached tokens``, seconds; queue and total are left ``nan`` (a model-made decision
    names its predicted TTFT in ``reason``).

    ``stats`` counts decisions by how they were made (``model``, ``warmup``, ``out_of_range``,
    ``error``, ``explored``, ``narrowed``) and fits (``fits``); ``fit_log`` lists the inline fits as
    ``(time the triggering outcome was known, samples seen)``, seconds.
    """

    name = "lodestar"

    def __init__(self, params: LodestarParams, rng: np.random.Generator) -> None:
        self.params = params
        self._rng = rng
        self._fallback = PreblePolicy(params.fallback)
        self._model: MlpModel | None = None
        self._staged: tuple[float, MlpModel] | None = None
        self._store = SampleStore(params.window, params.replay)
        self._pending: dict[str, np.ndarray] = {}
        self._trainer: MlpTrainer | None = None
        self._taken_at = 0  # sample count when training data was last taken (0: never)
        self._rings: dict[tuple[str, ...], HashRing] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("decisions", "model", "warmup", "out_of_range", "error", "explored", "narrowed", "fits"), 0)
        self.fit_log: list[tuple[float, int]] = []  # inline fits: (time the triggering outcome was known, samples)

    # ------------------------------------------------------------------ model access
    @property
    def model(self) -> MlpModel | None:
        """The model the next decision uses (``None`` before the first fit)."""
        return self._model

    @property
    def samples_seen(self) -> int:
        """Training samples recorded so far (outcomes joined with their decision's features)."""
        return self._store.seen

    def install(self, model: MlpModel, ready_at: float | None = None) -> None:
        """Swap ``model`` in: for the next decision, or the first at or after ``ready_at`` (seconds).

        The swap is one reference assignment of a complete, read-only model, so a decision in
        progress keeps the model it started with and no decision sees a partial one. A model
        staged earlier and not yet in use is replaced.

        Raises:
            ValueError: ``model`` has a different number of features than :data:`FEATURES`.
        """
        if model.n_features != N_FEATURES:
            raise ValueError(f"lodestar: model takes {model.n_features} features, the policy makes {N_FEATURES}")
        if ready_at is None:
            self._staged = None
            self._model = model
        else:
            self._staged = (ready_at, model)

    def refit_due(self) -> bool:
        """Whether enough samples arrived for a fit: ``warmup`` before the first, then ``refit_every``
        more since the data of the last one was taken (:meth:`training_data`)."""
        seen = self._store.seen
        if self._taken_at == 0:
            return seen >= self.params.warmup
        return seen - self._taken_at >= self.params.refit_every

    def training_data(self) -> TrainingSet:
        """A copy of the samples a fit should use now, with the seed it must use; marks a fit begun
        (so :meth:`refit_due` counts from here). Cheap: copies at most ``window + replay`` rows."""
        x, y = self._store.arrays()
        self._taken_at = self._store.seen
        return TrainingSet(x, y, self._store.seen, int(self._rng.integers(0, 2**31 - 1)))

    def new_trainer(self) -> MlpTrainer:
        """A trainer with this policy's parameters, for a shell that fits outside ``observe``."""
        return MlpTrainer(self.params)

    # ------------------------------------------------------------------ deciding
    def narrow(self, request: Request, cands: Sequence[InstanceView]) -> list[InstanceView]:
        """The first ``narrow_to`` distinct candidates clockwise from the prompt's prefix hash on a
        consistent-hash ring of the candidates' ids (in ring order; all of them if fewer)."""
        k = self.params.narrow_to
        if len(cands) <= k:
            return list(cands)
        ids = tuple(v.id for v in cands)
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 64:
                self._rings.clear()
            ring = self._rings[ids] = HashRing(ids, self.params.ring_nodes)
        hashes = request.block_hashes
        if hashes:
            key = _mix64(hashes[min(len(hashes), self.params.prefix_blocks) - 1] & _MASK64)
        else:
            key = stable_hash64(request.id)
        by_id = {v.id: v for v in cands}
        out: list[InstanceView] = []
        for rid in ring.walk(key):
            v = by_id[rid]
            if v not in out:
                out.append(v)
                if len(out) == k:
                    break
        return out

    def choose(self, request: Request, snapshot: ClusterSnapshot) -> Decision:
        cands = available_views(snapshot)
        if not cands:
            return HOLD
        p = self.params
        stats = self.stats
        stats["decisions"] += 1
        staged = self._staged
        if staged is not None and snapshot.now >= staged[0]:
            self._model = staged[1]
            self._staged = None
        model = self._model  # read once: a swap during this decision does not affect it
        why = ""
        healthy = [v.kv_usage for v in snapshot.instances.values() if v.healthy]
        if len(cands) > p.narrow_to and healthy and sum(healthy) / len(healthy) > p.kv_pressure:
            cands = self.narrow(request, cands)
            stats["narrowed"] += 1
            why = f"KV pressure: narrowed to {len(cands)} by prefix hash; "
        matched = snapshot.prefix.match(request.block_hashes) if request.block_hashes else {}
        x = feature_matrix(request, snapshot, cands, matched, p.fallback.default_t_p_s)
        pick = -1
        guard = "warmup"
        pred = math.nan
        if model is not None:
            guard = "out_of_range"
            if model.in_range(x, p.ood_margin):
                guard = "error"
                try:
                    scores = model.predict(x)
                    if np.all(np.isfinite(scores)):
                        pick = int(np.argmin(scores))
                        pred = float(scores[pick])
                except (ValueError, FloatingPointError, ArithmeticError):
                    pick = -1
        if pick >= 0:
            assert model is not None
            ttft = math.exp(pred) if model.log_target else pred
            reason = f"{why}model v{model.version}: predicted TTFT {ttft * 1e3:.1f} ms"
            stats["model"] += 1
            if p.epsilon > 0.0 and self._rng.random() < p.epsilon:
                pick = int(self._rng.integers(len(cands)))
                reason = f"{why}explore (ε = {p.epsilon})"
                stats["explored"] += 1
            chosen = cands[pick]
            self._fallback.note_routed(snapshot.now, chosen.id,
                                       x[pick, 8] + p.fallback.t_d_s * request.max_output_tokens)
        else:
            stats[guard] += 1
            sub = replace(snapshot, instances={v.id: v for v in cands}, prefix=_FixedPrefix(matched))
            d = self._fallback.choose(request, sub)
            assert d.target is not None  # cands is not empty
            pick = next(i for i, v in enumerate(cands) if v.id == d.target)
            chosen = cands[pick]
            reason = f"{why}fallback ({guard}): {d.reason}"
        self._remember(request.id, x[pick])
        return Decision(chosen.id, estimate=CostBreakdown(network_s=x[pick, 10], prefill_s=x[pick, 8]),
                        reason=reason)

    def _remember(self, request_id: str, row: np.ndarray) -> None:
        pending = self._pending
        pending.pop(request_id, None)
        pending[request_id] = row.copy()
        if len(pending) > self.params.max_pending:
            del pending[next(iter(pending))]

    # ------------------------------------------------------------------ learning
    def observe(self, outcome: Outcome) -> None:
        """Join ``outcome`` with the features of its decision into a sample; fit when due (inline).

        Outcomes of requests this policy did not decide (or forgot, beyond ``max_pending``), failed
        ones and non-finite TTFTs are ignored. Inline training: when :meth:`refit_due`, fit now on
        :meth:`training_data` and install the model from ``t + swap_delay_s`` on, with ``t`` the
        time the outcome became known at the client (``arrival + e2e_s``), seconds.
        """
        row = self._pending.pop(outcome.request.id, None)
        if row is None or not outcome.ok or not math.isfinite(outcome.ttft_s) or outcome.ttft_s < 0:
            return
        self._store.add(row, outcome.ttft_s)
        if self.params.training == "inline" and self.refit_due():
            if self._trainer is None:
                self._trainer = self.new_trainer()
            model = self._trainer.fit(self.training_data())
            self.stats["fits"] += 1
            known_at = outcome.request.arrival + outcome.e2e_s
            self.fit_log.append((known_at, model.trained_on))
            delay = self.params.swap_delay_s
            self.install(model, None if delay == 0.0 else known_at + delay)

    # ------------------------------------------------------------------ persistence
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The learned state -- model (if any), samples, fit bookkeeping -- as named numpy arrays.

        Decisions awaiting an outcome and the trainer's optimizer state are not included: a policy
        restored with :meth:`load_state_arrays` ignores outcomes of earlier decisions and starts its
        next fit from a fresh optimizer (keeping the restored model until that fit is installed).
        """
        out = {f"store/{k}": v for k, v in self._store.to_arrays().items()}
        if self._model is not None:
            out.update({f"model/{k}": v for k, v in self._model.to_arrays().items()})
        out["taken_at"] = np.array(self._taken_at, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` gave (the window and replay sizes travel with it)."""
        store = SampleStore.from_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("store/")})
        model_part = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
        model = MlpModel.from_arrays(model_part) if model_part else None
        self._store = store
        self._model = model
        self._staged = None
        self._taken_at = int(arrays["taken_at"])
        self._pending.clear()

    def state_bytes(self) -> bytes:
        """:meth:`state_arrays` as an in-memory ``.npz`` archive."""
        return _to_npz(self.state_arrays())

    def load_state_bytes(self, data: bytes) -> None:
        self.load_state_arrays(_from_npz(data))


def make_lodestar(params: Mapping[str, Any], rng: np.random.Generator) -> LodestarPolicy:
    return LodestarPolicy(parse_params(LodestarParams, "lodestar", params), rng)
