"""Synthetic workloads: arrival processes, length distributions, multi-turn sessions, shared prompts.

Every function takes the ``numpy.random.Generator`` it draws from and nothing else random: the same
generator state gives the same output, value for value. Draws are made in fixed-size batches, so a
stream is the same however far it is consumed. All streams are infinite unless their inputs end;
the caller bounds them (a request limit or a duration).

Synthetic prompts are token ids drawn uniformly from a vocabulary of :data:`VOCAB_SIZE` and hashed
with :func:`~isthmus.core.hashing.hash_token_blocks`, so prefix sharing is exact: two prompts share
their first *k* block hashes exactly when they share their first ``k * block_size`` tokens, and two
independently drawn blocks collide with probability ``VOCAB_SIZE ** -block_size``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

from isthmus.core.hashing import DEFAULT_BLOCK_SIZE, ROOT_HASH, hash_token_blocks
from isthmus.workloads._files import PathLike
from isthmus.workloads.readers import read_sharegpt_lengths
from isthmus.workloads.records import TraceRecord

VOCAB_SIZE = 32_000
"""Token ids of synthetic prompts are drawn from ``[0, VOCAB_SIZE)``."""

_BATCH = 1024

LengthPair = tuple[int, int]
"""``(prompt_tokens, output_tokens)``."""


# ------------------------------------------------------------------------------------------ arrivals
def poisson_arrivals(rate_rps: float, rng: np.random.Generator) -> Iterator[float]:
    """Arrival times of a Poisson process of ``rate_rps`` requests per second, the first at 0.

    Inter-arrival times are exponential with mean ``1 / rate_rps`` seconds.
    """
    if not rate_rps > 0 or not math.isfinite(rate_rps):
        raise ValueError(f"rate_rps must be finite and > 0, got {rate_rps}")
    t = 0.0
    scale = 1.0 / rate_rps
    yield t
    while True:
        for gap in rng.exponential(scale, _BATCH).tolist():
            t += gap
            yield t


def gamma_arrivals(rate_rps: float, cv: float, rng: np.random.Generator) -> Iterator[float]:
    """Arrival times of a renewal process with gamma inter-arrival times, the first at 0.

    Inter-arrival times have mean ``1 / rate_rps`` seconds and coefficient of variation ``cv``
    (standard deviation / mean): shape ``k = 1 / cv**2``, scale ``1 / (rate_rps * k)``. ``cv = 1``
    is a Poisson process; ``cv > 1`` is burstier, ``cv < 1`` more regular.
    """
    if not rate_rps > 0 or not math.isfinite(rate_rps):
        raise ValueError(f"rate_rps must be finite and > 0, got {rate_rps}")
    if not cv > 0 or not math.isfinite(cv):
        raise ValueError(f"cv must be finite and > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate_rps * shape)
    t = 0.0
    yield t
    while True:
        for gap in rng.gamma(shape, scale, _BATCH).tolist():
            t += gap
            yield t


def arrival_times(process: Literal["poisson", "gamma"], rate_rps: float, cv: float,
                  rng: np.random.Generator) -> Iterator[float]:
    """:func:`poisson_arrivals` or :func:`gamma_arrivals` by name (``cv`` is ignored for Poisson)."""
    if process == "poisson":
        return poisson_arrivals(rate_rps, rng)
    if process == "gamma":
        return gamma_arrivals(rate_rps, cv, rng)
    raise ValueError(f"unknown arrival process {process!r}")


# ------------------------------------------------------------------------------------------- lengths
def fixed_lengths(prompt_tokens: int, output_tokens: int) -> Iterator[LengthPair]:
    """The same ``(prompt_tokens, output_tokens)`` forever."""
    if prompt_tokens < 1 or output_tokens < 0:
        raise ValueError(f"need prompt_tokens >= 1 and output_tokens >= 0, got {prompt_tokens}, {output_tokens}")
    return itertools.repeat((prompt_tokens, output_tokens))


def lognormal_lengths(prompt_mean: float, output_mean: float, prompt_sigma: float, output_sigma: float,
                      rng: np.random.Generator) -> Iterator[LengthPair]:
    """Independent lognormal prompt and output lengths with the given means, tokens.

    ``sigma`` is the standard deviation of the underlying normal; its mean is
    ``mu = ln(mean) - sigma**2 / 2`` so that ``E[length] = mean``. Draws are rounded to the
    nearest integer and floored at 1.
    """
    for name, mean, sigma in (("prompt", prompt_mean, prompt_sigma), ("output", output_mean, output_sigma)):
        if not mean > 0 or not sigma > 0:
            raise ValueError(f"{name} mean and sigma must be > 0, got {mean}, {sigma}")
    mu_p = math.log(prompt_mean) - prompt_sigma**2 / 2
    mu_o = math.log(output_mean) - output_sigma**2 / 2
    while True:
        prompts = np.maximum(np.rint(rng.lognormal(mu_p, prompt_sigma, _BATCH)), 1).astype(np.int64)
        outputs = np.maximum(np.rint(rng.lognormal(mu_o, output_sigma, _BATCH)), 1).astype(np.int64)
        yield from zip(prompts.tolist(), outputs.tolist(), strict=True)


def load_length_table(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of a ShareGPT length-statistics CSV, as two int64 arrays.

    The table is a distribution to sample from, so it is held in memory (two integers per row).
    """
    prompts: list[int] = []
    outputs: list[int] = []
    for p, o in read_sharegpt_lengths(path):
        prompts.append(p)
        outputs.append(o)
    if not prompts:
        raise ValueError(f"{path}: empty length table")
    return np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64)


