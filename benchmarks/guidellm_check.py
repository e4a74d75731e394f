"""guidellm, a load generator of the field, against ``isthmus serve``, beside ``isthmus bench``'s replay.

Checks that our client (:func:`isthmus.bench.loadgen.run_bench`) and guidellm measure the same
thing when they send the same load to the same server. Steps, all on 127.0.0.1:

1. guidellm in a virtual environment of its own (``--venv``; created on first use: ``pip install
   torch==2.13.0`` first, the CPU build on this machine's disk, else guidellm pulls a CUDA build of
   several GB; then ``pip install guidellm``).
2. A local tokenizer, since nothing can be downloaded: a byte-level BPE trained with the
   ``tokenizers`` library on the repository's README and docs, saved as a ``PreTrainedTokenizerFast``
   directory (``--tokenizer-dir``). The engine doubles and the router count tokens with its
   ``tokenizer.json`` too, so a "500-token prompt" is 500 tokens for the client and the engine alike
   (the engines' ``vllm:prompt_tokens_total`` is read before and after each run to show it).
3. Two ``isthmus emulate`` engine doubles (Mistral-7B on an A100, ``--time-scale``) and ``isthmus
   serve`` (``--policy``, default least_load) in front of them; no relays (one region).
4. The same open-loop load from both clients: ``--requests`` requests at a constant ``--rate``
   (request k sent at k / rate seconds), each a ``--prompt-tokens``-token prompt of random English
   text (Faker, as guidellm's ``synthetic_text`` makes them: text encoded, cut to the length,
   decoded) and exactly ``--output-tokens`` output tokens, streamed ``/v1/completions``:
   guidellm's ``constant`` profile, and ``run_bench`` with the same arrivals (``isthmus bench``
   replays open loop and has no closed-loop mode). ``--repeats`` rounds, the two clients
   alternating. Then, for reference, guidellm's closed-loop ``concurrent`` profile with
   ``--streams`` streams (no counterpart in ``isthmus bench``), unless ``--streams 0``.

Compared: TTFT (send to first token) mean / p50 / p99, inter-token latency (isthmus's TPOT,
``(e2e - ttft) / (tokens - 1)``, is guidellm's ITL; guidellm's own "TPOT" is ``e2e / tokens``, the
first token included, and is shown too), end-to-end latency, throughput (completed requests and
output tokens per second of the run), errors, and each client's send lag (due time to request
sent: ``run_bench``'s ``send_lag_s``, guidellm's ``request_dispatch_delay``; neither is part of its
TTFT). Both clients share the machine's cores with the engines and the router; guidellm runs its
own worker processes.

Usage::

    python benchmarks/guidellm_check.py [--rate 4] [--requests 40] [--prompt-tokens 500]
        [--output-tokens 64] [--repeats 2] [--streams 4] [--json out/guidellm_check.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from _common import free_port, package_version, wait_for_url

from isthmus.bench.loadgen import run_bench
from isthmus.bench.testbed import sigterm_raises
from isthmus.core.request import Request

REPO = Path(__file__).resolve().parent.parent
ISTHMUS = Path(sys.executable).parent / "isthmus"
TORCH = "torch==2.13.0"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}

BUILD_TOKENIZER = r"""
import sys
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
out, files = Path(sys.argv[1]), sys.argv[2:]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train(files, trainer)
# no post-processor: encoding adds no special token, so tokenizer.json alone (engines, router) and
# the transformers tokenizer (guidellm) give the same ids
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>")
fast.save_pretrained(str(out))
print(len(fast))
"""

MAKE_PROMPTS = r"""
import json, sys
from faker import Faker
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
n, length, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
faker = Faker()
faker.seed_instance(seed)
out = []
for k in range(n):
    ids, attempt = [], 0
    while len(ids) < length:  # as guidellm's synthetic_text: Faker text, encoded, cut, decoded
        attempt += 1
        ids = tok.encode(f"{seed}.{k} " + faker.text(max_nb_chars=int(length * 7.5 * attempt)),
                         add_special_tokens=False)
    out.append(tok.decode(ids[:length], skip_special_tokens=True))
