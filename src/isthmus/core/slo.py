"""SLO classes, the completion-time estimator and the deadline-ordered queue of an SLO-aware router.

Everything here is pure (no clock, no I/O, no global randomness): the simulator and the live router
call the same functions with their own time and state.

**Classes.** An SLO class is an :class:`~isthmus.core.request.SLO` (a name, TTFT / TPOT / end-to-end
targets in seconds and a priority). A :class:`SLOCatalog` holds a deployment's classes and how a
request picks one; :meth:`SLOCatalog.resolve` applies the precedence

    header value > body field value > API key > model > the catalog's default > none,

where an explicit class (header or body) must name a known class (:class:`UnknownSLOClassError`,
an HTTP 400 at the router) and the others map to classes by configuration.

**Completion time** (QLM: Patke et al., "Queue Management for SLO-Oriented Large Language Model
Serving", SoCC 2024; MODELS.md §3). For a request ``q`` on a candidate replica ``j``::

    C_q = W_q + P + D_q + L_j
    W_q = t_p(j) * prefill tokens queued ahead on j                        # prefill queued ahead
          + [saturated(j)] * (waiting ahead + 1) * mean_out * tpot(j) / running(j)   # QLM: requests
                                              # ahead x mean output tokens / token throughput
    P   = t_p(j) * uncached prompt tokens on j
    D_q = (expected output tokens - 1) * tpot(j)
    L_j = RTT(here, region(j)) + RTT(here, origin) / 2 + [region(j) != origin] * penalty

``t_p(j)`` is the prefill seconds per token of ``j``'s GPU type (``InstanceView.prefill_s_per_token``);
the prefill (and the requests) queued ahead is ``queued_prefill_tokens`` (``waiting``), less
``deferred_prefill_tokens`` (``deferred_waiting``) for a request of normal priority (it overtakes
requests queued at a lower priority);
``tpot(j)`` one decode step of ``j``'s running batch plus this request (``InstanceView.decode_step_s``)
times a correction the caller may learn from outcomes, ``saturated(j)`` means ``j`` cannot admit more
now (sequence cap or KV use at ``kv_full``), so whoever waits there waits for running requests to
finish. ``L_j`` is the network still ahead of a request at router ``here``: to the replica and back,
then back to the client. The client-observed predictions add the time already spent since the
request's ``arrival``: ``TTFT = elapsed + L_j + W_q + P`` and ``E2E = TTFT + D_q``.

Expected output tokens come from history, not from the request: :class:`OutputLengthHistory` keeps a
running mean and spread per class.

**Money** (the notes' efficiency objective, MODELS.md §3): ``E_q = C_q + alpha * usd_q`` with::

    usd_q = gpu_s * price(gpu(j)) / 3600 + sum over region-crossing legs of bytes * egress_price / 1e9
    gpu_s = P + expected output tokens * decode_step(j) / (running(j) + 1)

i.e. the request's prefill plus its share of the decode steps it rides in. Bytes are tokens times
``PriceBook.bytes_per_token``: the prompt on the way in (origin -> router -> replica), the output on
the way out (replica -> router -> origin); legs inside one region are free.

**Queue order.** :class:`DeadlineQueue` holds requests a router cannot place yet. ``edf`` serves
them by ``(priority, deadline)``, earliest deadline first; within a group of requests with the same
model and SLO class (same targets, same priority) this is arrival order, and across groups the one
whose oldest request's deadline comes first goes first (QLM's request groups). Starvation
protection: a request held for ``max_hold_s`` moves to the front (oldest first). ``fifo`` serves in
arrival order. A request that cannot be placed blocks the later ones of its model for that round
(they compete for the same replicas) but not those of other models.
"""

from __future__ import annotations

import bisect
import hmac
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from isthmus.core.errors import IsthmusError
from isthmus.core.perf import PerfModel
from isthmus.core.request import SLO, Request
from isthmus.core.snapshot import InstanceView
from isthmus.core.topology import PriceBook

