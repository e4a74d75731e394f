"""Fidelity of the engine model against a real vLLM run (``isthmus validate``).

A ground-truth directory holds one real run as LLMServingSim's ``bench`` writes it:

* ``meta.json``: the engine settings vLLM resolved (``engine_kwargs``, ``resolved_config``), the KV
  cache it allocated (``kv_cache.num_gpu_blocks``, ``block_size``), the GPU (``hardware``) and the
  workload it replayed (``dataset_path``, relative to the folder that holds ``workloads/``);
* ``requests.jsonl``: one row per request, ``request_id`` ``bench-<i>`` for the ``i``-th workload
  row, with vLLM's ``RequestStateStats`` timestamps.

The run is replayed through one :class:`~isthmus.engine.Replica` in virtual time: the workload's
requests arrive at their ``arrival_time_ns`` offsets with their real prompt token ids (hashed into
prefix-cache blocks, so prefix caching acts on real sharing) and generate exactly the output length
the ground truth recorded. Step times come from the GPU's per-layer profile
(:class:`~isthmus.core.perf_table.TabularPerfModel`, ``perf="table"``) or from the roofline model
(``perf="roofline"``).

What the real timestamps mean (vLLM v1, checked on the bundled RTX 4090 run):

* ``arrival_time`` is wall-clock epoch seconds taken by the front end; every other timestamp is the
  engine core's monotonic clock, so ``arrival_time`` cannot be subtracted from them;
* ``queued_ts``: the engine core received the request. ``queued_ts`` minus the workload's arrival
  offset varies by less than 0.21 s over the run (median 16 ms above its minimum: the front end's
  hand-over), so ``queued_ts`` is the request's arrival as the engine sees it, and the simulated
  request arrives at its workload offset;
* ``scheduled_ts``: first scheduled; ``first_token_ts`` / ``last_token_ts``: the engine step that
  produced the first / last output token (requests finished in the same step share the value).

Hence, on both sides (the same definitions as LLMServingSim's ``bench validate``)::

    TTFT = first_token_ts - queued_ts                 (sim: first token - arrival)
    TPOT = (last_token_ts - first_token_ts) / (output_toks - 1),   requests with output_toks > 1
    E2E  = last_token_ts - queued_ts                  (sim: finish - arrival)

Reported: mean, p50 and p90 TTFT, mean TPOT and mean E2E, each with its signed relative error
``(sim - real) / real``. Bad input raises :class:`~isthmus.core.errors.ConfigError` (meta.json,
profile) or :class:`~isthmus.core.errors.TraceError` (workload, requests), naming file and field.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from isthmus.core.errors import ConfigError, IsthmusError, TraceError, UnknownProfileError
from isthmus.core.hashing import hash_token_blocks
from isthmus.core.instance import InstanceSpec
from isthmus.core.perf import PerfModel, builtin_perf_model, model_spec
from isthmus.core.perf_table import LLAMA_LAYER_OPS, LLAMA_ONCE_OPS, TabularPerfModel
from isthmus.core.request import Request
from isthmus.engine import FinishedRequest, Replica
from isthmus.workloads import read_sharegpt_tokens

PerfKind = Literal["table", "roofline"]

METRIC_KEYS: tuple[str, ...] = ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "tpot_mean_s", "e2e_mean_s")
"""Metrics of a :class:`ValidationReport`, seconds."""

_DTYPE_SHORT: Mapping[str, str] = {
    "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16",
    "float32": "fp32", "float": "fp32", "fp32": "fp32", "fp8": "fp8", "fp8_e4m3": "fp8",
}


# ----------------------------------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class MetricError:
    """One metric on both sides. ``error = (sim - real) / real`` (signed; ``nan`` if ``real == 0``)."""

    sim: float
    real: float

    @property
    def error(self) -> float:
        return (self.sim - self.real) / self.real if self.real != 0.0 else math.nan


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """Errors of one replay against its ground truth.

    Attributes:
        ground_truth: the ground-truth directory.
        gpu, model: what ran (profile names).
        perf: the step-time model used (``table`` or ``roofline``).
        requests: requests compared (those with every timestamp on the real side).
        metrics: :data:`METRIC_KEYS` -> sim and real values, seconds.
    """

    ground_truth: str
    gpu: str
    model: str
    perf: str
    requests: int
    metrics: Mapping[str, MetricError]

    def to_json(self) -> dict[str, Any]:
        """``{"ground_truth", "gpu", "model", "perf", "requests", "metrics": {key: {"sim", "real", "error"}}}``;
        non-finite numbers become ``null``."""

        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "ground_truth": self.ground_truth, "gpu": self.gpu, "model": self.model, "perf": self.perf,
            "requests": self.requests,
            "metrics": {k: {"sim": num(m.sim), "real": num(m.real), "error": num(m.error)}
                        for k, m in self.metrics.items()},
        }


# ----------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What meta.json says about the run; field meanings as in :class:`~isthmus.core.instance.InstanceSpec`."""

    model: str
    gpu_device: str
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    num_kv_blocks: int
    block_size: int
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str
    dataset_path: str