def table_lengths(prompts: np.ndarray, outputs: np.ndarray, rng: np.random.Generator) -> Iterator[LengthPair]:
    """Rows of a length table drawn uniformly with replacement."""
    if len(prompts) != len(outputs) or len(prompts) == 0:
        raise ValueError("length table columns must be non-empty and of equal length")
    while True:
        rows = rng.integers(0, len(prompts), _BATCH)
        yield from zip(prompts[rows].tolist(), outputs[rows].tolist(), strict=True)


# ----------------------------------------------------------------------------------------- requests
def _random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, VOCAB_SIZE, n).tolist() if n > 0 else []


def independent_requests(arrivals: Iterable[float], lengths: Iterable[LengthPair]) -> Iterator[TraceRecord]:
    """Requests that share nothing: one per arrival, lengths in order, no block hashes.

    Ends when either input ends.
    """
    for t, (prompt, output) in zip(arrivals, lengths, strict=False):
        yield TraceRecord(t, prompt, output)


class _Session:
    """A conversation in progress: its key, turns left, and the state to extend its prompt."""

    __slots__ = ("hashes", "key", "pending_output", "prompt_tokens", "tail", "turns_left")

    def __init__(self, key: str, turns: int) -> None:
        self.key = key
        self.turns_left = turns
        self.prompt_tokens = 0
        self.hashes: tuple[int, ...] = ()
        self.tail: list[int] = []  # tokens after the last full block
        self.pending_output = 0  # output tokens of the previous turn, part of the next prompt

    def extend(self, new_tokens: list[int], block_size: int) -> None:
        """Append tokens to the prompt, hashing only the blocks they complete."""
        tokens = self.tail + new_tokens if self.tail else new_tokens
        parent = self.hashes[-1] if self.hashes else ROOT_HASH
        added = hash_token_blocks(tokens, block_size, parent)
        if added:
            self.hashes += added
        self.tail = tokens[len(added) * block_size:]
        self.prompt_tokens += len(new_tokens)