T = TypeVar("T")
QueueOrder = Literal["fifo", "edf"]
QUEUE_ORDERS: tuple[QueueOrder, ...] = ("fifo", "edf")

# GORGO's fit for Mistral-7B on an A100 under SGLang (MODELS.md §3): prefill seconds per token.
DEFAULT_PREFILL_S_PER_TOKEN = 0.0938e-3
# Llama-3.1-8B on an A100-40GB at concurrency 1 (MODELS.md §1): seconds per decode step.
DEFAULT_DECODE_STEP_S = 13.3e-3


class UnknownSLOClassError(IsthmusError):
    """A request names an SLO class the catalog does not define (the router answers 400)."""


# ------------------------------------------------------------------------------------------ classes
@dataclass(frozen=True)
class SLOCatalog:
    """A deployment's SLO classes and how a request is assigned one.

    Attributes:
        classes: the classes, names unique.
        default: class of a request nothing else assigns; ``None``: such a request has no SLO.
        by_model: model name -> class name.
        by_api_key: API key -> class name (keys are compared in constant time; never logged).
        header: HTTP header a client names its class in (for the router).
        body_field: JSON body field a client names its class in (for the router).

    Raises:
        ValueError: no class, duplicate names, or a mapping to an unknown class.
    """

    classes: tuple[SLO, ...]
    default: str | None = None
    by_model: Mapping[str, str] = field(default_factory=dict)
    by_api_key: Mapping[str, str] = field(default_factory=dict, repr=False)
    header: str = "x-slo-class"
    body_field: str = "slo_class"
    _by_name: dict[str, SLO] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("an SLO catalog needs at least one class")
        by_name: dict[str, SLO] = {}
        for c in self.classes:
            if c.name in by_name:
                raise ValueError(f"duplicate SLO class {c.name!r}")
            by_name[c.name] = c
        object.__setattr__(self, "_by_name", by_name)
        known = sorted(by_name)
        refs = [("default", self.default)] if self.default is not None else []
        refs += [(f"by_model[{m!r}]", c) for m, c in self.by_model.items()]
        refs += [("by_api_key[...]", c) for c in self.by_api_key.values()]
        for where, name in refs:
            if name not in by_name:
                raise ValueError(f"{where}: unknown SLO class {name!r}; classes: {known}")

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, in catalog order."""
        return tuple(c.name for c in self.classes)

    def get(self, name: str) -> SLO:
        """The class called ``name``; :class:`UnknownSLOClassError` naming the known ones if none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownSLOClassError(f"unknown SLO class {name!r}; classes: {sorted(self._by_name)}") from None

    def resolve(self, *, header: str | None = None, body: str | None = None, model: str | None = None,
                api_key: str | None = None) -> SLO | None:
        """The class of a request (see :func:`resolve_slo_class`)."""
        return resolve_slo_class(self, header=header, body=body, model=model, api_key=api_key)


def resolve_slo_class(catalog: SLOCatalog, *, header: str | None = None, body: str | None = None,
                      model: str | None = None, api_key: str | None = None) -> SLO | None:
    """The SLO class of one request, from what the request carries.

    Precedence: the ``header`` value, the ``body`` field value, the ``api_key``'s class, the
    ``model``'s class, the catalog's default; ``None`` (no SLO) when none applies. Empty or
    whitespace-only values count as absent.

    Raises:
        UnknownSLOClassError: the header or body names a class the catalog does not define.
    """
    for explicit in (header, body):
        if explicit is not None and explicit.strip():
            return catalog.get(explicit.strip())
    if api_key:
        found: str | None = None
        given = api_key.encode()
        for key, name in catalog.by_api_key.items():  # no early exit: time independent of the match
            if hmac.compare_digest(key.encode(), given):
                found = name
        if found is not None:
            return catalog.get(found)
    if model is not None and model in catalog.by_model:
        return catalog.get(catalog.by_model[model])
    if catalog.default is not None:
        return catalog.get(catalog.default)
    return None


