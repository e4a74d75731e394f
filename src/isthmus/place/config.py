"""Placement configuration files: one typed, frozen description of a pipelined deployment, from YAML.

Annotated example (defaults shown where a field has one)::

    name: clustered-9
    model: {name: BLOOM-176B, blocks: 70, block_gb: 1.3234, d_model: 14336, cache_bytes_per_value: 2}
    workload:
      input_tokens: 20            # l_I
      output_tokens: 128          # l
      rate_rps: 0.5               # Poisson session arrivals
      sessions: 100               # sessions simulated
      concurrent_sessions: auto   # |R| to provision for: an integer, or auto (λ·T + √(λ·T), Sun et al.)
      seed: 0                     # arrivals (and the random choices below unless they have their own)
    network:                      # exactly one of clusters / rtt_ms / topology
      clusters: {intra_ms: 5, inter_ms: 100}     # sites are cluster names
      # rtt_ms: {a: {b: 40}}                     # sites are these names; each pair once; same site: same_site_ms
      # topology: ../../data/topology_zoo/Abvt.graph   # REPETITA file (relative to this file); sites are nodes
      same_site_ms: 0.0
      token_overhead_ms: 0.0      # added to the raw RTT for every decoded token's hop
      prompt_overhead_ms: 0.0     # added to the raw RTT for the prompt's hop ...
      prompt_overhead_ms_per_input_token: 0.0   # ... plus this per prompt token
      session_setup_ms: 0.0       # opening a session
    server_types:
      A100: {memory_gb: 79.14, decode_ms_per_block: 2.22, prefill_ms_per_block: 7.22,
             prefill_ms_per_block_per_input_token: 0.0, max_blocks: null,
             petals_forward_rps: null, petals_network_rps: null}
    servers:                      # explicit servers ...
      - {type: A100, at: cluster1, count: 2}     # named A100-1, A100-2 unless `name` (count 1) is given
    # sites: {seed: 0, servers: {A100: 2, MIG: 7}, clients: 1}   # ... or random nodes of the topology
    clients:
      - {at: cluster0, weight: 1, name: null}
    algorithms: [petals, cg_bprr, cg_bprr_ls, milp]   # also: milp_cg
    router: ws_rr                 # online router of the proposed placements: ws_rr | shortest
    petals: {cache_tokens: 4096, autograd_gib: null, hop_overhead_ms: 18, alloc_penalty_ms: 10000,
             join_order: random, seed: null}
    milp: {time_limit_s: 60, mip_rel_gap: 1.0e-4, max_variables: 200000}
    local_search: {max_moves: 100, max_evaluations: 5000}
    retry: {min_s: 1, max_s: 60}  # PETALS' client back-off
    extra_setup_ms: {}            # per algorithm, added to session_setup_ms (e.g. the paper's allocation delays)

Units in the file: milliseconds and GB (10^9 bytes); the built :class:`~isthmus.place.model.Instance`
holds seconds and bytes. Loading is strict: unknown keys, wrong types, unknown server types, sites or
topology nodes, a missing topology file and duplicate YAML keys fail in :func:`load_config` with a
:class:`~isthmus.core.errors.ConfigError` naming the file, the line and the dotted path of the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from isthmus.configfile import FieldError, Loc, load_model, where
from isthmus.core.errors import ConfigError
from isthmus.place.algorithms import PetalsParams
from isthmus.place.model import Instance, ModelSpec
from isthmus.place.topology import GraphFormatError, Network, parse_graph

ALGORITHMS = ("petals", "cg_bprr", "cg_bprr_ls", "milp", "milp_cg")
"""``petals``: PETALS' placement and routing. ``cg_bprr``: CG-BP placement, WS-RR online.
``cg_bprr_ls``: CG-BP improved by local search. ``milp``: the MILP. ``milp_cg``: the MILP limited to
solutions at least as good as CG-BPRR's."""

GB = 1e9
MS = 1e-3


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite(v: float) -> float:
    if not np.isfinite(v):
        raise ValueError(f"must be a finite number, got {v}")
    return v


class ModelConfig(_Frozen):
    """The served model (see :class:`~isthmus.place.model.ModelSpec`)."""

    name: str = "model"
    blocks: int = Field(ge=1)
    block_gb: float = Field(gt=0)
    d_model: int = Field(ge=1)
    cache_bytes_per_value: float = Field(default=2.0, gt=0)


class WorkloadConfig(_Frozen):
    """Session shape, arrivals and the concurrency to provision for."""

    input_tokens: int = Field(default=20, ge=0)
    output_tokens: int = Field(default=128, ge=1)
    rate_rps: float = Field(gt=0)
    sessions: int = Field(default=100, ge=1)
    concurrent_sessions: int | Literal["auto"] = "auto"
    seed: int = Field(default=0, ge=0)

    @field_validator("concurrent_sessions")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @field_validator("rate_rps")
    @classmethod
    def _finite_rate(cls, v: float) -> float:
        return _finite(v)