def session_requests(
    starts: Iterable[float],
    lengths: Iterable[LengthPair],
    rng: np.random.Generator,
    *,
    turns_mean: float,
    think_time_s: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[TraceRecord]:
    """Multi-turn conversations, merged into one stream in arrival order.

    A session starts at each time of ``starts`` and has a geometric number of turns (>= 1) with
    mean ``turns_mean`` (each turn is the last with probability ``1 / turns_mean``). Turn 1 arrives at
    the start; turn *k + 1* arrives an exponential think time (mean ``think_time_s`` seconds, 0 =
    at once) after turn *k* was sent -- the time covers the response and the user's reading, since
    a workload cannot know response times. Each turn draws ``(new user tokens, output tokens)`` from
    ``lengths``; its prompt is the previous turn's prompt + the previous turn's output + the new
    user tokens, so its block hashes extend the previous turn's exactly. Sessions get keys
    ``"s000000"``, ``"s000001"``, ... in start order. Ties in time go to the earlier-scheduled turn.

    Memory is bounded by the sessions in progress (each keeps its block hashes and < one block of
    tokens).
    """
    if turns_mean < 1:
        raise ValueError(f"turns_mean must be >= 1, got {turns_mean}")
    if think_time_s < 0:
        raise ValueError(f"think_time_s must be >= 0, got {think_time_s}")
    end_p = 1.0 / turns_mean
    start_iter = iter(starts)
    length_iter = iter(lengths)
    heap: list[tuple[float, int, _Session]] = []
    order = 0
    n_sessions = 0
    next_start = next(start_iter, math.inf)
    while True:
        if heap and heap[0][0] <= next_start:
            t, _, session = heapq.heappop(heap)
        elif next_start < math.inf:
            t = next_start
            session = _Session(f"s{n_sessions:06d}", int(rng.geometric(end_p)))
            n_sessions += 1
            next_start = next(start_iter, math.inf)
        else:
            return
        pair = next(length_iter, None)
        if pair is None:
            return
        user_tokens, output_tokens = pair
        session.extend(_random_tokens(rng, session.pending_output + user_tokens), block_size)
        yield TraceRecord(t, session.prompt_tokens, output_tokens, session.hashes, session.key)
        session.turns_left -= 1
        if session.turns_left > 0:
            session.pending_output = output_tokens
            think = float(rng.exponential(think_time_s)) if think_time_s > 0 else 0.0
            heapq.heappush(heap, (t + think, order, session))
            order += 1


def shared_prefix_requests(
    arrivals: Iterable[float],
    lengths: Iterable[LengthPair],
    rng: np.random.Generator,
    *,
    groups: int,
    system_prompt_tokens: int,
    group_skew: float = 0.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[TraceRecord]:
    """Requests in ``groups`` groups, each group's prompts starting with its own system prompt.

    Each group has a random system prompt of ``system_prompt_tokens`` tokens. A request picks a
    group -- uniformly when ``group_skew`` is 0, else with Zipf probabilities proportional to
    ``rank ** -group_skew`` (group 0 most popular) -- and appends a fresh random suffix of the
    prompt length drawn from ``lengths``: ``prompt_tokens = system_prompt_tokens + suffix``. So
    requests of one group share the system prompt's full blocks and nothing after them; requests of
    different groups share nothing. Ends when either input ends.
    """
    if groups < 1 or system_prompt_tokens < 1:
        raise ValueError(f"need groups >= 1 and system_prompt_tokens >= 1, got {groups}, {system_prompt_tokens}")
    if group_skew < 0:
        raise ValueError(f"group_skew must be >= 0, got {group_skew}")
    weights = np.arange(1, groups + 1, dtype=float) ** -group_skew
    p = weights / weights.sum()
    prefixes: list[tuple[tuple[int, ...], list[int]]] = []
    for _ in range(groups):
        tokens = _random_tokens(rng, system_prompt_tokens)
        full = hash_token_blocks(tokens, block_size)
        prefixes.append((full, tokens[len(full) * block_size:]))
    picks: list[int] = []
    pick = 0
    for t, (suffix_tokens, output_tokens) in zip(arrivals, lengths, strict=False):
        if pick == len(picks):
            picks = rng.choice(groups, _BATCH, p=p).tolist() if groups > 1 else [0] * _BATCH
            pick = 0
        full, tail = prefixes[picks[pick]]
        pick += 1
        tokens = tail + _random_tokens(rng, suffix_tokens)
        hashes = full + hash_token_blocks(tokens, block_size, full[-1] if full else ROOT_HASH)
        yield TraceRecord(t, system_prompt_tokens + suffix_tokens, output_tokens, hashes)