def _get(doc: Mapping[str, Any], path: str, file: Path) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise ConfigError(f"{file}: missing field {path!r}")
        cur = cur[part]
    return cur


def _opt(doc: Mapping[str, Any], path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _int_field(doc: Mapping[str, Any], path: str, file: Path, *fallbacks: str) -> int:
    """The integer (>= 1) at ``path``, or at the first of ``fallbacks`` set when ``path`` is absent or null."""
    for alt in (path, *fallbacks):
        v = _opt(doc, alt)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{file}: field {alt!r} must be an integer >= 1, got {v!r}")
            return v
    _get(doc, path, file)  # names the missing field
    raise ConfigError(f"{file}: field {path!r} is null")


def _bool_field(doc: Mapping[str, Any], paths: Sequence[str], file: Path, default: bool) -> bool:
    for path in paths:
        v = _opt(doc, path)
        if v is None:
            continue
        if not isinstance(v, bool):
            raise ConfigError(f"{file}: field {path!r} must be true or false, got {v!r}")
        return v
    return default


def _str_field(doc: Mapping[str, Any], path: str, file: Path) -> str:
    v = _get(doc, path, file)
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{file}: field {path!r} must be a non-empty string, got {v!r}")
    return v


def read_meta(gt_dir: Path) -> EngineSettings:
    """Engine settings of the run in ``gt_dir/meta.json``.

    ``engine_kwargs`` holds what the run asked for (``max_num_seqs``, ``max_num_batched_tokens``,
    ``tensor_parallel_size``, ``dtype``) and is authoritative; ``resolved_config.scheduler_config``
    stands in where it is null. ``kv_cache`` holds what vLLM allocated (``num_gpu_blocks``,
    ``block_size``). Chunked prefill and prefix caching come from the resolved config (vLLM v1's
    defaults, on, when absent).
    """
    file = gt_dir / "meta.json"
    try:
        doc = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found (is {gt_dir} a ground-truth directory?)") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    kv_dtype = _opt(doc, "engine_kwargs.kv_cache_dtype")
    return EngineSettings(
        model=_str_field(doc, "model", file),
        gpu_device=str(_opt(doc, "hardware.device_name") or ""),
        max_num_seqs=_int_field(doc, "engine_kwargs.max_num_seqs", file, "resolved_config.scheduler_config.max_num_seqs"),
        max_num_batched_tokens=_int_field(doc, "engine_kwargs.max_num_batched_tokens", file,
                                          "resolved_config.scheduler_config.max_num_batched_tokens"),
        enable_chunked_prefill=_bool_field(
            doc, ("resolved_config.scheduler_config.enable_chunked_prefill",), file, True),
        enable_prefix_caching=_bool_field(
            doc, ("kv_cache.enable_prefix_caching", "resolved_config.cache_config.enable_prefix_caching"), file, True),
        num_kv_blocks=_int_field(doc, "kv_cache.num_gpu_blocks", file, "resolved_config.cache_config.num_gpu_blocks"),
        block_size=_int_field(doc, "kv_cache.block_size", file, "resolved_config.cache_config.block_size"),
        tensor_parallel_size=(_int_field(doc, "engine_kwargs.tensor_parallel_size", file)
                              if _opt(doc, "engine_kwargs.tensor_parallel_size") is not None else 1),
        dtype=str(_opt(doc, "engine_kwargs.dtype") or "bfloat16"),
        kv_cache_dtype=str(kv_dtype) if kv_dtype else "auto",
        dataset_path=_str_field(doc, "dataset_path", file),
    )


@dataclass(frozen=True, slots=True)
class WorkloadRow:
    """One request of the replayed workload: arrival offset (s), prompt token ids, output length."""

    arrival_s: float
    prompt_ids: tuple[int, ...]
    output_tokens: int


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            yield from fh
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None


def read_workload(path: Path) -> list[WorkloadRow]:
    """Rows of an LLMServingSim workload (JSONL, optionally gzipped), read by the workloads reader.

    Each row needs ``arrival_time_ns`` (offset from the start of the run), ``input_toks`` and
    ``input_tok_ids``; rows must be in arrival order.
    """
    if not path.is_file():
        raise TraceError(f"{path}: workload not found")
    rows = [
        WorkloadRow(rec.arrival_s, tuple(rec.token_ids or ()), max(1, rec.output_tokens))
        for rec in read_sharegpt_tokens(path, hashes=False, keep_token_ids=True)
    ]
    if not rows:
        raise TraceError(f"{path}: no requests")
    return rows


@dataclass(frozen=True, slots=True)
class RealRequest:
    """One request of the ground truth: workload index, lengths and its engine timestamps (s)."""

    index: int
    input_tokens: int
    output_tokens: int
    queued_ts: float | None
    first_token_ts: float | None
    last_token_ts: float | None

    @property
    def complete(self) -> bool:
        return None not in (self.queued_ts, self.first_token_ts, self.last_token_ts)


def read_ground_truth(gt_dir: Path) -> list[RealRequest]:
    """Rows of ``gt_dir/requests.jsonl`` (``request_id`` ``bench-<i>`` maps to workload row ``i``)."""
    file = gt_dir / "requests.jsonl"
    if not file.is_file():
        raise TraceError(f"{file}: not found")
    out: list[RealRequest] = []
    seen: set[int] = set()
    for lineno, line in enumerate(_open_text(file), start=1):
        if not line.strip():
            continue
        where = f"{file}, line {lineno}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise TraceError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(rec, Mapping):
            raise TraceError(f"{where}: expected a JSON object")
        rid = rec.get("request_id")
        if not isinstance(rid, str) or not rid.rpartition("-")[2].isdigit():
            raise TraceError(f"{where}: field 'request_id' must look like 'bench-<index>', got {rid!r}")
        index = int(rid.rpartition("-")[2])
        if index in seen:
            raise TraceError(f"{where}: duplicate request_id {rid!r}")
        seen.add(index)
        lengths: list[int] = []
        for key in ("input_toks", "output_toks"):
            v = rec.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TraceError(f"{where}: field {key!r} must be an integer >= 1, got {v!r}")
            lengths.append(v)
        stamps: list[float | None] = []
        for key in ("queued_ts", "first_token_ts", "last_token_ts"):
            v = rec.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise TraceError(f"{where}: field {key!r} must be a number or null, got {v!r}")
            stamps.append(None if v is None else float(v))
        out.append(RealRequest(index, lengths[0], lengths[1], *stamps))
    if not out:
        raise TraceError(f"{file}: no requests")
    return out


def _ancestors(path: Path) -> Iterator[Path]:
    p = path.resolve()
    yield p
    yield from p.parents


def find_workload(gt_dir: Path, dataset_path: str) -> Path:
    """The workload meta.json names: ``<ancestor>/<dataset_path>`` (plain or ``.gz``), nearest first.

    Also tried: ``<ancestor>/workloads/<file name>``, for runs whose ``dataset_path`` was absolute.
    """
    rel = Path(dataset_path)
    if rel.is_absolute():
        for cand in (rel, rel.with_name(rel.name + ".gz")):
            if cand.is_file():
                return cand
    for anc in _ancestors(gt_dir):
        bases = [anc / rel] if not rel.is_absolute() else []
        bases.append(anc / "workloads" / rel.name)
        for base in bases:
            for cand in (base, base.with_name(base.name + ".gz")):
                if cand.is_file():
                    return cand
    raise TraceError(f"workload {dataset_path!r} named by {gt_dir / 'meta.json'} not found "
                     f"(looked for it and its .gz in the workloads/ folders above {gt_dir}); pass it explicitly")


def _short(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _gpu_candidates(gt_dir: Path, device: str) -> list[str]:
    """GPU folder names to try: the ground truth's parent folder, then the device name without vendor."""
    cands = [gt_dir.resolve().parent.name]
    words = [w for w in device.replace("-", " ").split() if w.lower() not in {"nvidia", "geforce", "amd", "tesla"}]
    if words:
        cands.append("".join(words))
    return cands


def find_profile_dir(gt_dir: Path, settings: EngineSettings, profiles_root: Path | None = None) -> tuple[Path, str]:
    """The GPU profile for this run and the GPU's folder name.

    Looks in ``profiles_root`` or else the nearest ``profiles/`` folder above ``gt_dir``, for
    ``<GPU>/<model short name>/<dtype>[-kv<kv dtype>]/tp<N>/``, matching folder names without regard
    to case or punctuation (``RTX4090`` for "NVIDIA GeForce RTX 4090").
    """
    if profiles_root is None:
        for anc in _ancestors(gt_dir):
            if (anc / "profiles").is_dir():
                profiles_root = anc / "profiles"
                break
        else:
            raise ConfigError(f"no profiles/ folder above {gt_dir}; pass the profiles root explicitly")
    if not profiles_root.is_dir():
        raise ConfigError(f"{profiles_root}: profiles root not found")
    gpu_dirs = {_short(p.name): p for p in profiles_root.iterdir() if p.is_dir()}
    gpu_dir = next((gpu_dirs[_short(c)] for c in _gpu_candidates(gt_dir, settings.gpu_device)
                    if _short(c) in gpu_dirs), None)
    if gpu_dir is None:
        raise ConfigError(f"{profiles_root}: no profile for GPU {settings.gpu_device or gt_dir.parent.name!r} "
                          f"(have {sorted(p.name for p in gpu_dirs.values())})")
    model_short = settings.model.rstrip("/").rpartition("/")[2]
    model_dirs = {_short(p.name): p for p in gpu_dir.iterdir() if p.is_dir()}
    model_dir = model_dirs.get(_short(model_short))
    if model_dir is None:
        raise ConfigError(f"{gpu_dir}: no profile for model {model_short!r} (field 'model' of meta.json)")
    variant = _DTYPE_SHORT.get(settings.dtype, settings.dtype)
    if settings.kv_cache_dtype != "auto":
        variant += "-kv" + _DTYPE_SHORT.get(settings.kv_cache_dtype, settings.kv_cache_dtype)
    tp_dir = model_dir / variant / f"tp{settings.tensor_parallel_size}"
    if not tp_dir.is_dir():
        raise ConfigError(f"{tp_dir}: profile not found (dtype {settings.dtype!r}, kv cache dtype "
                          f"{settings.kv_cache_dtype!r}, tensor parallel {settings.tensor_parallel_size})")
    return tp_dir, gpu_dir.name


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise ConfigError(f"{path}: missing columns {missing} (have {header})")
            return list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _num(row: Mapping[str, str], key: str, path: Path, lineno: int) -> float:
    try:
        v = float(row[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{path}, line {lineno}: column {key!r} is not a number: {row.get(key)!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{path}, line {lineno}: column {key!r} must be finite and >= 0, got {v}")
    return v


def _curves(path: Path, key: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for lineno, row in enumerate(_read_csv(path, ("layer", key, "time_us")), start=2):
        xs, ys = out.setdefault(row["layer"], ([], []))
        xs.append(_num(row, key, path, lineno))
        ys.append(_num(row, "time_us", path, lineno))
    if not out:
        raise ConfigError(f"{path}: no rows")
    return out


def load_profile(profile_dir: Path, num_layers: int | None = None, step_overhead_s: float = 0.0) -> TabularPerfModel:
    """A :class:`TabularPerfModel` from ``dense.csv``, ``per_sequence.csv`` and ``attention.csv`` in ``profile_dir``.

    ``num_layers`` defaults to the built-in model spec named by the profile's model folder
    (``profiles/<GPU>/<model>/<dtype>/tp<N>/``); the layer composition is Llama's
    (:data:`~isthmus.core.perf_table.LLAMA_LAYER_OPS`).
    """
    if num_layers is None:
        name = profile_dir.resolve().parent.parent.name
        try:
            num_layers = model_spec(name).layers
        except UnknownProfileError as exc:
            raise ConfigError(f"{profile_dir}: cannot tell the model's layer count: {exc}") from None
    dense = _curves(profile_dir / "dense.csv", "tokens")
    seqs = _curves(profile_dir / "per_sequence.csv", "sequences")
    attn_path = profile_dir / "attention.csv"
    cols = ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us")
    rows = [[_num(r, c, attn_path, i) for c in cols] for i, r in enumerate(_read_csv(attn_path, cols), start=2)]
    try:
        return TabularPerfModel.from_profile(dense, seqs, np.asarray(rows, dtype=np.float64), num_layers,
                                             LLAMA_LAYER_OPS, LLAMA_ONCE_OPS, step_overhead_s)
    except ValueError as exc:
        raise ConfigError(f"{profile_dir}: {exc}") from None


# ----------------------------------------------------------------------------------------- replay
def replay(requests: Sequence[Request], spec: InstanceSpec, perf: PerfModel, num_kv_blocks: int) -> list[FinishedRequest]:
    """Run ``requests`` (sorted by arrival) through one replica in virtual time; finished requests.

    The event loop: the replica steps back to back while it has work; requests that arrived by
    the start of a step join the waiting queue before it (a request arriving mid-step waits for
    the step boundary, as in vLLM). Each step is passed the next arrival as ``horizon`` so fused
    decode steps end no later than it, which keeps them exact.

    Raises:
        ValueError: a request can never be scheduled (it needs more KV blocks than the replica has).
    """
    replica = Replica(spec, perf, num_kv_blocks)
    done: list[FinishedRequest] = []
    t = 0.0
    i = 0
    n = len(requests)
    idle_steps = 0
    while i < n or replica.has_work:
        if not replica.has_work and requests[i].arrival > t:
            t = requests[i].arrival
        while i < n and requests[i].arrival <= t:
            replica.add_request(requests[i], requests[i].arrival)
            i += 1
        result = replica.step(t, requests[i].arrival if i < n else math.inf)
        if result is None:
            continue
        idle_steps = idle_steps + 1 if result.prefill_tokens == 0 and result.decode_tokens == 0 else 0
        if idle_steps > 3:
            raise ValueError(f"the replica cannot schedule any of its requests at t = {t:.3f} s "
                             f"(does one need more than the {num_kv_blocks} KV blocks?)")
        t += result.duration
        done.extend(result.finished)
    return done


def _metrics(ttft: Sequence[float], tpot: Sequence[float], e2e: Sequence[float]) -> dict[str, float]:
    def stat(xs: Sequence[float], q: float | None) -> float:
        if not xs:
            return math.nan
        return float(np.mean(xs)) if q is None else float(np.percentile(xs, q))

    return {"ttft_mean_s": stat(ttft, None), "ttft_p50_s": stat(ttft, 50), "ttft_p90_s": stat(ttft, 90),
            "tpot_mean_s": stat(tpot, None), "e2e_mean_s": stat(e2e, None)}


def run_validation(gt_dir: Path, workload: Path | None = None, profiles_root: Path | None = None,
                   perf: PerfKind = "table") -> ValidationReport:
    """Replay the run in ``gt_dir`` and compare it with the measured timestamps (module docstring).

    Args:
        gt_dir: ground-truth directory (``meta.json``, ``requests.jsonl``).
        workload: the workload it replayed; default: found from ``dataset_path`` in meta.json.
        profiles_root: folder of GPU profiles; default: the nearest ``profiles/`` above ``gt_dir``.
        perf: ``"table"`` for the measured profile, ``"roofline"`` for the built-in roofline model.

    Raises:
        ConfigError, TraceError: bad or missing input, naming the file and field.
    """
    if perf not in ("table", "roofline"):
        raise ConfigError(f"perf must be 'table' or 'roofline', got {perf!r}")
    gt_dir = Path(gt_dir)
    settings = read_meta(gt_dir)
    if settings.tensor_parallel_size != 1:
        raise ConfigError(f"{gt_dir / 'meta.json'}: tensor_parallel_size {settings.tensor_parallel_size} "
                          f"is not supported (the profiles do not model collectives)")
    real = read_ground_truth(gt_dir)
    wl_path = find_workload(gt_dir, settings.dataset_path) if workload is None else Path(workload)
    rows = read_workload(wl_path)
    model_short = settings.model.rstrip("/").rpartition("/")[2]
    gpu = gt_dir.resolve().parent.name
    perf_model: PerfModel
    if perf == "table":
        profile_dir, gpu = find_profile_dir(gt_dir, settings, profiles_root)
        perf_model = load_profile(profile_dir)
    else:
        cands = _gpu_candidates(gt_dir, settings.gpu_device)
        roof = None
        for cand in cands:
            with contextlib.suppress(UnknownProfileError):
                roof = builtin_perf_model(cand, model_short)
                gpu = cand
                break
        if roof is None:
            raise ConfigError(f"no built-in roofline profile for GPU {cands} and model {model_short!r}")
        perf_model = roof

    gt_file = gt_dir / "requests.jsonl"
    by_index: dict[int, RealRequest] = {}
    for r in real:
        if r.index >= len(rows):
            raise TraceError(f"{gt_file}: request bench-{r.index} has no row in {wl_path} ({len(rows)} rows)")
        if r.input_tokens != len(rows[r.index].prompt_ids):
            raise TraceError(f"{gt_file}: request bench-{r.index} has input_toks {r.input_tokens} but row "
                             f"{r.index + 1} of {wl_path} has {len(rows[r.index].prompt_ids)} prompt tokens")
        by_index[r.index] = r

    bs = settings.block_size
    requests = [
        Request(id=str(r.index), arrival=rows[r.index].arrival_s, origin="local",
                prompt_tokens=r.input_tokens, block_hashes=hash_token_blocks(rows[r.index].prompt_ids, bs),
                max_output_tokens=r.output_tokens)
        for r in sorted(real, key=lambda r: (rows[r.index].arrival_s, r.index))
    ]
    spec = InstanceSpec(
        id="validate", region="local", gpu=gpu, model=model_short, num_kv_blocks=settings.num_kv_blocks,
        block_size=bs, max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_chunked_prefill=settings.enable_chunked_prefill, enable_prefix_caching=settings.enable_prefix_caching,
    )
    try:
        finished = replay(requests, spec, perf_model, settings.num_kv_blocks)
    except ValueError as exc:  # a request that can never fit the KV cache
        raise TraceError(f"{wl_path}: {exc}") from None
    sim_by_index = {int(f.request.id): f for f in finished}

    s_ttft: list[float] = []
    s_tpot: list[float] = []
    s_e2e: list[float] = []
    r_ttft: list[float] = []
    r_tpot: list[float] = []
    r_e2e: list[float] = []
    compared = 0
    for idx, r in sorted(by_index.items()):
        f = sim_by_index.get(idx)
        if not r.complete or f is None:
            continue
        assert r.queued_ts is not None and r.first_token_ts is not None and r.last_token_ts is not None
        compared += 1
        r_ttft.append(r.first_token_ts - r.queued_ts)
        r_e2e.append(r.last_token_ts - r.queued_ts)
        s_ttft.append(f.first_token_at - f.arrived_at)
        s_e2e.append(f.finished_at - f.arrived_at)
        if r.output_tokens > 1:
            r_tpot.append((r.last_token_ts - r.first_token_ts) / (r.output_tokens - 1))
            s_tpot.append((f.finished_at - f.first_token_at) / (r.output_tokens - 1))
    if compared == 0:
        raise TraceError(f"{gt_file}: no request has all of queued_ts, first_token_ts and last_token_ts")
    sim_m = _metrics(s_ttft, s_tpot, s_e2e)
    real_m = _metrics(r_ttft, r_tpot, r_e2e)
    return ValidationReport(
        ground_truth=str(gt_dir), gpu=gpu, model=model_short, perf=perf, requests=compared,
        metrics={k: MetricError(sim_m[k], real_m[k]) for k in METRIC_KEYS},
    )


# ----------------------------------------------------------------------------------------- shell
_LABELS: Mapping[str, str] = {
    "ttft_mean_s": "TTFT mean", "ttft_p50_s": "TTFT p50", "ttft_p90_s": "TTFT p90",
    "tpot_mean_s": "TPOT mean", "e2e_mean_s": "E2E mean",
}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fmt(value: float, unit_ms: bool) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value * 1000.0:,.1f}" if unit_ms else f"{value:,.2f}"


def main(gt_dir: Path, workload: Path | None = None, json_out: Path | None = None,
         perf: PerfKind = "table", profiles_root: Path | None = None) -> int:
    """Run :func:`run_validation`, print a table, write the report as JSON if asked.

    Returns 0 on success, 2 on bad input (one line on stderr naming the file and field) and 1 when
    the JSON cannot be written.
    """
    from rich.console import Console
    from rich.table import Table

    try:
        report = run_validation(Path(gt_dir), None if workload is None else Path(workload), profiles_root, perf)
    except IsthmusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = Table(title=f"{report.gpu} / {report.model} ({report.perf})", title_justify="left",
                  caption=f"{report.requests} requests; error = (sim - real) / real", caption_justify="left")
    table.add_column("metric")
    table.add_column("sim", justify="right")
    table.add_column("real", justify="right")
    table.add_column("error", justify="right")
    for key, m in report.metrics.items():
        ms = key.startswith("tpot")
        unit = " (ms)" if ms else " (s)"
        err_s = "—" if not math.isfinite(m.error) else f"{100.0 * m.error:+.1f} %"
        table.add_row(_LABELS.get(key, key) + unit, _fmt(m.sim, ms), _fmt(m.real, ms), err_s)
    Console().print(table)
    if json_out is not None:
        try:
            _write_atomic(Path(json_out), (json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n").encode())
        except OSError as exc:
            print(f"error: cannot write {json_out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0