json.dump(out, sys.stdout)
"""


# ---------------------------------------------------------------------- guidellm and its tokenizer
def ensure_guidellm(venv: Path) -> Path:
    """guidellm's entry point in ``venv``, installed there on first use (CPU torch first)."""
    exe = venv / "bin" / "guidellm"
    if exe.exists():
        return exe
    pip = venv / "bin" / "pip"
    steps = ([[sys.executable, "-m", "venv", str(venv)]] if not pip.exists() else []) + [
        [str(pip), "install", "-q", TORCH], [str(pip), "install", "-q", "guidellm"]]
    for argv in steps:
        print(f"  {' '.join(argv[-3:])} ...", flush=True)
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr.strip()[-1500:]}")
    # CUDA builds of these break torch's import when present; text benchmarks need none of them
    subprocess.run([str(pip), "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                   capture_output=True, text=True)
    if not exe.exists():
        raise RuntimeError(f"pip installed guidellm but {exe} is missing")
    return exe


def ensure_tokenizer(venv: Path, out: Path) -> Path:
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    texts = [str(p) for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if p.is_file()]
    if not texts:
        raise RuntimeError("no training text for the tokenizer (README.md, docs/*.md)")
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(venv / "bin" / "python"), "-c", BUILD_TOKENIZER, str(out), *texts],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"building the tokenizer failed:\n{done.stderr.strip()[-1500:]}")
    return out


def make_prompts(venv: Path, tok: Path, n: int, length: int, seed: int) -> list[str]:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", MAKE_PROMPTS, str(tok), str(n), str(length),
                           str(seed)], capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"making prompts failed:\n{done.stderr.strip()[-1500:]}")
    prompts = json.loads(done.stdout)
    assert isinstance(prompts, list) and len(prompts) == n
    return [str(p) for p in prompts]


# ---------------------------------------------------------------------- processes
class Procs:
    """Children in process groups of their own, stopped (SIGTERM, then SIGKILL) on leaving."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("wb") as sink:
            proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever is left in its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def start_engine(procs: Procs, log: Path, tok: Path, time_scale: float) -> str:
    proc = procs.spawn([str(ISTHMUS), "emulate", "--host", "127.0.0.1", "--port", "0", "--model", "Mistral-7B",
                        "--gpu", "A100", "--served-model-name", "m", "--tokenizer", str(tok / "tokenizer.json"),
                        "--time-scale", str(time_scale)], log)
    return wait_for_url(proc, log)


def start_router(procs: Procs, work: Path, engines: list[str], tok: Path, policy: str) -> str:
    port = free_port()
    cfg = {"listen": {"host": "127.0.0.1", "port": port}, "region": "local", "models": ["m"],
           "tokenizer": str(tok / "tokenizer.json"),
           "replicas": [{"url": u, "region": "local", "gpu": "A100", "model": "Mistral-7B"} for u in engines],
           "policy": {"name": policy}, "log_level": "warning"}
    path = work / "router.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = work / "router.log"
    proc = procs.spawn([str(ISTHMUS), "serve", str(path)], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            if resp.status == 200:
                return url
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"router did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def warm_up(url: str, n: int = 4) -> None:
    body = json.dumps({"model": "m", "prompt": "warm up " * 50, "max_tokens": 4}).encode()
    for _ in range(n):
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()


_COUNTER = re.compile(r"^(vllm:prompt_tokens_total|vllm:request_success_total)(?:\{[^}]*\})?\s+(\S+)", re.M)


def engine_counters(engines: list[str]) -> dict[str, float]:
    """Prompt tokens and finished requests summed over the engines' ``/metrics``."""
    total = {"vllm:prompt_tokens_total": 0.0, "vllm:request_success_total": 0.0}
    for url in engines:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            for name, value in _COUNTER.findall(resp.read().decode(errors="replace")):
                total[name] += float(value)
    return total


