"""The workload configuration: one frozen, validated model for every kind of workload."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from isthmus.core.hashing import DEFAULT_BLOCK_SIZE
from isthmus.workloads.readers import MAX_NAMESPACE, MOONCAKE_BLOCK_TOKENS

WorkloadKind = Literal["mooncake", "azure", "sharegpt_tokens", "sharegpt_lengths", "poisson", "sessions",
                       "shared_prefix", "phases"]

TIMED_KINDS: frozenset[str] = frozenset({"mooncake", "azure", "sharegpt_tokens"})
"""Trace files whose lines carry arrival times."""
FILE_KINDS: frozenset[str] = TIMED_KINDS | {"sharegpt_lengths"}
"""Kinds read from ``path``."""
SYNTHETIC_KINDS: frozenset[str] = frozenset({"poisson", "sessions", "shared_prefix"})
"""Kinds generated from parameters alone."""
UNTIMED_KINDS: frozenset[str] = SYNTHETIC_KINDS | {"sharegpt_lengths"}
"""Kinds whose arrivals come from an arrival process (``arrival``, ``cv``, ``rate_rps``)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OriginSpec(_Frozen):
    """Where requests come from.

    Attributes:
        weights: ``{region: weight}``; weights >= 0 with a positive sum, regions left out get 0.
            ``None``: uniform over the scenario's regions. Region names are checked against the
            scenario when requests are built (:class:`~isthmus.core.errors.ConfigError`).
        per_session: every request of a session comes from the same region (drawn from the same
            weights); requests without a session are drawn one by one.
    """

    weights: dict[str, float] | None = None
    per_session: bool = False

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        for name, w in value.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} must be finite and >= 0, got {w}")
        if not sum(value.values()) > 0:
            raise ValueError("weights must have a positive sum")
        return value


class LengthSpec(_Frozen):
    """Prompt and output lengths of synthetic requests, tokens.

    Attributes:
        dist: ``"fixed"`` -- always ``prompt_tokens`` and ``output_tokens``; ``"lognormal"`` --
            independent lognormal draws with those means and shape parameters ``prompt_sigma``,
            ``output_sigma`` (standard deviations of the underlying normals), rounded, >= 1;
            ``"sharegpt"`` -- rows drawn with replacement from the ShareGPT length-statistics CSV at
            ``path``.
        prompt_tokens: fixed value or mean of the prompt length. For ``sessions`` it is the new user
            tokens of each turn, for ``shared_prefix`` the unique suffix after the system prompt.
        output_tokens: fixed value or mean of the output length.
        prompt_sigma, output_sigma: lognormal shape parameters.
        path: the length table for ``dist: sharegpt``; relative paths are resolved against the
            scenario's directory.
    """

    dist: Literal["fixed", "lognormal", "sharegpt"] = "fixed"
    prompt_tokens: int = Field(default=512, ge=1)
    output_tokens: int = Field(default=128, ge=1)
    prompt_sigma: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    output_sigma: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    path: str | None = None

    @model_validator(mode="after")
    def _check_path(self) -> LengthSpec:
        if self.dist == "sharegpt" and self.path is None:
            raise ValueError("path: required when dist is 'sharegpt'")
        if self.dist != "sharegpt" and self.path is not None:
            raise ValueError("path: only used when dist is 'sharegpt'")
        return self


# Fields that only some kinds use; setting one to a non-default value for another kind is an error.
_KIND_FIELDS: dict[str, frozenset[str]] = {
    "path": FILE_KINDS,
    "repeat": FILE_KINDS,
    "arrival": UNTIMED_KINDS,
    "cv": UNTIMED_KINDS,
    "lengths": SYNTHETIC_KINDS,
    "turns_mean": frozenset({"sessions"}),
    "think_time_s": frozenset({"sessions"}),
    "groups": frozenset({"shared_prefix"}),
    "system_prompt_tokens": frozenset({"shared_prefix"}),
    "group_skew": frozenset({"shared_prefix"}),
    "phases": frozenset({"phases"}),
}


