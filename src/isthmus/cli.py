"""The ``isthmus`` command line. Thin: parsing and printing here, the work in the packages.

Exit codes: 0 success; 2 a usage error, an invalid scenario, an unknown policy or any other
:class:`~isthmus.core.errors.IsthmusError` (one line on stderr, no traceback); 1 an output file
that cannot be written; 3 a sweep in which some cells failed (the others' results are still
written); otherwise what the subcommand returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from isthmus.core.errors import IsthmusError

EXIT_ERROR = 2
EXIT_IO = 1
EXIT_CELLS_FAILED = 3

T = TypeVar("T")


def build_app() -> typer.Typer:
    """The command tree: ``simulate``, ``sweep``, ``validate``, ``emulate``, ``serve``, ``testbed``, ``bench`` and
    ``compare``."""
    app = typer.Typer(
        help="Route LLM inference across regions: simulate routing policies on real traces, validate the engine model, "
             "serve, emulate, and measure on a local multi-region testbed.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.command()(simulate)
    app.command()(sweep)
    app.command()(validate)
    app.command()(train)
    # the live faces: their command functions live beside their packages and import their
    # server dependencies only when run
    from isthmus.bench.bench_cli import bench
    from isthmus.bench.compare_cli import compare
    from isthmus.bench.testbed_cli import testbed
    from isthmus.emulator.cli import emulate
    from isthmus.place.cli import place
    from isthmus.router.cli import serve

    app.command()(emulate)
    app.command()(serve)
    app.command()(testbed)
    app.command()(bench)
    app.command()(compare)
    app.command()(place)
    return app


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn expected errors into one line on stderr and an exit code."""
    try:
        yield
    except IsthmusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(f"error: cannot write{where}: {exc.strerror or exc}", err=True)
        raise typer.Exit(EXIT_IO) from None