def deadline_s(request: Request) -> float:
    """When the request's first deadline falls, seconds on its ``arrival`` clock.

    ``arrival + ttft_s`` or ``arrival + e2e_s``, whichever is earlier; ``inf`` without either.
    """
    slo = request.slo
    if slo is None:
        return math.inf
    best = math.inf
    if slo.ttft_s is not None:
        best = slo.ttft_s
    if slo.e2e_s is not None and slo.e2e_s < best:
        best = slo.e2e_s
    return request.arrival + best


def slo_attained(slo: SLO | None, ttft_s: float, tpot_s: float, e2e_s: float) -> bool:
    """Whether a completed request met every target of ``slo`` (``True`` without an SLO).

    ``tpot_s`` may be ``nan`` (a one-token output): its target then holds.
    """
    if slo is None:
        return True
    if slo.ttft_s is not None and not ttft_s <= slo.ttft_s:
        return False
    if slo.tpot_s is not None and tpot_s == tpot_s and tpot_s > slo.tpot_s:
        return False
    return not (slo.e2e_s is not None and not e2e_s <= slo.e2e_s)


# ------------------------------------------------------------------------------------------ output lengths
class _Moments:
    __slots__ = ("mean", "n", "var")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.var = 0.0


class OutputLengthHistory:
    """Running mean and spread of output lengths, tokens, per SLO class and over all classes.

    Each observation ``x`` updates ``w = 1 / min(n, window)``, ``delta = x - mean``,
    ``mean += w * delta``, ``var = (1 - w) * (var + w * delta**2)``: Welford's exact population
    moments for the first ``window`` observations, an exponentially weighted mean and variance
    after that (so the estimate follows a drifting workload).

    :meth:`predict` uses a class's own moments once it has ``min_samples`` observations, else the
    moments over all classes once those have, else ``(prior_tokens, 0)``.
    """

    def __init__(self, prior_tokens: float = 256.0, min_samples: int = 20, window: int = 2000) -> None:
        if not (math.isfinite(prior_tokens) and prior_tokens >= 1):
            raise ValueError(f"prior_tokens must be finite and >= 1, got {prior_tokens}")
        if min_samples < 1 or window < 1:
            raise ValueError("min_samples and window must be >= 1")
        self.prior_tokens = prior_tokens
        self.min_samples = min_samples
        self.window = window
        self._classes: dict[str | None, _Moments] = {}
        self._all = _Moments()

    def _update(self, m: _Moments, x: float) -> None:
        m.n += 1
        w = 1.0 / min(m.n, self.window)
        delta = x - m.mean
        m.mean += w * delta
        m.var = (1.0 - w) * (m.var + w * delta * delta)

    def observe(self, slo_class: str | None, tokens: int) -> None:
        """Record that a request of ``slo_class`` (``None``: none) generated ``tokens`` tokens."""
        m = self._classes.get(slo_class)
        if m is None:
            m = self._classes[slo_class] = _Moments()
        x = float(tokens)
        self._update(m, x)
        self._update(self._all, x)

    def count(self, slo_class: str | None) -> int:
        """Observations of ``slo_class`` so far."""
        m = self._classes.get(slo_class)
        return m.n if m is not None else 0

    def predict(self, slo_class: str | None) -> tuple[float, float]:
        """``(mean, standard deviation)`` of the output length expected for ``slo_class``, tokens."""
        m = self._classes.get(slo_class)
        if m is not None and m.n >= self.min_samples:
            return m.mean, math.sqrt(m.var)
        return self.overall()

    def overall(self) -> tuple[float, float]:
        """``(mean, standard deviation)`` over every class (the prior until ``min_samples``)."""
        a = self._all
        if a.n >= self.min_samples:
            return a.mean, math.sqrt(a.var)
        return self.prior_tokens, 0.0


# ------------------------------------------------------------------------------------------ estimator
def decode_step_estimate(perf: PerfModel, running: int, running_tokens: int) -> float:
    """Seconds of one decode-only step of ``running + 1`` sequences holding ``running_tokens``
    tokens of context, from ``perf`` (what shells put in ``InstanceView.decode_step_s``).

    The context counts the running requests' prompts, as a router's counts do (their generated
    tokens are not known to it).
    """
    return perf.step_time(0, 0.0, 0, running + 1, running_tokens)


