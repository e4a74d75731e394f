"""vLLM's Prometheus metrics, with vLLM's names, labels, buckets and meanings, for one engine double.

Every series carries ``model_name`` (the served name) and ``engine`` (``"0"``, the data-parallel
rank), as vLLM v1 labels them. Gauges and the prefix-cache counters are read from the replica when
scraped; the others are updated as tokens are delivered. Times are wall-clock seconds as measured by
the server (``time.monotonic``), i.e. what a client sees, so under ``--time-scale`` they shrink by the
same factor as the engine's steps.

=========================================  =========  ====================================================
name                                       type       meaning
=========================================  =========  ====================================================
``vllm:num_requests_running``              gauge      requests in the running batch
``vllm:num_requests_waiting``              gauge      requests queued (preempted ones included)
``vllm:kv_cache_usage_perc``               gauge      share of KV blocks in use, 0..1
``vllm:gpu_cache_usage_perc``              gauge      the same, under its pre-0.9 name
``vllm:prefix_cache_queries_total``        counter    prompt tokens looked up in the prefix cache
``vllm:prefix_cache_hits_total``           counter    of those, tokens found cached
``vllm:gpu_prefix_cache_queries_total``    counter    pre-0.9 names of the two above
``vllm:gpu_prefix_cache_hits_total``
``vllm:num_preemptions_total``             counter    preemptions
``vllm:prompt_tokens_total``               counter    prompt tokens of requests that got a first token
``vllm:generation_tokens_total``           counter    tokens generated
``vllm:request_success_total``             counter    finished requests, by ``finished_reason``
``vllm:time_to_first_token_seconds``       histogram  request received -> first token out
``vllm:inter_token_latency_seconds``       histogram  time between consecutive tokens of a request
``vllm:time_per_output_token_seconds``     histogram  per finished request: (e2e - TTFT) / (tokens - 1)
``vllm:e2e_request_latency_seconds``       histogram  request received -> last token out
``vllm:request_prompt_tokens``             histogram  prompt tokens per finished request
``vllm:request_generation_tokens``         histogram  generated tokens per finished request
``vllm:cache_config_info``                 gauge      1, with ``block_size``, ``num_gpu_blocks``, ... labels
=========================================  =========  ====================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from isthmus.engine.replica import ReplicaStats

LABELS = ("model_name", "engine")
FINISHED_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def one_two_five_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(float(m * scale))
        scale *= 10


class _LiveCollector:
    """Gauges and cache counters read from the replica at scrape time."""

    def __init__(self, stats: Callable[[], ReplicaStats], labels: list[str]) -> None:
        self._stats = stats
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        lv = self._labels
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage),
            ("vllm:gpu_cache_usage_perc",
             "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
             s.kv_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(lv, float(value))
            yield g
        for name, doc, count in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_queries_tokens),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.prefix_hits_tokens),
            ("vllm:gpu_prefix_cache_queries",
             "GPU prefix cache queries, in terms of number of queried tokens. DEPRECATED: Use "
             "vllm:prefix_cache_queries instead.", s.prefix_queries_tokens),
            ("vllm:gpu_prefix_cache_hits",
             "GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED: Use "
             "vllm:prefix_cache_hits instead.", s.prefix_hits_tokens),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", s.preemptions),
        ):
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(lv, float(count))
            yield c


class EmulatorMetrics:
    """The metrics of one engine double, in a registry of its own (no global state).

    Args:
        model_name: value of the ``model_name`` label.
        stats: the replica's current counters (called at every scrape).
        cache_info: labels of ``vllm:cache_config_info`` besides ``engine`` (string values).
        max_model_len: top of the token-count histograms' buckets.
        engine: value of the ``engine`` label.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, stats: Callable[[], ReplicaStats], cache_info: Mapping[str, str],
                 max_model_len: int, engine: str = "0") -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        lv = [model_name, engine]
        self.registry.register(_LiveCollector(stats, lv))

        self._prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS,
                                      registry=reg).labels(*lv)
        self._generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", LABELS,
                                          registry=reg).labels(*lv)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*LABELS, "finished_reason"], registry=reg)
        self._success = {r: success.labels(*lv, r) for r in FINISHED_REASONS}
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               LABELS, registry=reg, buckets=TTFT_BUCKETS).labels(*lv)
        self._itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              LABELS, registry=reg, buckets=ITL_BUCKETS).labels(*lv)
        self._tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                               LABELS, registry=reg, buckets=ITL_BUCKETS).labels(*lv)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              LABELS, registry=reg, buckets=E2E_BUCKETS).labels(*lv)
        token_buckets = one_two_five_buckets(max_model_len)
        self._req_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", LABELS,
                                     registry=reg, buckets=token_buckets).labels(*lv)
        self._req_gen = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", LABELS,
                                  registry=reg, buckets=token_buckets).labels(*lv)
        info = {**cache_info, "engine": engine}
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
              registry=reg).labels(**info).set(1)

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        """A request got its first token ``ttft_s`` after it was received."""
        self._ttft.observe(ttft_s)
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc()

    def next_token(self, itl_s: float) -> None:
        """A request got a further token ``itl_s`` after its previous one."""
        self._itl.observe(itl_s)
        self._generation_tokens.inc()

    def finished(self, e2e_s: float, ttft_s: float, prompt_tokens: int, output_tokens: int,
                 reason: str = "length") -> None:
        """A request produced its last token ``e2e_s`` after it was received."""
        self._success[reason].inc()
        self._e2e.observe(e2e_s)
        if output_tokens > 1:
            self._tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))
        self._req_prompt.observe(prompt_tokens)
        self._req_gen.observe(output_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
