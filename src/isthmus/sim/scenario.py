"""Scenario files: one typed, frozen description of a simulated deployment, loaded from YAML.

A scenario says where the regions are and how far apart (``topology``, with optional GPU and
egress prices), which replicas run where (``replicas``), what traffic arrives (``workload``), which
SLO classes its requests belong to (``slo``, optional), where the router sits (``router``), which
routing policies to compare (``policies``) and the seed. ``docs/scenario_format.md`` documents every
field; :class:`ScenarioConfig` is the schema and the single place each default is defined.

Loading is strict: unknown keys, wrong types, unknown regions, GPUs or models, duplicate YAML keys
and missing trace files all fail in :func:`load_scenario` with a :class:`~isthmus.core.errors.ConfigError`
whose message names the file, the line and the dotted path of the bad field, e.g.
``scenarios/x.yaml:14: replicas.0.gpu: unknown GPU 'B200'; ...``.

Units: RTTs are milliseconds in the file and seconds in the built :class:`~isthmus.core.Topology`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from isthmus.configfile import (
    FieldError,
    Loc,
    format_validation_error,
    gpu_name,
    load_model,
    model_name,
    where,
)
from isthmus.core.errors import ConfigError, IsthmusError, UnknownProfileError
from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import builtin_perf_model, gpu_spec
from isthmus.core.policy import Policy, PolicyRegistry
from isthmus.core.request import Request
from isthmus.core.slo import QueueOrder
from isthmus.core.topology import DEFAULT_BYTES_PER_TOKEN, Topology
from isthmus.sim.simulator import Simulation
from isthmus.workloads import WorkloadSpec, build_requests, offered_rate
from isthmus.workloads.slo import SLOConfig, assign_slo_classes, slo_rng

if TYPE_CHECKING:
    from collections.abc import Callable

    from isthmus.sim.metrics import SimResult


# Engine settings default to the values of InstanceSpec, so each default lives in one place.
_INSTANCE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(InstanceSpec)}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- topology
def _pair_matrix(
    regions: tuple[str, ...], pairs: Mapping[str, Mapping[str, float]], field: str, diagonal: Mapping[str, float]
) -> np.ndarray:
    """``{a: {b: v}}`` -> an ``n x n`` matrix, mirrored; diagonal from ``pairs`` else ``diagonal``.

    Every off-diagonal pair must be given in one direction at least; a pair given in both
    directions must agree. Raises :class:`FieldError` naming the offending entry.
    """
    idx = {r: i for i, r in enumerate(regions)}
    n = len(regions)
    m = np.full((n, n), np.nan)
    for a, row in pairs.items():
        if a not in idx:
            raise FieldError((field, a), f"unknown region {a!r}; regions: {list(regions)}")
        for b, v in row.items():
            if b not in idx:
                raise FieldError((field, a, b), f"unknown region {b!r}; regions: {list(regions)}")
            i, j = idx[a], idx[b]
            if not np.isnan(m[i, j]) and m[i, j] != v:
                raise FieldError((field, a, b), f"{a}->{b} given twice with different values ({m[i, j]} and {v})")
            m[i, j] = v
            if i != j:
                if not np.isnan(m[j, i]) and m[j, i] != v:
                    raise FieldError((field, a, b),
                                     f"{a}->{b} is {v} but {b}->{a} is {m[j, i]}; a round trip is symmetric")
                m[j, i] = v
    for i, a in enumerate(regions):
        if np.isnan(m[i, i]):
            m[i, i] = diagonal[a]
        for j, b in enumerate(regions):
            if np.isnan(m[i, j]):
                raise FieldError((field,), f"no value between {a!r} and {b!r}; give {field}: {{{a}: {{{b}: ...}}}}")
    return m


class TopologyConfig(_Frozen):
    """Regions and the network between them.

    Attributes:
        regions: region names, in a fixed order (the first is the default router region).
        rtt_ms: round-trip times in ms as nested pairs ``{a: {b: rtt}}``; each pair once is enough
            (mirrored); every pair of distinct regions must be covered. ``{a: {a: rtt}}`` sets the
            client-to-server RTT inside region ``a``.
        intra_region_rtt_ms: client-to-server RTT inside a region when ``rtt_ms`` does not give it, ms.
        gpu_usd_per_hour: optional price of one GPU hour per GPU type.
        egress_usd_per_gb: optional price of moving one GB between regions, nested pairs like
            ``rtt_ms``; when given, every pair must be covered; inside a region it defaults to 0.
        bytes_per_token: bytes one token weighs on the wire when egress is priced (text: about 4).
    """

    regions: tuple[str, ...] = Field(min_length=1)
    rtt_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    intra_region_rtt_ms: float = Field(default=2.0, ge=0.0)
    gpu_usd_per_hour: dict[str, float] = Field(default_factory=dict)
    egress_usd_per_gb: dict[str, dict[str, float]] | None = None
    bytes_per_token: float = Field(default=DEFAULT_BYTES_PER_TOKEN, ge=0.0, allow_inf_nan=False)

    @field_validator("regions")
    @classmethod
    def _unique_regions(cls, regions: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for k, r in enumerate(regions):
            if not r.strip():
                raise FieldError((k,), "region names must not be empty")
            if r in seen:
                raise FieldError((k,), f"duplicate region {r!r}")
            seen.add(r)
        return regions

    @field_validator("rtt_ms", "egress_usd_per_gb")
    @classmethod
    def _non_negative(cls, pairs: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]] | None:
        for a, row in (pairs or {}).items():
            for b, v in row.items():
                if not np.isfinite(v) or v < 0:
                    raise FieldError((a, b), f"must be a finite number >= 0, got {v}")
        return pairs

    @field_validator("gpu_usd_per_hour")
    @classmethod
    def _known_gpus(cls, prices: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, v in prices.items():
            try:
                canonical = gpu_spec(name).name
            except UnknownProfileError as exc:
                raise FieldError((name,), str(exc)) from None
            if not np.isfinite(v) or v < 0:
                raise FieldError((name,), f"must be a finite number >= 0, got {v}")
            out[canonical] = v
        return out

    @model_validator(mode="after")
    def _complete(self) -> TopologyConfig:
        self.rtt_matrix_s()
        if self.egress_usd_per_gb is not None:
            _pair_matrix(self.regions, self.egress_usd_per_gb, "egress_usd_per_gb", dict.fromkeys(self.regions, 0.0))
        return self

    def rtt_matrix_s(self) -> np.ndarray:
        """The mirrored RTT matrix, seconds (index order = ``regions``)."""
        diag = dict.fromkeys(self.regions, self.intra_region_rtt_ms)
        return _pair_matrix(self.regions, self.rtt_ms, "rtt_ms", diag) / 1000.0

    def build(self) -> Topology:
        """The :class:`~isthmus.core.Topology` this config describes."""
        egress = None
        if self.egress_usd_per_gb is not None:
            egress = _pair_matrix(self.regions, self.egress_usd_per_gb, "egress_usd_per_gb",
                                  dict.fromkeys(self.regions, 0.0))
        return Topology(regions=self.regions, rtt_s=self.rtt_matrix_s(), egress_usd_per_gb=egress,
                        gpu_usd_per_hour=dict(self.gpu_usd_per_hour), bytes_per_token=self.bytes_per_token)


# ----------------------------------------------------------------------------------------- replicas
class ReplicaGroup(_Frozen):
    """``count`` identical replicas in one region.

    GPU and model names are checked against the built-in profiles and stored in their canonical
    spelling (``a100`` -> ``A100-80GB``). Engine settings default to :class:`~isthmus.core.InstanceSpec`'s.
    ``num_kv_blocks`` unset derives the KV pool from GPU memory the way vLLM does.
    """

    region: str
    gpu: str
    model: str
    count: int = Field(default=1, ge=1)
    num_kv_blocks: int | None = Field(default=_INSTANCE_DEFAULTS["num_kv_blocks"], ge=1)
    block_size: int = Field(default=_INSTANCE_DEFAULTS["block_size"], ge=1)
    max_num_seqs: int = Field(default=_INSTANCE_DEFAULTS["max_num_seqs"], ge=1)
    max_num_batched_tokens: int = Field(default=_INSTANCE_DEFAULTS["max_num_batched_tokens"], ge=1)
    enable_chunked_prefill: bool = _INSTANCE_DEFAULTS["enable_chunked_prefill"]
    enable_prefix_caching: bool = _INSTANCE_DEFAULTS["enable_prefix_caching"]
    gpu_memory_utilization: float = Field(default=_INSTANCE_DEFAULTS["gpu_memory_utilization"], gt=0.0, le=1.0)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, name: str) -> str:
        return gpu_name(name)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return model_name(name)

    @model_validator(mode="after")
    def _fits(self) -> ReplicaGroup:
        if self.num_kv_blocks is None:
            try:
                builtin_perf_model(self.gpu, self.model).num_kv_blocks(self.block_size, self.gpu_memory_utilization)
            except UnknownProfileError as exc:
                raise FieldError(("model",), str(exc)) from None
        return self


# ----------------------------------------------------------------------------------------- router, policies
RouterMode = Literal["proxy", "regional"]
PrefixSource = Literal["mirror", "exact"]
QueueOrderName = Literal["fifo", "edf"]

# The router's timing defaults are the simulator's, so each default lives in one place.
_SIM_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(Simulation.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}
_PROXY_ONLY = frozenset({"region"})
_REGIONAL_ONLY = frozenset({"sync_period_s"})


class RouterConfig(_Frozen):
    """Where routing decisions are made and what the routers know.

    ``mode: proxy`` is one central router that sees every replica as of now, placed in ``region``
    (default: the first region of the topology); clients pay the RTT to it (GORGO-proxy's set-up).
    ``mode: regional`` is one router per region, each with its own policy object: a client sends to
    its own region's router, which sees its region's replicas as of now and the others as of its
    last poll of its peers (every ``sync_period_s``), and may forward a request once to a peer
    region's router (GORGO's distributed set-up).

    Attributes:
        mode: ``proxy`` or ``regional``.
        region: proxy mode only: where the proxy sits.
        sync_period_s: regional mode only: how often a router refreshes its view of its peers, s.
        recheck_s: how often a router asks its policy again about the requests it holds, s.
        prefix_source: what policies see of the replicas' prefix caches: ``mirror`` (each router's
            own record of what it sent where, an LRU of each replica's KV size, as GORGO-proxy
            keeps) or ``exact`` (the engines' caches, as KV events would give).
        queue: order of the requests a router holds: ``fifo`` (arrival order) or ``edf`` (earliest
            deadline first within priorities, see :class:`~isthmus.core.slo.DeadlineQueue`).
            Unset: the policy's own ``queue_order`` if it has one (``slo``: ``edf``), else ``fifo``.
        max_hold_s: ``edf``: a request held this long goes to the front (starvation protection), s.

    A field that does not apply to the mode (``region`` with ``regional``, ``sync_period_s`` with
    ``proxy``) is an error when given.
    """

    mode: RouterMode = "proxy"
    region: str | None = None
    sync_period_s: float = Field(default=_SIM_DEFAULTS["sync_period_s"], gt=0.0, allow_inf_nan=False)
    recheck_s: float = Field(default=_SIM_DEFAULTS["recheck_s"], gt=0.0, allow_inf_nan=False)
    prefix_source: PrefixSource = _SIM_DEFAULTS["prefix_source"]
    queue: QueueOrderName = _SIM_DEFAULTS["queue_order"]
    max_hold_s: float = Field(default=_SIM_DEFAULTS["max_hold_s"], gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _fields_of_the_mode(self) -> RouterConfig:
        given = self.model_fields_set
        if self.mode == "regional" and "region" in given:
            raise FieldError(("region",), "applies to mode: proxy only (in regional mode every region has its "
                                          "own router)")
        if self.mode == "proxy" and "sync_period_s" in given:
            raise FieldError(("sync_period_s",), "applies to mode: regional only (a proxy sees every replica "
                                                 "as of now)")
        return self

    def merged(self, override: RouterOverride | None) -> RouterConfig:
        """This block with ``override``'s given fields on top (a policy's own ``router``).

        When the override changes the mode, the fields of this block that do not apply to the new
        mode are dropped (``region`` when switching to ``regional``, ``sync_period_s`` when
        switching to ``proxy``); the others (``recheck_s``, ``prefix_source``) carry over.

        Raises:
            pydantic.ValidationError: when the result is invalid (e.g. the override gives
                ``region`` together with ``mode: regional``).
        """
        if override is None:
            return self
        top = override.model_dump(exclude_unset=True)
        mode = top.get("mode", self.mode)
        dropped = _PROXY_ONLY if mode == "regional" else _REGIONAL_ONLY
        data = {k: getattr(self, k) for k in self.model_fields_set if k not in dropped}
        data.update(top)
        return RouterConfig.model_validate(data)

    def resolved(self, policy: object) -> RouterConfig:
        """This block with the timings the file leaves unset taken from ``policy``.

        A policy may carry its own ``recheck_s`` and ``sync_period_s`` (GORGO's distributed
        balancer does: 20 ms and about 1 s in the paper) and ``queue_order`` (``slo``: ``edf``);
        they apply when neither the scenario's nor the policy entry's ``router`` block gives the
        field (``queue`` for ``queue_order``). Precedence: the file, then the policy object, then
        the simulator's default. (``sync_period_s`` only in regional mode.)
        """
        given = self.model_fields_set
        update: dict[str, Any] = {}
        order = getattr(policy, "queue_order", None)
        if "queue" not in given and order in ("fifo", "edf"):
            update["queue"] = order
        for name in ("recheck_s", "sync_period_s"):
            if name in given or (name == "sync_period_s" and self.mode != "regional"):
                continue
            value = getattr(policy, name, None)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
                update[name] = float(value)
        return self.model_copy(update=update) if update else self

    def proxy_region(self, regions: tuple[str, ...]) -> str | None:
        """Region of the central proxy (``region``, else the first of ``regions``); ``None`` in regional mode."""
        if self.mode == "regional":
            return None
        return self.region or regions[0]


class RouterOverride(_Frozen):
    """A policy's own ``router`` block: any of :class:`RouterConfig`'s fields, laid over the
    scenario's ``router`` for that policy only (see :meth:`RouterConfig.merged`)."""

    mode: RouterMode | None = None
    region: str | None = None
    sync_period_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    recheck_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    prefix_source: PrefixSource | None = None
    queue: QueueOrderName | None = None
    max_hold_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