class ClustersConfig(_Frozen):
    """Sites are cluster names: RTT ``intra_ms`` within a cluster, ``inter_ms`` across."""

    intra_ms: float = Field(ge=0)
    inter_ms: float = Field(ge=0)


class NetworkConfig(_Frozen):
    """Where RTTs come from, and the fixed overheads on top of them."""

    clusters: ClustersConfig | None = None
    rtt_ms: dict[str, dict[str, float]] | None = None
    topology: str | None = None
    same_site_ms: float = Field(default=0.0, ge=0)
    token_overhead_ms: float = Field(default=0.0, ge=0)
    prompt_overhead_ms: float = Field(default=0.0, ge=0)
    prompt_overhead_ms_per_input_token: float = Field(default=0.0, ge=0)
    session_setup_ms: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> NetworkConfig:
        given = [k for k in ("clusters", "rtt_ms", "topology") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of clusters, rtt_ms, topology (got {given or 'none'})")
        for a, row in (self.rtt_ms or {}).items():
            for b, v in row.items():
                if not np.isfinite(v) or v < 0:
                    raise FieldError(("rtt_ms", a, b), f"must be a finite number >= 0, got {v}")
        return self


class ServerType(_Frozen):
    """One kind of server (GPU or slice): memory and per-block times."""

    memory_gb: float = Field(gt=0)
    decode_ms_per_block: float = Field(ge=0)
    prefill_ms_per_block: float = Field(ge=0)
    prefill_ms_per_block_per_input_token: float = Field(default=0.0, ge=0)
    max_blocks: int | None = Field(default=None, ge=0)
    petals_forward_rps: float | None = Field(default=None, gt=0)
    petals_network_rps: float | None = Field(default=None, gt=0)

    @field_validator("memory_gb", "decode_ms_per_block", "prefill_ms_per_block")
    @classmethod
    def _finite_fields(cls, v: float) -> float:
        return _finite(v)


class ServerEntry(_Frozen):
    """``count`` servers of ``type`` at site ``at``."""

    type: str
    at: str
    count: int = Field(default=1, ge=1)
    name: str | None = None

    @model_validator(mode="after")
    def _named_once(self) -> ServerEntry:
        if self.name is not None and self.count != 1:
            raise FieldError(("name",), "a name needs count: 1")
        return self


class ClientEntry(_Frozen):
    """A client at site ``at``, sending a ``weight`` share of the sessions."""

    at: str
    weight: float = Field(default=1.0, gt=0)
    name: str | None = None


class SitesConfig(_Frozen):
    """Random distinct nodes of the topology for the clients and the servers (as the paper picks them)."""

    seed: int = Field(default=0, ge=0)
    servers: dict[str, int]
    clients: int = Field(default=1, ge=1)


class PetalsConfig(_Frozen):
    """PETALS' own settings (see :class:`~isthmus.place.algorithms.PetalsParams`); ``autograd_gib`` null:
    2 GiB scaled by ``d_model / 14336`` as PETALS does; ``seed`` null: the workload's."""

    cache_tokens: int = Field(default=4096, ge=1)
    autograd_gib: float | None = Field(default=None, ge=0)
    hop_overhead_ms: float = Field(default=18.0, ge=0)
    alloc_penalty_ms: float = Field(default=10_000.0, ge=0)
    join_order: Literal["random", "file"] = "random"
    seed: int | None = Field(default=None, ge=0)


class MilpConfig(_Frozen):
    """HiGHS limits."""

    time_limit_s: float = Field(default=60.0, gt=0)
    mip_rel_gap: float = Field(default=1e-4, ge=0)
    max_variables: int = Field(default=200_000, ge=1)


class LocalSearchConfig(_Frozen):
    max_moves: int = Field(default=100, ge=0)
    max_evaluations: int = Field(default=5000, ge=0)


class RetryConfig(_Frozen):
    min_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=60.0, gt=0)


