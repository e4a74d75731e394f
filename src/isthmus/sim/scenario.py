"""Scenario files: one typed, frozen description of a simulated deployment, loaded from YAML.

A scenario says where the regions are and how far apart (``topology``), which replicas run where
(``replicas``), what traffic arrives (``workload``), where the router sits (``router``), which
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from isthmus.core.errors import ConfigError, IsthmusError, UnknownProfileError
from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import builtin_perf_model, gpu_spec, model_spec
from isthmus.core.policy import Policy, PolicyRegistry
from isthmus.core.request import Request
from isthmus.core.topology import Topology
from isthmus.workloads import WorkloadSpec, build_requests

if TYPE_CHECKING:
    from collections.abc import Callable

    from isthmus.sim.metrics import SimResult
    from isthmus.sim.simulator import Simulation

Loc = tuple[str | int, ...]

# Engine settings default to the values of InstanceSpec, so each default lives in one place.
_INSTANCE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(InstanceSpec)}


class FieldError(ValueError):
    """A validation failure located below the model that raises it.

    Raised inside a pydantic validator; :func:`format_validation_error` appends ``loc`` to the
    location pydantic reports for the validator's model, so the message names the exact field.
    """

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


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
    """

    regions: tuple[str, ...] = Field(min_length=1)
    rtt_ms: dict[str, dict[str, float]] = Field(default_factory=dict)
    intra_region_rtt_ms: float = Field(default=2.0, ge=0.0)
    gpu_usd_per_hour: dict[str, float] = Field(default_factory=dict)
    egress_usd_per_gb: dict[str, dict[str, float]] | None = None

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
                        gpu_usd_per_hour=dict(self.gpu_usd_per_hour))


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
        try:
            return gpu_spec(name).name
        except UnknownProfileError as exc:
            raise FieldError((), str(exc)) from None

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        try:
            return model_spec(name).name
        except UnknownProfileError as exc:
            raise FieldError((), str(exc)) from None

    @model_validator(mode="after")
    def _fits(self) -> ReplicaGroup:
        if self.num_kv_blocks is None:
            try:
                builtin_perf_model(self.gpu, self.model).num_kv_blocks(self.block_size, self.gpu_memory_utilization)
            except UnknownProfileError as exc:
                raise FieldError(("model",), str(exc)) from None
        return self


# ----------------------------------------------------------------------------------------- router, policies
class RouterConfig(_Frozen):
    """Where routing decisions are made.

    ``mode: proxy`` is one central router that sees every replica, placed in ``region`` (default:
    the first region of the topology); clients pay the RTT to it. ``regional`` (one router per
    region with stale views of its peers) is part of the schema but not simulated yet.
    """

    mode: Literal["proxy", "regional"] = "proxy"
    region: str | None = None


class PolicyConfig(_Frozen):
    """One policy to run: a registered ``name``, its ``params``, and the ``label`` results carry.

    In YAML a bare string ``least_load`` means ``{name: least_load}``. ``label`` defaults to ``name``
    and must be unique, so one policy can be compared with itself under different parameters.
    """

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

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
        if self.router.mode != "proxy":
            raise FieldError(("router", "mode"), "only 'proxy' is simulated for now")
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
        """Region of the central proxy: ``router.region``, else the first region."""
        return self.router.region or self.topology.regions[0]

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

    ``requests`` is a lazy, single-use iterator; build again for another run.
    """

    topology: Topology
    instances: tuple[InstanceSpec, ...]
    policy: Policy
    policy_label: str
    requests: Iterator[Request]
    router_region: str
    seed: int


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
        """A fresh policy object from ``registry`` (default: every built-in policy), seeded with ``seed``.

        Raises :class:`~isthmus.core.errors.RegistryError` for an unknown name or bad parameters.
        """
        if registry is None:
            from isthmus.policies import default_registry

            registry = default_registry()
        p = self.policy_config(label)
        return registry.create(p.name, p.params, rng=np.random.default_rng(seed))

    def requests(self, seed: int) -> Iterator[Request]:
        """The workload's request stream (lazy; identical for every policy at a given seed)."""
        return build_requests(self.config.workload, self.config.topology.regions, seed, self.base_dir)

    def build(self, policy_name: str, seed: int | None = None,
              registry: PolicyRegistry | None = None) -> SimulationInputs:
        """Inputs of one simulation run of policy ``policy_name`` (a label of ``policies``, or any
        registered name, which then runs with no parameters). ``seed`` defaults to the file's."""
        s = self.config.seed if seed is None else seed
        return SimulationInputs(
            topology=self.config.topology.build(),
            instances=self.config.instance_specs(),
            policy=self.make_policy(policy_name, s, registry),
            policy_label=policy_name,
            requests=self.requests(s),
            router_region=self.config.router_region,
            seed=s,
        )

    def simulation(self, policy_name: str, seed: int | None = None, *,
                   progress: Callable[[int], None] | None = None,
                   registry: PolicyRegistry | None = None) -> Simulation:
        """A ready-to-run :class:`~isthmus.sim.simulator.Simulation` for one policy."""
        from isthmus.sim.simulator import Simulation

        inp = self.build(policy_name, seed, registry)
        return Simulation(inp.topology, inp.instances, inp.policy, inp.requests,
                          router_region=inp.router_region, progress=progress)

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


# ----------------------------------------------------------------------------------------- loading
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_index(node: yaml.Node | None, loc: Loc = (), out: dict[Loc, int] | None = None) -> dict[Loc, int]:
    """Map every dotted location in a composed YAML tree to its 1-based line."""
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


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """Line of ``loc``, or of its nearest ancestor present in the file."""
    for n in range(len(loc), -1, -1):
        key = tuple(str(p) if isinstance(p, str) else p for p in loc[:n])
        if key in lines:
            return lines[key]
    return None


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


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
        line = _line_of(loc, lines) if lines else None
        where = f"{source}:{line}: " if source is not None and line is not None else (f"{source}: " if source else "")
        parts.append(f"{where}{_dotted(loc)}: {msg}")
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more")
    return "; ".join(parts)


def _read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
        lines = _line_index(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    return data, lines


def load_scenario(path: str | Path, registry: PolicyRegistry | None = None) -> Scenario:
    """Read, validate and return the scenario in ``path``.

    Besides the schema, checks that the workload's trace file exists (relative paths are resolved
    against the scenario's directory) and that every listed policy can be created from
    ``registry`` (default: the built-in policies) with its parameters.

    Raises:
        ConfigError: naming the file, the line and the dotted path of the first bad fields.
    """
    path = Path(path)
    data, lines = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a scenario must be a YAML mapping, got {type(data).__name__}")
    try:
        config = ScenarioConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, lines)) from None
    scenario = Scenario(config=config, base_dir=path.resolve().parent, source=path)

    def fail(loc: Loc, msg: str) -> ConfigError:
        line = _line_of(loc, lines)
        return ConfigError(f"{path}:{line}: {_dotted(loc)}: {msg}" if line else f"{path}: {_dotted(loc)}: {msg}")

    trace = getattr(config.workload, "path", None)
    if trace is not None and not (scenario.base_dir / trace).is_file():
        raise fail(("workload", "path"), f"no such file {str(scenario.base_dir / trace)!r}")
    for k, p in enumerate(config.policies):
        try:
            scenario.make_policy(p.key, config.seed, registry)
        except IsthmusError as exc:
            raise fail(("policies", k), str(exc)) from None
    return scenario