class PolicyConfig(_Frozen):
    """One policy to run: a registered ``name``, its ``params``, and the ``label`` results carry.

    In YAML a bare string ``least_load`` means ``{name: least_load}``. ``label`` defaults to ``name``
    and must be unique, so one policy can be compared with itself under different parameters.
    ``router`` lays fields over the scenario's ``router`` block for this policy alone, so one
    scenario can compare a regional policy with proxy ones (e.g. ``{name: gorgo, router: {mode:
    regional}}`` beside ``gorgo_proxy``).
    """

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    router: RouterOverride | None = None

    @property
    def key(self) -> str:
        """The name results are reported under."""
        return self.label or self.name


# ----------------------------------------------------------------------------------------- scenario
class ScenarioConfig(_Frozen):
    """The whole scenario file. See ``docs/scenario_format.md`` for an annotated example."""

    name: str = Field(min_length=1)
    description: str = ""
    topology: TopologyConfig
    replicas: tuple[ReplicaGroup, ...] = Field(min_length=1)
    workload: WorkloadSpec
    slo: SLOConfig | None = None
    router: RouterConfig = Field(default_factory=RouterConfig)
    policies: tuple[PolicyConfig, ...] = Field(default=(PolicyConfig(name="least_load"),), min_length=1)
    seed: int = Field(default=0, ge=0)

    @field_validator("policies", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ScenarioConfig:
        regions = self.topology.regions
        for k, group in enumerate(self.replicas):
            if group.region not in regions:
                raise FieldError(("replicas", k, "region"), f"unknown region {group.region!r}; regions: {list(regions)}")
        if self.router.region is not None and self.router.region not in regions:
            raise FieldError(("router", "region"), f"unknown region {self.router.region!r}; regions: {list(regions)}")
        for k, p in enumerate(self.policies):
            if p.router is None:
                continue
            try:
                effective = self.router.merged(p.router)
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                cause = (err.get("ctx") or {}).get("error")
                if isinstance(cause, FieldError):
                    raise FieldError(("policies", k, "router", *cause.loc), cause.message) from None
                raise FieldError(("policies", k, "router", *err["loc"]), err["msg"]) from None
            if effective.region is not None and effective.region not in regions:
                raise FieldError(("policies", k, "router", "region"),
                                 f"unknown region {effective.region!r}; regions: {list(regions)}")
        hash_block = getattr(self.workload, "block_size", None)
        for k, group in enumerate(self.replicas):
            if hash_block is not None and group.enable_prefix_caching and group.block_size != hash_block:
                raise FieldError(("replicas", k, "block_size"),
                                 f"{group.block_size} differs from workload.block_size ({hash_block}), so prompt "
                                 "block hashes would not match cached blocks; set both to the same value")
        origins = getattr(self.workload, "origins", None)
        weights = getattr(origins, "weights", None) or {}
        for r in weights:
            if r not in regions:
                raise FieldError(("workload", "origins", "weights", r), f"unknown region {r!r}; regions: {list(regions)}")
        seen: set[str] = set()
        for k, p in enumerate(self.policies):
            if p.key in seen:
                raise FieldError(("policies", k), f"duplicate policy {p.key!r}; give one of them a distinct label")
            seen.add(p.key)
        return self

    @property
    def router_region(self) -> str:
        """Region of the central proxy of the scenario's ``router`` block: ``router.region``, else the
        first region (reported even in regional mode, where no proxy runs)."""
        return self.router.region or self.topology.regions[0]

    def router_for(self, label: str) -> RouterConfig:
        """The router set-up policy ``label`` runs under: the scenario's ``router`` with the policy's
        own ``router`` fields on top (see :meth:`RouterConfig.merged`); a label the file does not
        list runs under the scenario's block."""
        for p in self.policies:
            if p.key == label:
                return self.router.merged(p.router)
        return self.router

    def instance_specs(self) -> tuple[InstanceSpec, ...]:
        """One :class:`~isthmus.core.InstanceSpec` per replica, ids ``<region>-<k>`` numbered per region
        in file order (two groups in ``germany`` give ``germany-0`` .. ``germany-n``)."""
        next_index: dict[str, int] = {}
        out: list[InstanceSpec] = []
        for g in self.replicas:
            settings = g.model_dump(exclude={"region", "gpu", "model", "count"})
            for _ in range(g.count):
                k = next_index.get(g.region, 0)
                next_index[g.region] = k + 1
                out.append(InstanceSpec(id=f"{g.region}-{k}", region=g.region, gpu=g.gpu, model=g.model, **settings))
        return tuple(out)


@dataclass(frozen=True)
class SimulationInputs:
    """Everything :class:`~isthmus.sim.simulator.Simulation` needs for one policy run.

    ``requests`` is a lazy, single-use iterator; build again for another run. In regional mode
    ``policies_by_region`` holds one fresh policy object per region (each with its own generator)
    and ``policy`` is the first region's; in proxy mode ``policies_by_region`` is ``None``.
    ``router_region`` is where the proxy sits (``None`` in regional mode).
    """

    topology: Topology
    instances: tuple[InstanceSpec, ...]
    policy: Policy
    policy_label: str
    requests: Iterator[Request]
    router_region: str | None
    seed: int
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    policies_by_region: Mapping[str, Policy] | None = None


@dataclass(frozen=True)
class Scenario:
    """A validated scenario and the directory its relative paths are resolved against.

    Attributes:
        config: the parsed file.
        base_dir: directory of the scenario file (trace paths are relative to it).
        source: the file it was loaded from (for messages), or ``None`` when built in memory.
    """

    config: ScenarioConfig
    base_dir: Path
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def policy_config(self, label: str) -> PolicyConfig:
        """The scenario's policy called ``label``; a policy the file does not list gets no params."""
        for p in self.config.policies:
            if p.key == label:
                return p
        return PolicyConfig(name=label)

    def make_policy(self, label: str, seed: int, registry: PolicyRegistry | None = None) -> Policy:
        """A fresh policy object from ``registry`` (default: every built-in policy), its generator
        seeded with ``seed`` (``numpy.random.default_rng(seed)``).

        Raises :class:`~isthmus.core.errors.RegistryError` for an unknown name or bad parameters.
        """
        registry = _registry(registry)
        p = self.policy_config(label)
        return registry.create(p.name, p.params, rng=np.random.default_rng(seed))

    def make_regional_policies(self, label: str, seed: int,
                               registry: PolicyRegistry | None = None) -> dict[str, Policy]:
        """One fresh policy object per region of the topology, in region order, for regional mode.

        The ``k``-th region's generator is ``numpy.random.default_rng(child_k)`` with ``child_k``
        the ``k``-th of ``numpy.random.SeedSequence(seed).spawn(n_regions)``: independent streams,
        the same for the same seed. Raises :class:`~isthmus.core.errors.RegistryError` like
        :meth:`make_policy`.
        """
        registry = _registry(registry)
        p = self.policy_config(label)
        regions = self.config.topology.regions
        children = np.random.SeedSequence(seed).spawn(len(regions))
        return {r: registry.create(p.name, p.params, rng=np.random.default_rng(c))
                for r, c in zip(regions, children, strict=True)}

    def router_setup(self, label: str, registry: PolicyRegistry | None = None) -> RouterConfig:
        """The router set-up policy ``label`` runs under, timings resolved as in :meth:`build`."""
        return self.config.router_for(label).resolved(self.make_policy(label, self.config.seed, registry))

    def requests(self, seed: int) -> Iterator[Request]:
        """The workload's request stream (lazy; identical for every policy at a given seed), each
        request with its SLO class when the scenario has an ``slo`` block."""
        stream = build_requests(self.config.workload, self.config.topology.regions, seed, self.base_dir)
        slo = self.config.slo
        if slo is None:
            return stream
        return assign_slo_classes(stream, slo, slo_rng(seed))

    def offered_rate_rps(self) -> float:
        """Long-run mean request rate of the workload, req/s (``rate_rps``, else the trace's native
        rate, divided by ``time_scale``; ``limit`` and ``duration_s`` ignored). Reads the trace file
        once when it has to."""
        return offered_rate(self.config.workload, self.base_dir)

    def build(self, policy_name: str, seed: int | None = None,
              registry: PolicyRegistry | None = None) -> SimulationInputs:
        """Inputs of one simulation run of policy ``policy_name`` (a label of ``policies``, or any
        registered name, which then runs with no parameters and the scenario's router) under its
        router set-up (:meth:`ScenarioConfig.router_for`, then :meth:`RouterConfig.resolved` for
        the timings the file leaves to the policy). ``seed`` defaults to the file's."""
        s = self.config.seed if seed is None else seed
        router = self.config.router_for(policy_name)
        by_region: dict[str, Policy] | None = None
        if router.mode == "regional":
            by_region = self.make_regional_policies(policy_name, s, registry)
            policy = by_region[self.config.topology.regions[0]]
        else:
            policy = self.make_policy(policy_name, s, registry)
        router = router.resolved(policy)
        return SimulationInputs(
            topology=self.config.topology.build(),
            instances=self.config.instance_specs(),
            policy=policy,
            policy_label=policy_name,
            requests=self.requests(s),
            router_region=router.proxy_region(self.config.topology.regions),
            seed=s,
            router=router,
            policies_by_region=by_region,
        )

    def simulation(self, policy_name: str, seed: int | None = None, *,
                   progress: Callable[[int], None] | None = None,
                   registry: PolicyRegistry | None = None) -> Simulation:
        """A ready-to-run :class:`~isthmus.sim.simulator.Simulation` for one policy."""
        inp = self.build(policy_name, seed, registry)
        r = inp.router
        slo = self.config.slo
        queue: QueueOrder = "edf" if r.queue == "edf" else "fifo"
        return Simulation(inp.topology, inp.instances, inp.policy, inp.requests,
                          router_region=inp.router_region, mode=r.mode, policies_by_region=inp.policies_by_region,
                          sync_period_s=r.sync_period_s, recheck_s=r.recheck_s, prefix_source=r.prefix_source,
                          progress=progress, queue_order=queue, max_hold_s=r.max_hold_s,
                          slo_classes=tuple(c.name for c in slo.classes) if slo is not None else ())

    def run(self, policy_name: str, seed: int | None = None, *,
            progress: Callable[[int], None] | None = None,
            registry: PolicyRegistry | None = None) -> SimResult:
        """Simulate the scenario under one policy and return its result."""
        return self.simulation(policy_name, seed, progress=progress, registry=registry).run()

    def with_workload(self, **changes: Any) -> Scenario:
        """A copy whose workload has ``changes`` applied (validated), e.g. ``repeat=4`` or ``limit=500``."""
        data = self.config.workload.model_dump()
        data.update(changes)
        try:
            workload = WorkloadSpec.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, self.source, prefix=("workload",))) from None
        return dataclasses.replace(self, config=self.config.model_copy(update={"workload": workload}))

    def with_rtt_scale(self, factor: float) -> Scenario:
        """A copy with every RTT multiplied by ``factor`` (between regions and inside them, including
        the ``intra_region_rtt_ms`` default): ``0`` removes the network, ``2`` doubles it.

        Raises:
            ConfigError: ``factor`` negative or not finite.
        """
        if not np.isfinite(factor) or factor < 0:
            raise ConfigError(f"RTT scale must be a finite number >= 0, got {factor}")
        topo = self.config.topology
        scaled = topo.model_copy(update={
            "rtt_ms": {a: {b: v * factor for b, v in row.items()} for a, row in topo.rtt_ms.items()},
            "intra_region_rtt_ms": topo.intra_region_rtt_ms * factor,
        })
        return dataclasses.replace(self, config=self.config.model_copy(update={"topology": scaled}))