def engine_view(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    n = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    tokens = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    return {"requests": n, "mean_prompt_tokens": tokens / n if n else math.nan}


# ---------------------------------------------------------------------- the two clients
def run_guidellm(procs: Procs, exe: Path, tok: Path, url: str, profile: str, args: argparse.Namespace,
                 out: Path, log: Path) -> dict[str, Any]:
    argv = [str(exe), "run", "--backend", f"kind=openai_http,target={url},request_format=/v1/completions,model=m",
            "--tokenizer", f"kind=huggingface_auto,model={tok}", "--profile", profile,
            "--constraint", f"kind=max_requests,count={args.requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    t0 = time.monotonic()
    proc = procs.spawn(argv, log, env={**os.environ, **OFFLINE_ENV})
    try:
        code = proc.wait(args.guidellm_timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"guidellm did not finish in {args.guidellm_timeout} s; its log ({log}) ends with:\n"
                           f"{log.read_text(errors='replace')[-1500:]}") from None
    finally:
        procs.stop(proc)  # also any worker process of its group still alive
        procs.procs.remove(proc)
    if code != 0 or not out.is_file():
        raise RuntimeError(f"guidellm exited with status {code}; its log ({log}) ends with:\n"
                           f"{log.read_text(errors='replace')[-1500:]}")
    doc = json.loads(out.read_text())
    b = doc["benchmarks"][0]
    m = b["metrics"]

    def stat(name: str) -> dict[str, float]:
        s = (m.get(name) or {}).get("successful")  # e.g. no dispatch delay in a closed loop
        if not s:
            return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
        return {"mean": s["mean"], "p50": s["percentiles"]["p50"], "p99": s["percentiles"]["p99"]}

    totals = m["request_totals"]
    duration = float(b["duration"])
    out_tokens = float(m["output_token_count"]["successful"]["total_sum"])
    return {
        "client": "guidellm", "profile": profile, "completed": totals["successful"],
        "errors": totals["errored"] + totals["incomplete"],
        "ttft_ms": stat("time_to_first_token_ms"), "itl_ms": stat("inter_token_latency_ms"),
        "guidellm_tpot_ms": stat("time_per_output_token_ms"),
        "e2e_ms": {k: v * 1e3 for k, v in stat("request_latency").items()},
        "throughput_rps": totals["successful"] / duration if duration > 0 else math.nan,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else math.nan,
        "send_lag_ms": {k: v * 1e3 for k, v in stat("request_dispatch_delay").items()},
        "guidellm_requests_per_second_mean": m["requests_per_second"]["successful"]["mean"],
        "mean_prompt_tokens_client": m["prompt_token_count"]["successful"]["mean"],
        "duration_s": duration, "process_s": time.monotonic() - t0,
    }


def run_isthmus_bench(url: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    reqs = [Request(id=str(k), arrival=k / args.rate, origin="us-west", prompt_tokens=args.prompt_tokens,
                    block_hashes=(), max_output_tokens=args.output_tokens) for k in range(args.requests)]
    t0 = time.monotonic()
    result = run_bench(REPO / "scenarios" / "tiny.yaml", target=url, model="m", requests=reqs, time_scale=1.0,
                       prompt=lambda r: prompts[int(r.id)], scrape_prefix=False, label="isthmus bench")
    s = result.summary()

    def ms(d: dict[str, float]) -> dict[str, float]:
        return {k: d[k] * 1e3 for k in ("mean", "p50", "p99")}

    return {
        "client": "isthmus bench", "profile": f"open loop, {args.rate:g} req/s", "completed": s["completed"],
        "errors": s["errors"] + s["timeouts"], "ttft_ms": ms(s["ttft_s"]), "itl_ms": ms(s["tpot_s"]),
        "itl_all_gaps_ms": ms(s["itl_s"]), "e2e_ms": ms(s["e2e_s"]), "throughput_rps": s["throughput_rps"],
        "output_tokens_per_s": s["output_tokens_per_s"], "send_lag_ms": ms(s["send_lag_s"]),
        "duration_s": s["wall_s"], "process_s": time.monotonic() - t0,
    }


# ---------------------------------------------------------------------- report
def mean_of(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, int | float) and math.isfinite(v):
            vals.append(float(v))
    return statistics.fmean(vals) if vals else math.nan


ROWS = (("TTFT mean (ms)", ("ttft_ms", "mean"), "{:.1f}"), ("TTFT p50 (ms)", ("ttft_ms", "p50"), "{:.1f}"),
        ("TTFT p99 (ms)", ("ttft_ms", "p99"), "{:.1f}"),
        ("inter-token mean (ms) [isthmus TPOT = guidellm ITL]", ("itl_ms", "mean"), "{:.2f}"),
        ("guidellm TPOT mean (ms) [e2e / tokens]", ("guidellm_tpot_ms", "mean"), "{:.2f}"),
        ("e2e mean (ms)", ("e2e_ms", "mean"), "{:.0f}"), ("throughput (req/s)", ("throughput_rps",), "{:.2f}"),
        ("output tokens/s", ("output_tokens_per_s",), "{:.0f}"),
        ("prompt tokens / request (engines' count)", ("engine", "mean_prompt_tokens"), "{:.1f}"),
        ("send lag mean (ms) [due -> sent]", ("send_lag_ms", "mean"), "{:.1f}"),
        ("send lag p99 (ms)", ("send_lag_ms", "p99"), "{:.1f}"),
        ("completed", ("completed",), "{:.0f}"), ("errors", ("errors",), "{:.0f}"))


def table(columns: dict[str, list[dict[str, Any]]]) -> str:
    names = list(columns)
    width = max(len(r[0]) for r in ROWS)
    lines = [f"{'':{width}s} " + " ".join(f"{n:>24s}" for n in names)]
    for label, path, fmt in ROWS:
        cells = []
        for n in names:
            runs = columns[n]
            v = mean_of(runs, *path)
            cell = fmt.format(v) if math.isfinite(v) else "-"
            vals = [mean_of([r], *path) for r in runs]
            vals = [x for x in vals if math.isfinite(x)]
            if len(vals) > 1:
                cell += f" ({fmt.format(min(vals))}-{fmt.format(max(vals))})"
            cells.append(f"{cell:>24s}")
        lines.append(f"{label:{width}s} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second, both clients (open loop)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--prompt-tokens", type=int, default=500)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (isthmus bench, guidellm), alternating")
    ap.add_argument("--streams", type=int, default=4,
                    help="also run guidellm's closed-loop concurrent profile with this many streams (0: skip)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="the engine doubles' (1: an A100 in real time)")
    ap.add_argument("--policy", default="least_load", help="isthmus serve's policy")
    ap.add_argument("--seed", type=int, default=0, help="seed of the isthmus bench prompts")
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "isthmus-bench-guidellm",
                    help="guidellm's virtual environment (created and filled with pip when missing)")
    ap.add_argument("--tokenizer-dir", type=Path, default=None,
                    help="the local tokenizer directory (built when missing; default: VENV/tiny-tokenizer)")
    ap.add_argument("--guidellm-timeout", type=float, default=600.0, help="seconds one guidellm run may take")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = ap.parse_args()
    if not (args.rate > 0 and args.requests > 0):
        ap.error("--rate and --requests must be > 0")

    print(f"guidellm venv {args.venv} ...", flush=True)
    exe = ensure_guidellm(args.venv)
    tok = ensure_tokenizer(args.venv, args.tokenizer_dir or args.venv / "tiny-tokenizer")
    versions = {"guidellm": package_version(args.venv / "bin" / "python", "guidellm"), "torch": package_version(args.venv / "bin" / "python", "torch"),
                "transformers": package_version(args.venv / "bin" / "python", "transformers"),
                "isthmus": subprocess.run([sys.executable, "-c", "import importlib.metadata as m; "
                                           "print(m.version('isthmus'))"], capture_output=True, text=True).stdout.strip()}
    prompts = make_prompts(args.venv, tok, args.requests, args.prompt_tokens, args.seed)
    columns: dict[str, list[dict[str, Any]]] = {"isthmus bench": [], "guidellm constant": []}
    load = {"before": os.getloadavg()}
    with sigterm_raises(), tempfile.TemporaryDirectory(prefix="isthmus-guidellm-") as tmp, Procs() as procs:
        work = Path(tmp)
        engines = [start_engine(procs, work / f"engine{k}.log", tok, args.time_scale) for k in range(2)]
        url = start_router(procs, work, engines, tok, args.policy)
        warm_up(url)
        print(f"2 engine doubles {engines}, isthmus serve ({args.policy}) at {url}", flush=True)
        for rnd in range(args.repeats):
            for client in ("isthmus bench", "guidellm constant"):
                before = engine_counters(engines)
                print(f"[round {rnd + 1}/{args.repeats}] {client}: {args.requests} requests at {args.rate:g} req/s, "
                      f"{args.prompt_tokens} prompt / {args.output_tokens} output tokens ...", flush=True)
                if client == "isthmus bench":
                    r = run_isthmus_bench(url, prompts, args)
                else:
                    r = run_guidellm(procs, exe, tok, url, f"kind=constant,rate={args.rate:g}", args,
                                     work / f"guidellm-{rnd}.json", work / f"guidellm-{rnd}.log")
                r["engine"] = engine_view(before, engine_counters(engines))
                r["round"] = rnd
                columns[client].append(r)
                print(f"  TTFT mean {r['ttft_ms']['mean']:.1f} ms, inter-token {r['itl_ms']['mean']:.2f} ms, "
                      f"{r['throughput_rps']:.2f} req/s, errors {r['errors']}", flush=True)
        if args.streams > 0:
            name = f"guidellm concurrent {args.streams}"
            print(f"{name} (closed loop, for reference) ...", flush=True)
            before = engine_counters(engines)
            try:
                r = run_guidellm(procs, exe, tok, url, f"kind=concurrent,streams={args.streams}", args,
                                 work / "guidellm-concurrent.json", work / "guidellm-concurrent.log")
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # keep the constant-rate results
                print(f"  failed: {str(exc)[:500]}", flush=True)
            else:
                r["engine"] = engine_view(before, engine_counters(engines))
                columns[name] = [r]
    load["after"] = os.getloadavg()

    print(f"\n{args.requests} requests, {args.prompt_tokens} prompt / {args.output_tokens} output tokens, open loop at "
          f"{args.rate:g} req/s (guidellm concurrent: closed loop), 2 engine doubles (time scale "
          f"{args.time_scale:g}) behind isthmus serve ({args.policy}); mean of {args.repeats} run(s), (min-max); "
          f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after, {os.cpu_count()} cores")
    print(table(columns))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": settings, "versions": versions, "loadavg": load,
                                         "cores": os.cpu_count(), "runs": columns}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