@dataclass(frozen=True, slots=True)
class EstimatorConfig:
    """Constants of :func:`estimate_completion`.

    Attributes:
        default_prefill_s_per_token: ``t_p`` where a view does not know its own, seconds per token.
        default_decode_step_s: decode step where a view does not know its own, seconds.
        cross_region_penalty_s: added to ``L_j`` when the replica is outside the request's origin
            region, seconds (the migration penalty).
        kv_full: KV use from which a replica counts as saturated (admits nothing more now).
    """

    default_prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN
    default_decode_step_s: float = DEFAULT_DECODE_STEP_S
    cross_region_penalty_s: float = 0.0
    kv_full: float = 0.95

    def __post_init__(self) -> None:
        for name in ("default_prefill_s_per_token", "default_decode_step_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if not (math.isfinite(self.cross_region_penalty_s) and self.cross_region_penalty_s >= 0):
            raise ValueError(f"cross_region_penalty_s must be finite and >= 0, got {self.cross_region_penalty_s}")
        if not 0.0 < self.kv_full <= 1.0:
            raise ValueError(f"kv_full must be in (0, 1], got {self.kv_full}")


@dataclass(frozen=True, slots=True)
class CompletionEstimate:
    """The estimate for one (request, replica) pair; seconds, bytes, US dollars.

    ``network_s`` (``L_j``), ``queue_s`` (``W_q``), ``prefill_s`` (``P``), ``decode_s`` (``D_q``);
    ``elapsed_s``: time the request already spent since its arrival; ``tpot_s``: predicted time per
    output token; ``output_tokens``: the output length the estimate assumes; ``gpu_s``: GPU time
    charged to the request; ``egress_bytes``: bytes it moves across regions; ``usd``: its cost.
    """

    replica: str
    network_s: float
    queue_s: float
    prefill_s: float
    decode_s: float
    elapsed_s: float
    tpot_s: float
    output_tokens: float
    gpu_s: float
    egress_bytes: float
    usd: float

    @property
    def completion_s(self) -> float:
        """``C_q = W_q + P + D_q + L_j``: time from now to the last token at the client."""
        return self.queue_s + self.prefill_s + self.decode_s + self.network_s

    @property
    def ttft_s(self) -> float:
        """Predicted client-observed TTFT, from the request's arrival."""
        return self.elapsed_s + self.network_s + self.queue_s + self.prefill_s

    @property
    def e2e_s(self) -> float:
        """Predicted client-observed end-to-end latency, from the request's arrival."""
        return self.ttft_s + self.decode_s

    def efficiency_cost(self, alpha: float) -> float:
        """``E_q = C_q + alpha * usd`` (``alpha`` in seconds per US dollar)."""
        return self.completion_s + alpha * self.usd

    def misses(self, slo: SLO | None) -> str | None:
        """The first target of ``slo`` this estimate misses, described; ``None`` when it meets all."""
        if slo is None:
            return None
        if slo.ttft_s is not None and self.ttft_s > slo.ttft_s:
            return f"TTFT {self.ttft_s:.3f} s > {slo.ttft_s:g} s"
        if slo.tpot_s is not None and self.output_tokens > 1 and self.tpot_s > slo.tpot_s:
            return f"TPOT {self.tpot_s * 1e3:.1f} ms > {slo.tpot_s * 1e3:g} ms"
        if slo.e2e_s is not None and self.e2e_s > slo.e2e_s:
            return f"E2E {self.e2e_s:.3f} s > {slo.e2e_s:g} s"
        return None


def estimate_completion(
    request: Request,
    view: InstanceView,
    *,
    now: float,
    here: str,
    rtt_s: Callable[[str, str], float],
    cached_tokens: int = 0,
    output_tokens: float,
    mean_output_tokens: float,
    prices: PriceBook | None = None,
    config: EstimatorConfig = EstimatorConfig(),
    tpot_scale: float = 1.0,
    priority: int = 0,
) -> CompletionEstimate:
    """``C_q`` and its terms, the predicted client TTFT / E2E and the cost of sending ``request``
    (at router region ``here``, time ``now``) to the replica ``view`` describes. See the module
    docstring for the formulas.

    Args:
        cached_tokens: prompt tokens ``view`` already caches (at most ``prompt_tokens - 1`` count).
        output_tokens: output length to plan for (from :class:`OutputLengthHistory`), tokens.
        mean_output_tokens: mean output length of the requests already on the replica, tokens.
        prices: GPU and egress prices; ``None`` prices everything at 0.
        tpot_scale: multiplies the profile's decode step (a correction learned from outcomes).
        priority: the priority the request would run at (<= 0: ahead of the deferred tokens).
    """
    t_p = view.prefill_s_per_token
    if t_p != t_p:
        t_p = config.default_prefill_s_per_token
    step = view.decode_step_s
    if step != step:
        step = config.default_decode_step_s
    tpot = step * tpot_scale
    prompt = request.prompt_tokens
    cached = min(max(cached_tokens, 0), prompt - 1)
    prefill = t_p * (prompt - cached)
    ahead = view.queued_prefill_tokens
    waiting = view.waiting
    if priority <= 0:
        ahead -= view.deferred_prefill_tokens
        waiting -= view.deferred_waiting
    queue = t_p * (ahead if ahead > 0 else 0)
    running = view.running
    if waiting < 0:
        waiting = 0
    saturated = (view.max_num_seqs > 0 and running + waiting >= view.max_num_seqs) or view.kv_usage >= config.kv_full
    if saturated and running > 0:
        queue += (waiting + 1) * mean_output_tokens * tpot / running
    out = max(output_tokens, 1.0)
    decode = (out - 1.0) * tpot
    origin = request.origin
    region = view.region
    network = rtt_s(here, region) + 0.5 * rtt_s(here, origin)
    if region != origin:
        network += config.cross_region_penalty_s
    gpu_s = prefill + out * step / (running + 1)
    egress_bytes = 0.0
    usd = 0.0
    if prices is not None:
        bpt = prices.bytes_per_token
        prompt_bytes = prompt * bpt
        out_bytes = out * bpt
        usd = gpu_s * prices.gpu_price(view.gpu) / 3600.0
        for a, b, size in ((origin, here, prompt_bytes), (here, region, prompt_bytes),
                           (region, here, out_bytes), (here, origin, out_bytes)):
            if a != b:
                egress_bytes += size
                usd += size * prices.egress_price(a, b) / 1e9
    elapsed = now - request.arrival
    return CompletionEstimate(
        replica=view.id, network_s=network, queue_s=queue, prefill_s=prefill, decode_s=decode,
        elapsed_s=elapsed if elapsed > 0.0 else 0.0, tpot_s=tpot, output_tokens=out, gpu_s=gpu_s,
        egress_bytes=egress_bytes, usd=usd,
    )


# ------------------------------------------------------------------------------------------ queue
@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    enqueued_s: float
    deadline_s: float
    priority: int
    group: Hashable
    key: tuple[int, float, int]


class DeadlineQueue(Generic[T]):
    """Requests held at a router, served earliest deadline first (``edf``) or in arrival order.

    Args:
        order: ``"edf"``: by ``(priority, deadline, arrival)``; ``"fifo"``: by arrival (push order).
        max_hold_s: ``edf`` only: a request held this long goes to the front, oldest first
            (starvation protection); ``inf`` turns it off.

    Typical use by a shell (the simulator; the router's hold queue the same way)::

        h = q.push(request, now=t, deadline_s=deadline_s(request), priority=p, group=request.model)
        ...
        q.drain(now, try_to_place)   # each round: place what can be placed, in order

    Handles returned by :meth:`push` name entries for :meth:`remove` and :meth:`reprioritize`.
    """

    def __init__(self, order: QueueOrder = "edf", max_hold_s: float = math.inf) -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"unknown queue order {order!r}; known: {list(QUEUE_ORDERS)}")
        if not max_hold_s > 0:
            raise ValueError(f"max_hold_s must be > 0, got {max_hold_s}")
        self.order: QueueOrder = order
        self.max_hold_s = max_hold_s
        self._edf = order == "edf"
        self._entries: dict[int, _Entry[T]] = {}
        self._keys: list[tuple[int, float, int]] = []  # sorted service keys of live entries
        self._fifo: deque[int] = deque()  # handles in push order (dead ones dropped lazily)
        self._groups: dict[Hashable, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def groups(self) -> int:
        """Distinct groups among the held requests."""
        return len(self._groups)

    def push(self, item: T, *, now: float, deadline_s: float = math.inf, priority: int = 0,
             group: Hashable = None) -> int:
        """Hold ``item`` from ``now``; returns its handle."""
        h = self._next
        self._next += 1
        key = (priority, deadline_s, h) if self._edf else (0, 0.0, h)
        self._entries[h] = _Entry(item, now, deadline_s, priority, group, key)
        bisect.insort(self._keys, key)
        self._fifo.append(h)
        self._groups[group] = self._groups.get(group, 0) + 1
        return h

    def item(self, handle: int) -> T:
        """The item held under ``handle`` (``KeyError`` when it is not held)."""
        return self._entries[handle].item

    def remove(self, handle: int) -> T:
        """Stop holding ``handle``'s item and return it (``KeyError`` when it is not held)."""
        e = self._entries.pop(handle)
        keys = self._keys
        del keys[bisect.bisect_left(keys, e.key)]
        n = self._groups[e.group] - 1
        if n:
            self._groups[e.group] = n
        else:
            del self._groups[e.group]
        fifo = self._fifo
        entries = self._entries
        while fifo and fifo[0] not in entries:
            fifo.popleft()
        if len(fifo) > 2 * len(entries) + 64:
            self._fifo = deque(h for h in fifo if h in entries)
        return e.item

    def reprioritize(self, handle: int, priority: int) -> None:
        """Give ``handle``'s entry a new priority (``edf``: it moves; ``fifo``: no effect on order)."""
        e = self._entries[handle]
        if e.priority == priority:
            return
        e.priority = priority
        if self._edf:
            keys = self._keys
            del keys[bisect.bisect_left(keys, e.key)]
            e.key = (priority, e.deadline_s, handle)
            bisect.insort(keys, e.key)

    def _order(self, now: float) -> Iterator[int]:
        promoted: list[int] = []
        if self._edf and self.max_hold_s < math.inf:
            limit = now - self.max_hold_s
            entries = self._entries
            for h in self._fifo:
                e = entries.get(h)
                if e is None:
                    continue
                if e.enqueued_s > limit:
                    break
                promoted.append(h)
        yield from promoted
        skip = set(promoted)
        for key in list(self._keys):
            h = key[2]
            if h not in skip:
                yield h

    def ordered(self, now: float) -> list[T]:
        """The held items in the order they would be served at ``now``."""
        return [self._entries[h].item for h in self._order(now)]

    def drain(self, now: float, place: Callable[[T], bool]) -> int:
        """One round at ``now``: offer each held item to ``place`` in service order; remove those it
        placed (returns ``True``). An item it cannot place blocks the rest of its group for this
        round; the round ends when every group is blocked. Returns how many were placed.

        ``place`` may call :meth:`reprioritize` on items of this queue (the order of this round
        is fixed when it starts) but must not push or remove.
        """
        entries = self._entries
        n_groups = len(self._groups)
        blocked: set[Hashable] = set()
        placed: list[int] = []
        for h in self._order(now):
            e = entries[h]
            if e.group in blocked:
                continue
            if place(e.item):
                placed.append(h)
            else:
                blocked.add(e.group)
                if len(blocked) >= n_groups:
                    break
        for h in placed:
            self.remove(h)
        return len(placed)