def _registry(registry: PolicyRegistry | None) -> PolicyRegistry:
    """``registry``, or a fresh one holding every built-in policy."""
    if registry is not None:
        return registry
    from isthmus.policies import default_registry

    return default_registry()


# ----------------------------------------------------------------------------------------- loading
def load_scenario(path: str | Path, registry: PolicyRegistry | None = None) -> Scenario:
    """Read, validate and return the scenario in ``path``.

    Besides the schema, checks that the workload's trace file exists (relative paths are resolved
    against the scenario's directory) and that every listed policy can be created from
    ``registry`` (default: the built-in policies) with its parameters.

    Raises:
        ConfigError: naming the file, the line and the dotted path of the first bad fields.
    """
    path = Path(path)
    config, lines = load_model(path, ScenarioConfig, "scenario")
    scenario = Scenario(config=config, base_dir=path.resolve().parent, source=path)

    def fail(loc: Loc, msg: str) -> ConfigError:
        return ConfigError(f"{where(path, loc, lines)}: {msg}")

    trace = getattr(config.workload, "path", None)
    if trace is not None and not (scenario.base_dir / trace).is_file():
        raise fail(("workload", "path"), f"no such file {str(scenario.base_dir / trace)!r}")
    for k, p in enumerate(config.policies):
        try:
            scenario.make_policy(p.key, config.seed, registry)
        except IsthmusError as exc:
            raise fail(("policies", k), str(exc)) from None
    return scenario