class PlaceConfig(_Frozen):
    """A whole placement file; the single place each default is defined."""

    name: str
    description: str = ""
    model: ModelConfig
    workload: WorkloadConfig
    network: NetworkConfig
    server_types: dict[str, ServerType] = Field(min_length=1)
    servers: list[ServerEntry] = Field(default_factory=list)
    sites: SitesConfig | None = None
    clients: list[ClientEntry] = Field(default_factory=list)
    algorithms: list[str] = Field(default_factory=lambda: ["petals", "cg_bprr", "cg_bprr_ls", "milp"], min_length=1)
    router: Literal["ws_rr", "shortest"] = "ws_rr"
    petals: PetalsConfig = Field(default_factory=PetalsConfig)
    milp: MilpConfig = Field(default_factory=MilpConfig)
    local_search: LocalSearchConfig = Field(default_factory=LocalSearchConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    extra_setup_ms: dict[str, float] = Field(default_factory=dict)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, names: list[str]) -> list[str]:
        for k, a in enumerate(names):
            if a not in ALGORITHMS:
                raise FieldError((k,), f"unknown algorithm {a!r}; algorithms: {', '.join(ALGORITHMS)}")
        if len(set(names)) != len(names):
            raise ValueError("an algorithm is listed twice")
        return names

    @field_validator("extra_setup_ms")
    @classmethod
    def _extra(cls, extra: dict[str, float]) -> dict[str, float]:
        for a, v in extra.items():
            if a not in ALGORITHMS:
                raise FieldError((a,), f"unknown algorithm {a!r}; algorithms: {', '.join(ALGORITHMS)}")
            if not np.isfinite(v) or v < 0:
                raise FieldError((a,), f"must be a finite number >= 0, got {v}")
        return extra

    @model_validator(mode="after")
    def _consistent(self) -> PlaceConfig:
        for k, s in enumerate(self.servers):
            if s.type not in self.server_types:
                raise FieldError(("servers", k, "type"), f"unknown server type {s.type!r}; "
                                                         f"types: {', '.join(self.server_types)}")
        if self.sites is not None:
            if self.network.topology is None:
                raise FieldError(("sites",), "random sites need network.topology")
            for t, count in self.sites.servers.items():
                if t not in self.server_types:
                    raise FieldError(("sites", "servers", t), f"unknown server type {t!r}; "
                                                              f"types: {', '.join(self.server_types)}")
                if count < 0:
                    raise FieldError(("sites", "servers", t), "must be >= 0")
        if not self.servers and (self.sites is None or sum(self.sites.servers.values()) == 0):
            raise FieldError(("servers",), "no server: list servers or give sites")
        if not self.clients and self.sites is None:
            raise FieldError(("clients",), "no client: list clients or give sites")
        return self


# ----------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class PlaceSetup:
    """A loaded file: the configuration, the instance it describes and PETALS' parameters."""

    config: PlaceConfig
    instance: Instance
    petals: PetalsParams
    source: Path | None = None


def _cap(limit: int | None, blocks: int) -> int:
    return blocks if limit is None else limit


def _site_rtt(cfg: NetworkConfig, network: Network | None, a: str, b: str) -> float:
    """Raw RTT between sites ``a`` and ``b``, seconds (sites already validated)."""
    if cfg.clusters is not None:
        return (cfg.clusters.intra_ms if a == b else cfg.clusters.inter_ms) * MS
    if network is not None:
        return float(network.rtt_s[network.index(a), network.index(b)])
    if a == b:
        return cfg.same_site_ms * MS
    pairs = cfg.rtt_ms or {}
    v = pairs.get(a, {}).get(b, pairs.get(b, {}).get(a))
    if v is None:
        raise KeyError(f"no RTT between {a!r} and {b!r}; give rtt_ms: {{{a}: {{{b}: ...}}}}")
    return float(v) * MS