class WorkloadSpec(_Frozen):
    """What traffic a scenario replays or generates.

    Kinds and what they read:

    * ``mooncake`` -- Mooncake JSON lines at ``path`` (block hashes from its 512-token hash ids);
    * ``azure`` -- Azure LLM inference CSV at ``path`` (no prefix information);
    * ``sharegpt_tokens`` -- ShareGPT JSON lines with token ids at ``path`` (hashes of real tokens);
    * ``sharegpt_lengths`` -- ShareGPT length-statistics CSV at ``path``, one request per row in file
      order, arrivals from the ``arrival`` process at ``rate_rps``;
    * ``poisson`` -- independent requests with ``lengths``, arrivals from the ``arrival`` process;
    * ``sessions`` -- multi-turn conversations: ``turns_mean``, ``think_time_s``, per-turn ``lengths``
      (see :func:`~isthmus.workloads.synthetic.session_requests`);
    * ``shared_prefix`` -- ``groups`` groups with a system prompt of ``system_prompt_tokens`` each,
      picked with Zipf exponent ``group_skew`` (see
      :func:`~isthmus.workloads.synthetic.shared_prefix_requests`);
    * ``phases`` -- the workloads of ``phases`` one after the other (a workload that changes
      mid-run): phase *k + 1* starts one mean inter-arrival gap of phase *k* after its last arrival,
      each phase with its own independent random streams; every phase but the last must end
      (``limit`` or ``duration_s``), all use the top-level ``block_size``; ``limit``,
      ``duration_s`` and ``time_scale`` apply to the whole.

    Timing: arrivals start at 0 and never decrease. For the timed trace kinds (``mooncake``,
    ``azure``, ``sharegpt_tokens``), times are the file's, shifted to start at 0; with ``rate_rps``
    they are compressed or stretched so the mean rate ``count / (last - first)`` equals it. For the
    other kinds ``rate_rps`` (required) is the long-run mean request rate of the arrival process
    (``sessions``: sessions start at ``rate_rps / turns_mean``). Then every time is multiplied by
    ``time_scale``. The synthetic kinds are endless: they need ``limit`` or ``duration_s``.

    Attributes:
        kind: see above.
        path: trace file for the file kinds, plain or gzipped; relative to the scenario's directory.
        rate_rps: target mean request rate, requests per second.
        time_scale: factor on every arrival time after rescaling (2.0 halves the rate).
        limit: at most this many requests.
        duration_s: drop requests arriving after this time, seconds (after scaling).
        repeat: file kinds: the file replayed this many times back to back; copy *k* is shifted by
            *k* trace periods (the span from first to last arrival plus one mean inter-arrival gap)
            and its block hashes live in namespace *k*, so copies share no prefixes.
        max_prompt_tokens: cap on prompt length, tokens; a capped prompt keeps its leading full
            blocks' hashes.
        arrival: arrival process of the untimed kinds: ``poisson`` or ``gamma`` (renewal process
            with gamma inter-arrival times of coefficient of variation ``cv``; ``cv = 1`` is Poisson).
        cv: coefficient of variation of gamma inter-arrival times; only with ``arrival: gamma``.
        origins: origin regions of requests (default: uniform over the scenario's regions).
        block_size: tokens per KV block for block hashes; must divide 512 for ``mooncake``.
        lengths: synthetic kinds: prompt and output lengths.
        turns_mean: ``sessions``: mean turns per session (geometric, >= 1).
        think_time_s: ``sessions``: mean time between consecutive turns of a session, seconds
            (exponential; 0 = back to back).
        groups: ``shared_prefix``: number of system prompts.
        system_prompt_tokens: ``shared_prefix``: tokens per system prompt.
        group_skew: ``shared_prefix``: Zipf exponent of group popularity (0 = uniform).
        phases: ``phases``: the workloads, in order.
    """

    kind: WorkloadKind
    path: str | None = None
    rate_rps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    limit: int | None = Field(default=None, ge=1)
    duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    repeat: int = Field(default=1, ge=1, le=MAX_NAMESPACE + 1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    origins: OriginSpec = Field(default_factory=OriginSpec)
    block_size: int = Field(default=DEFAULT_BLOCK_SIZE, ge=1)
    lengths: LengthSpec = Field(default_factory=LengthSpec)
    turns_mean: float = Field(default=4.0, ge=1, allow_inf_nan=False)
    think_time_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    groups: int = Field(default=8, ge=1)
    system_prompt_tokens: int = Field(default=2048, ge=1)
    group_skew: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    phases: tuple[WorkloadSpec, ...] = ()

    @model_validator(mode="after")
    def _check_kind(self) -> WorkloadSpec:
        kind = self.kind
        if kind == "phases":
            self._check_phases()
        for name, kinds in _KIND_FIELDS.items():
            if kind not in kinds and getattr(self, name) != type(self).model_fields[name].get_default(
                    call_default_factory=True):
                used_by = ", ".join(sorted(kinds))
                raise ValueError(f"{name}: not used by kind {kind!r} (only by {used_by})")
        if kind in FILE_KINDS and self.path is None:
            raise ValueError(f"path: required for kind {kind!r}")
        if kind in UNTIMED_KINDS and self.rate_rps is None:
            raise ValueError(f"rate_rps: required for kind {kind!r}, which has no arrival times")
        if kind in SYNTHETIC_KINDS and self.limit is None and self.duration_s is None:
            raise ValueError(f"limit or duration_s: kind {kind!r} is endless, give at least one")
        if self.arrival == "poisson" and self.cv != 1.0:
            raise ValueError("cv: only used with arrival 'gamma' (a Poisson process has cv 1)")
        if kind == "phases":
            return self
        if kind == "mooncake" and MOONCAKE_BLOCK_TOKENS % self.block_size:
            raise ValueError(f"block_size: must divide {MOONCAKE_BLOCK_TOKENS} for kind 'mooncake', "
                             f"got {self.block_size}")
        return self

    def _check_phases(self) -> None:
        if not self.phases:
            raise ValueError("phases: give at least one workload")
        for name in ("rate_rps", "max_prompt_tokens"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: set it in each phase, not on kind 'phases'")
        if self.origins != OriginSpec():
            raise ValueError("origins: set them in each phase, not on kind 'phases'")
        last = len(self.phases) - 1
        for k, phase in enumerate(self.phases):
            if phase.kind == "phases":
                raise ValueError(f"phases.{k}.kind: phases do not nest")
            if phase.block_size != self.block_size:
                raise ValueError(f"phases.{k}.block_size: {phase.block_size} differs from the workload's "
                                 f"{self.block_size}; every phase hashes blocks of the same size")
            if k < last and phase.limit is None and phase.duration_s is None and phase.kind not in FILE_KINDS:
                raise ValueError(f"phases.{k}: give limit or duration_s (a phase before the last must end)")
        final = self.phases[last]
        if final.kind in SYNTHETIC_KINDS and final.limit is None and final.duration_s is None \
                and self.limit is None and self.duration_s is None:
            raise ValueError("limit or duration_s: the last phase is endless, give one (there or on the whole)")