def simulate(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML).", show_default=False)],
    policy: Annotated[str | None, typer.Option(
        help="Comma-separated policies to run (default: the scenario's list).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed (default: the scenario's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(metavar="FILE.png", help="Write TTFT CDFs, one line per policy.")] = None,
    timing: Annotated[bool, typer.Option(
        help="Add wall-clock figures to the JSON under 'timing' (the file then differs between runs).")] = False,
) -> None:
    """Compare routing policies on a scenario.

    Replays the scenario's workload once per policy (same arrivals for each), prints a table per
    policy and a comparison, and optionally writes the JSON report and a TTFT CDF plot.
    """
    from isthmus.sim.report import (
        build_report,
        comparison_table,
        policy_table,
        progress_bar,
        result_record,
        write_report,
    )
    from isthmus.sim.scenario import load_scenario

    out, err = Console(), Console(stderr=True)
    with _clean_errors():
        sc = load_scenario(scenario)
        if policy is None:
            labels = [p.key for p in sc.config.policies]
        else:
            labels = [p.strip() for p in policy.split(",") if p.strip()]
        if not labels:
            raise typer.BadParameter("no policy named", param_hint="--policy")
        run_seed = sc.config.seed if seed is None else seed
        for label in labels:  # fail on an unknown policy before spending time on the others
            sc.make_policy(label, run_seed)
        if plot is not None:
            from isthmus.sim.plot import require_matplotlib

            require_matplotlib()

        records: list[dict[str, Any]] = []
        ttfts = []
        times: dict[str, dict[str, float]] = {}
        total: int | None = None
        for label in labels:
            with progress_bar(err, label, total) as update:
                result = sc.run(label, run_seed, progress=update)
            total = result.requests
            rec = result_record(label, result.summary())
            records.append(rec)
            ttfts.append((label, result.ttft_s))
            eps = result.events / result.wall_s if result.wall_s > 0 else float("nan")
            times[label] = {"wall_s": result.wall_s, "events": float(result.events), "events_per_s": eps}
            err.print(f"{label}: {result.requests:,} requests, {result.events:,} events in {result.wall_s:.2f} s "
                      f"({eps:,.0f} events/s)", highlight=False)
            out.print(policy_table(rec))
        if len(records) > 1:
            out.print(comparison_table(records, width=out.width))
        if json_out is not None:
            write_report(json_out, build_report(sc.name, run_seed, records, times if timing else None))
            err.print(f"wrote {json_out}", highlight=False)
        if plot is not None:
            from isthmus.sim.plot import plot_ttft_cdf

            plot_ttft_cdf(ttfts, plot, title=f"{sc.name}: TTFT CDF (seed {run_seed})")
            err.print(f"wrote {plot}", highlight=False)


def _csv(text: str | None, convert: Callable[[str], T], option: str) -> list[T] | None:
    """``"a,b,c"`` -> converted values; ``None`` stays ``None``; a bad item is a usage error."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise typer.BadParameter("no value given", param_hint=option)
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {getattr(convert, '__name__', 'value')}s, got {text!r}",
                                 param_hint=option) from None


def sweep(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML).", show_default=False)],
    policy: Annotated[str | None, typer.Option(
        help="Comma-separated policies (default: the scenario's list).")] = None,
    rates: Annotated[str | None, typer.Option(
        metavar="R1,R2,...", help="Mean request rates, req/s; each replaces the workload's rate_rps "
                                  "(default: the scenario's own rate).")] = None,
    rtt_scale: Annotated[str | None, typer.Option(
        "--rtt-scale", metavar="S1,S2,...", help="Factors on every RTT (default: 1).")] = None,
    seeds: Annotated[str | None, typer.Option(
        metavar="N1,N2,...", help="Seeds (default: the scenario's).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Local worker processes (default: one per CPU; 1 runs in this process).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        metavar="ADDR", help="Run the cells on this Ray cluster ('auto', 'ray://host:10001', 'local'); "
                             "needs the ray extra.")] = None,
    baseline: Annotated[str, typer.Option(
        help="Policy the winner plot compares the network-aware ones with.")] = "least_load",
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write every cell as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(
        metavar="FILE.png", help="Write TTFT against load (FILE.png) and the winner map (FILE_winners.png).")] = None,
) -> None:
    """Run a scenario over a grid of policies x rates x RTT scales x seeds.

    Each cell is one deterministic simulation; cells run in parallel (processes, or Ray) and are
    reported in grid order, so the JSON is the same whatever the number of workers. A failing cell
    is recorded with its error and the sweep goes on; the exit code is then 3.
    """
    from isthmus.sim.report import progress_bar, sweep_table, write_report
    from isthmus.sim.scenario import load_scenario
    from isthmus.sim.sweep import SweepGrid, aggregate, network_aware_labels, run_sweep

    out, err = Console(), Console(stderr=True)
    with _clean_errors():
        sc = load_scenario(scenario)
        labels = [p.key for p in sc.config.policies] if policy is None else _csv(policy, str, "--policy")
        assert labels is not None
        rate_list = _csv(rates, float, "--rates")
        scale_list = _csv(rtt_scale, float, "--rtt-scale") or [1.0]
        seed_list = _csv(seeds, int, "--seeds") or [sc.config.seed]
        grid = SweepGrid(policies=tuple(labels), rates_rps=tuple(rate_list) if rate_list else (None,),
                         rtt_scales=tuple(scale_list), seeds=tuple(seed_list))
        if plot is not None:
            from isthmus.sim.plot import require_matplotlib

            require_matplotlib()
        total = len(grid.cells())
        done = 0
        with progress_bar(err, f"{sc.name}: {total} cells", total) as update:

            def on_done(rec: dict[str, Any]) -> None:
                nonlocal done
                done += 1
                update(done)
                if "error" in rec:
                    err.print(f"cell failed: policy={rec['policy']} rate={rec['rate_rps']:g} "
                              f"rtt_scale={rec['rtt_scale']:g} seed={rec['seed']}: {rec['error']}",
                              highlight=False, markup=False, soft_wrap=True)

            result = run_sweep(sc, grid, workers=workers, ray_address=ray_address, on_done=on_done)
        out.print(sweep_table(result.records))
        if json_out is not None:
            write_report(json_out, result.document())
            err.print(f"wrote {json_out}", highlight=False)
        if plot is not None:
            from isthmus.sim.plot import plot_sweep

            aware = network_aware_labels(sc, grid.policies)
            paths = plot_sweep(aggregate(result.records), plot, baseline=baseline, aware=aware,
                               title=f"{sc.name}: {len(grid.seeds)} seed(s)")
            err.print(f"wrote {paths[0]} and {paths[1]}", highlight=False)
        if result.failed:
            err.print(f"{result.failed} of {total} cells failed", highlight=False)
            raise typer.Exit(EXIT_CELLS_FAILED)


def validate(
    ground_truth_dir: Annotated[Path, typer.Argument(
                                                     help="A real engine run (meta.json, requests.jsonl).")],
    workload: Annotated[Path | None, typer.Option(metavar="FILE", help="The workload it replayed.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the errors as JSON.")] = None,
    perf: Annotated[str, typer.Option(
        help="Step-time model: 'table' (the GPU's per-layer profile) or 'roofline' (the built-in one).")] = "table",
) -> None:
    """Check the engine model against a real vLLM run.

    Replays the run's workload through the simulated engine and reports the error on TTFT, TPOT
    and end-to-end latency.
    """
    from isthmus.validate import main as validate_main

    if perf not in ("table", "roofline"):
        typer.echo(f"error: --perf must be 'table' or 'roofline', got {perf!r}", err=True)
        raise typer.Exit(2)
    with _clean_errors():
        code = validate_main(ground_truth_dir, workload, json_out, perf=perf)  # type: ignore[arg-type]
    raise typer.Exit(code)


def train(
    state: Annotated[Path, typer.Argument(help="A learned policy's state file (the router's policy.state_file).",
                                          show_default=False)],
    out: Annotated[Path | None, typer.Option(metavar="FILE", help="Write the trained state here (default: in place).")]
    = None,
    params: Annotated[str, typer.Option(help="The policy's params as JSON, e.g. '{\"epochs\": 50}'.")] = "{}",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the fit.")] = 0,
) -> None:
    """Fit a lodestar model offline from the samples a router recorded, and write it back.

    The state file holds the policy's training samples (features at decision time, measured TTFT)
    and its current model; the router reads it at start, so a model trained here is used by the
    next 'isthmus serve' with that policy.state_file.
    """
    import json

    import numpy as np

    from isthmus.core.errors import ConfigError
    from isthmus.policies.lodestar import TrainingSet, make_lodestar

    with _clean_errors():
        try:
            given = json.loads(params)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--params: not JSON: {exc}") from None
        if not isinstance(given, dict):
            raise ConfigError("--params: expected a JSON object")
        try:
            policy = make_lodestar({**given, "training": "external"}, np.random.default_rng(seed))
        except ValueError as exc:
            raise ConfigError(f"--params: {exc}") from None
        try:
            policy.load_state_bytes(state.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{state}: cannot read: {exc.strerror or exc}") from None
        except Exception as exc:  # not a state file: numpy / zip / key errors
            raise ConfigError(f"{state}: not a lodestar state file ({type(exc).__name__}: {exc})") from None
        data = policy.training_data()
        if len(data.y) == 0:
            raise ConfigError(f"{state}: holds no training samples")
        fitted = policy.new_trainer().fit(TrainingSet(data.x, data.y, data.samples_seen, seed))
        policy.install(fitted)
        target = out if out is not None else state
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(policy.state_bytes())
        tmp.replace(target)
        typer.echo(f"trained on {len(data.y)} samples ({data.samples_seen} seen); wrote {target}", err=True)


def main() -> None:
    """Console entry point (``isthmus``)."""
    build_app()()


if __name__ == "__main__":
    main()