def build_setup(config: PlaceConfig, base_dir: Path, source: Path | None = None,
                lines: dict[Loc, int] | None = None) -> PlaceSetup:
    """Build the instance a validated configuration describes (reads the topology file, if any).

    Raises:
        ConfigError: a missing or malformed topology file, an unknown site or node, duplicate names.
    """
    def fail(loc: Loc, msg: str) -> ConfigError:
        return ConfigError(f"{where(source, loc, lines)}: {msg}")

    net = config.network
    network: Network | None = None
    if net.topology is not None:
        path = base_dir / net.topology
        try:
            network = parse_graph(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise fail(("network", "topology"), f"no such topology file {str(path)!r}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(("network", "topology"), f"cannot read {str(path)!r}: {exc}") from None
        except GraphFormatError as exc:
            raise fail(("network", "topology"), f"{path}: {exc}") from None

    def site(loc: Loc, name: str) -> str:
        if network is not None:
            try:
                return network.labels[network.index(name)]
            except KeyError as exc:
                raise fail(loc, str(exc.args[0])) from None
        if net.rtt_ms is not None:
            known = set(net.rtt_ms) | {b for row in net.rtt_ms.values() for b in row}
            if name not in known:
                raise fail(loc, f"unknown site {name!r}; sites in network.rtt_ms: {', '.join(sorted(known))}")
        return name

    servers: list[tuple[str, str, str]] = []  # (name, type, site)
    clients: list[tuple[str, str, float]] = []
    per_type: dict[str, int] = {}
    for k, s in enumerate(config.servers):
        at = site(("servers", k, "at"), s.at)
        for _ in range(s.count):
            per_type[s.type] = per_type.get(s.type, 0) + 1
            servers.append((s.name or f"{s.type}-{per_type[s.type]}", s.type, at))
    for k, c in enumerate(config.clients):
        clients.append((c.name or f"client-{k + 1}", site(("clients", k, "at"), c.at), c.weight))
    if config.sites is not None:
        assert network is not None  # validated: sites need a topology
        rng = np.random.default_rng(config.sites.seed)
        kinds = [t for t, count in config.sites.servers.items() for _ in range(count)]
        need = config.sites.clients + len(kinds)
        if need > len(network.labels):
            raise fail(("sites",), f"{need} sites asked for, the topology has {len(network.labels)} nodes")
        nodes = rng.permutation(len(network.labels))
        kinds = [kinds[i] for i in rng.permutation(len(kinds))]
        for k in range(config.sites.clients):
            label = network.labels[nodes[k]]
            clients.append((f"client@{label}", label, 1.0))
        for kind, node in zip(kinds, nodes[config.sites.clients:], strict=False):
            label = network.labels[node]
            servers.append((f"{kind}@{label}", kind, label))
    for what, names in (("servers", [s[0] for s in servers]), ("clients", [c[0] for c in clients])):
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise fail((what,), f"duplicate {what[:-1]} names: {', '.join(dup)}")

    try:
        client_rtt = np.array([[_site_rtt(net, network, c[1], s[2]) for s in servers] for c in clients])
        server_rtt = np.array([[_site_rtt(net, network, a[2], b[2]) for b in servers] for a in servers])
    except KeyError as exc:
        raise fail(("network", "rtt_ms"), str(exc.args[0])) from None
    if not np.all(np.isfinite(client_rtt)):
        raise fail(("network", "topology"), "some client cannot reach some server (disconnected topology)")

    types = config.server_types
    lin = config.workload.input_tokens
    weights = np.array([c[2] for c in clients], float)
    model = ModelSpec(name=config.model.name, blocks=config.model.blocks, block_bytes=config.model.block_gb * GB,
                      d_model=config.model.d_model, cache_bytes_per_value=config.model.cache_bytes_per_value)
    inst = Instance(
        model=model,
        input_tokens=lin,
        output_tokens=config.workload.output_tokens,
        server_names=tuple(s[0] for s in servers),
        server_kinds=tuple(s[1] for s in servers),
        server_sites=tuple(s[2] for s in servers),
        memory_bytes=np.array([types[s[1]].memory_gb * GB for s in servers]),
        prefill_s_per_block=np.array([(types[s[1]].prefill_ms_per_block
                                       + types[s[1]].prefill_ms_per_block_per_input_token * lin) * MS
                                      for s in servers]),
        decode_s_per_block=np.array([types[s[1]].decode_ms_per_block * MS for s in servers]),
        max_blocks=np.array([min(_cap(types[s[1]].max_blocks, model.blocks), model.blocks) for s in servers],
                            dtype=np.int64),
        client_names=tuple(c[0] for c in clients),
        client_sites=tuple(c[1] for c in clients),
        client_weights=weights / weights.sum(),
        client_rtt_s=client_rtt,
        server_rtt_s=server_rtt,
        token_overhead_s=net.token_overhead_ms * MS,
        prompt_overhead_s=(net.prompt_overhead_ms + net.prompt_overhead_ms_per_input_token * lin) * MS,
        session_setup_s=net.session_setup_ms * MS,
    )
    pc = config.petals
    autograd = (pc.autograd_gib if pc.autograd_gib is not None else 2.0 * model.d_model / 14336) * 2**30
    forward = np.array([types[s[1]].petals_forward_rps or 1.0 / max(types[s[1]].decode_ms_per_block * MS, 1e-12)
                        for s in servers])
    network_rps = np.array([types[s[1]].petals_network_rps or np.inf for s in servers])
    petals = PetalsParams(forward_rps=forward, network_rps=network_rps, cache_tokens=pc.cache_tokens,
                          autograd_bytes=autograd, hop_overhead_s=pc.hop_overhead_ms * MS,
                          alloc_penalty_s=pc.alloc_penalty_ms * MS)
    return PlaceSetup(config=config, instance=inst, petals=petals, source=source)


def load_config(path: str | Path) -> PlaceSetup:
    """Read, validate and build the placement file ``path``.

    Raises:
        ConfigError: naming the file, the line and the dotted path of the first bad fields.
    """
    path = Path(path)
    config, lines = load_model(path, PlaceConfig, "placement config")
    return build_setup(config, path.resolve().parent, path, lines)
