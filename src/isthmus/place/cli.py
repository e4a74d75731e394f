"""``isthmus place CONFIG.yaml``: block placement and routing for pipelined inference, compared.

Exit codes: 0 done (an algorithm without a solution, or a MILP stopped by its time limit, is a
result: reported in the tables and the JSON); 2 bad input (config, option, no solver or plotting
library; one line on stderr, nothing written); 1 an output file that cannot be written.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

EXIT_ERROR = 2
EXIT_IO = 1


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _solver_chatter_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 (HiGHS prints diagnostics there) to stderr
    while the algorithms run, so that stdout holds only the tables."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def place(
    config: Annotated[Path, typer.Argument(help="Placement config (YAML); see scenarios/place/.", show_default=False)],
    algorithm: Annotated[str | None, typer.Option(
        metavar="A1,A2,...", help="Comma-separated algorithms: petals, cg_bprr, cg_bprr_ls, milp, milp_cg "
                                  "(default: the config's list).")] = None,
    seed: Annotated[int | None, typer.Option(
        min=0, help="Seed of the arrivals and of PETALS' join order (default: the config's).")] = None,
    milp_time_limit: Annotated[float | None, typer.Option(
        "--milp-time-limit", metavar="S", help="HiGHS time limit in seconds (default: the config's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(metavar="FILE.png", help="Write the block-coverage picture.")] = None,
) -> None:
    """Place model blocks on servers and route sessions through them, for each algorithm.

    For PETALS' own rule, CG-BPRR (Sun et al., arXiv 2512.21884), CG-BPRR with a local search and
    the MILP (HiGHS): the placement (server -> blocks), the chains of the provisioned concurrent
    sessions, the model's predicted time per token, and a simulation of the config's Poisson
    sessions (WS-RR routing, PETALS' back-off on full caches): time per token and first-token time.
    """
    from rich.console import Console

    from isthmus.core.errors import IsthmusError
    from isthmus.place.config import ALGORITHMS, load_config
    from isthmus.place.report import (
        comparison_table,
        detail_lines,
        header_line,
        placement_table,
        run_document,
        write_json,
    )
    from isthmus.place.run import AlgorithmRun, run_setup

    names = None
    if algorithm is not None:
        names = [a.strip() for a in algorithm.split(",") if a.strip()]
        if not names:
            raise _fail("--algorithm: no algorithm named")
        for a in names:
            if a not in ALGORITHMS:
                raise _fail(f"--algorithm: unknown algorithm {a!r}; algorithms: {', '.join(ALGORITHMS)}")
    if milp_time_limit is not None and not (0 < milp_time_limit < float("inf")):
        raise _fail(f"--milp-time-limit must be a number > 0, got {milp_time_limit}")
    out, err = Console(), Console(stderr=True)
    if not out.is_terminal:  # files and pipes get the whole table, not 80 columns
        out = Console(width=160)
    try:
        setup = load_config(config)
        chosen = names if names is not None else list(setup.config.algorithms)
        if any(a.startswith("milp") for a in chosen):
            try:
                from scipy.optimize import milp  # noqa: F401
            except ImportError:
                raise _fail("the MILP needs scipy (HiGHS): pip install scipy, "
                            "or leave milp out of --algorithm") from None
        if plot is not None:
            from isthmus.place.plot import require_matplotlib

            require_matplotlib()
        if milp_time_limit is not None:
            cfg = setup.config
            limit = cfg.milp.model_copy(update={"time_limit_s": milp_time_limit})
            setup = dataclasses.replace(setup, config=cfg.model_copy(update={"milp": limit}))

        def progress(res: AlgorithmRun) -> None:
            err.print(f"{res.name}: {res.status} in {res.wall_s:.2f} s", highlight=False)

        with _solver_chatter_to_stderr():
            run = run_setup(setup, chosen, seed, on_done=progress)
    except IsthmusError as exc:
        raise _fail(str(exc)) from None
    out.print(header_line(run), highlight=False, soft_wrap=True)
    for res in run.results:
        if res.placement is not None:
            out.print(placement_table(run, res))
        for line in detail_lines(res):
            out.print(f"  {line}", highlight=False, soft_wrap=True)
    out.print(comparison_table(run))
    try:
        if json_out is not None:
            write_json(json_out, run_document(run))
            err.print(f"wrote {json_out}", highlight=False)
        if plot is not None:
            from isthmus.place.plot import plot_coverage

            plot_coverage(run, plot)
            err.print(f"wrote {plot}", highlight=False)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise _fail(f"cannot write{where}: {exc.strerror or exc}", EXIT_IO) from None
