"""``isthmus testbed SCENARIO.yaml``: a multi-region testbed on this machine until Ctrl-C.

Exit codes: 0 after Ctrl-C / SIGTERM (everything stopped); 2 a bad scenario, policy or option (one
line on stderr); 1 the testbed failed to start or a child died while it ran (everything stopped).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_CONFIG = 2
EXIT_FAILED = 1


def testbed(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML), as for 'isthmus simulate'.",
                                             show_default=False)],
    policy: Annotated[str | None, typer.Option(
        help="A policy label of the scenario, or any registered policy (default: the scenario's first).")] = None,
    time_scale: Annotated[float, typer.Option(
        help="Wall seconds per modelled second, for engines and network alike (0.1: 10x faster).")] = 1.0,
    manifest: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Also write the manifest (where everything listens) here, e.g. out/testbed.json.")] = None,
    logs: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Run directory for every child's log, the router configs and manifest.json "
                            "(default: a new temporary directory).")] = None,
    router: Annotated[str, typer.Option(
        help="'isthmus' (isthmus serve) or 'external' (--router-cmd, proxy mode only).")] = "isthmus",
    router_cmd: Annotated[str | None, typer.Option(
        help="External router command with {host}, {port} and {workers} (space-separated replica URLs), e.g. "
             "'vllm-router --host {host} --port {port} --worker-urls {workers} --policy round_robin'.")] = None,
    jitter_ms: Annotated[float, typer.Option(
        min=0.0, help="Mean exponential jitter per chunk on every relay, modelled ms.")] = 0.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="The 'model' clients send (default: the first replica's model profile).")] = None,
    measure_rtt: Annotated[bool, typer.Option(
        "--measure-rtt/--no-measure-rtt",
        help="Let the routers probe RTTs through the relays instead of trusting the scaled topology.")] = False,
    startup_timeout: Annotated[float, typer.Option(min=1.0, help="Seconds to wait for everything to be healthy.")] = 60.0,
) -> None:
    """Start a multi-region testbed from a scenario: emulated engines, delay relays, routers.

    One 'isthmus emulate' per replica, one router (proxy mode) or one per region (regional mode),
    and TCP relays that delay every client -> router, router -> peer and router -> replica connection
    by the scenario's one-way latency times --time-scale. Prints where everything listens, writes the
    manifest, and runs until Ctrl-C or SIGTERM. Clients in region R send to the entry URL of R with
    header 'x-isthmus-origin: R'.
    """
    from rich.console import Console

    from isthmus.bench.testbed import Testbed, TestbedError, sigterm_raises
    from isthmus.core.errors import IsthmusError

    err = Console(stderr=True)
    if router not in ("isthmus", "external"):
        typer.echo(f"error: --router: expected 'isthmus' or 'external', got {router!r}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if router == "external" and not router_cmd:
        typer.echo("error: --router external needs --router-cmd", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if router_cmd and router != "external":
        typer.echo("error: --router-cmd needs --router external", err=True)
        raise typer.Exit(EXIT_CONFIG)
    with sigterm_raises():
        try:
            tb = Testbed(scenario, policy, time_scale=time_scale, log_dir=logs, served_model_name=served_model_name,
                         jitter_ms=jitter_ms, router="external" if router == "external" else "isthmus",
                         router_cmd=router_cmd, measure_rtt=measure_rtt, startup_timeout_s=startup_timeout)
        except IsthmusError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        code = 0
        try:
            err.print(f"starting testbed {tb.scenario.name} / {tb.policy} ({tb.mode}, time scale {tb.time_scale:g}); "
                      f"logs in {tb.log_dir}", highlight=False)
            data = tb.start()
            if manifest is not None:
                tb.write_manifest(manifest)
            Console().print(_tables(data))
            if manifest is not None:
                err.print(f"wrote {manifest}", highlight=False)
            err.print("running; Ctrl-C or SIGTERM stops everything", highlight=False)
            while True:
                time.sleep(0.5)
                failed = tb.failed()
                if failed:
                    err.print(f"error: {', '.join(failed)} exited; logs in {tb.log_dir}", highlight=False)
                    code = EXIT_FAILED
                    break
        except KeyboardInterrupt:
            err.print("stopping", highlight=False)
        except TestbedError as exc:
            typer.echo(f"error: {exc}", err=True)
            code = EXIT_FAILED
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            typer.echo(f"error: cannot write{where}: {exc.strerror or exc}", err=True)
            code = EXIT_FAILED
        finally:
            tb.stop()
    if code:
        raise typer.Exit(code)


def _tables(m: dict[str, Any]) -> Any:
    """Rich tables of the manifest: entries, routers and engines; then the relays."""
    from rich.console import Group
    from rich.table import Table

    url_col: dict[str, Any] = {"no_wrap": True, "min_width": 22}
    slo = m.get("slo")
    slo_note = (f"; SLO class C in header {slo['header']}: C (classes: {', '.join(slo['classes'])})"
                if isinstance(slo, dict) else "")
    t = Table(title=f"isthmus testbed: {m['scenario']} / {m['policy']} ({m['mode']}, time scale {m['time_scale']:g})",
              caption=f"clients in region R: POST <entry R>/v1/... with model {m['model']!r} and header "
                      f"{m['origin_header']}: R{slo_note}")
    t.add_column("what")
    t.add_column("region")
    t.add_column("id")
    t.add_column("url", **url_col)
    t.add_column("pid")
    for region, url in m["entry"].items():
        t.add_row("entry", region, "", url, "")
    for r in m["routers"]:
        t.add_row("router", r["region"], m["router"], r["url"], str(r["pid"]))
    for r in m["replicas"]:
        t.add_row("engine", r["region"], f"{r['id']} ({r['gpu']})", r["url"], str(r["pid"]))
    rt = Table(title=f"delay relays (pid {m.get('relay_pid', '?')})")
    rt.add_column("from -> to", no_wrap=True)
    rt.add_column("listens on", no_wrap=True)
    rt.add_column("upstream", no_wrap=True)
    rt.add_column("one-way ms", justify="right")
    for r in m["relays"]:
        rt.add_row(f"{r['from']} -> {r['to']}", r["listen"], r["upstream"] or "", f"{r['one_way_ms']:.2f}")
    return Group(t, rt)
