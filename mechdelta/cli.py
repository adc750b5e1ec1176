"""The ``mechdelta`` command line.

Exit codes: 0 success; 1 a mechdelta error (the message on stderr, one line, no traceback); 2 a
usage error (typer's); 130 interrupted (re-run the same command to resume a run).

``--quiet/-q`` silences progress output only: each distinct warning (e.g. a shift that is not
significant) is still printed, once per command, as one ``warning: Category: message`` line.
``run``, ``figures``, ``report`` and ``demo`` hold the run directory's lock while they write it: a
second command on the same directory exits 1 naming the process that holds it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mechdelta.explain._cli import explain_command
from mechdelta.zoo._cli import zoo_app

app = typer.Typer(
    name="mechdelta",
    help="Comparative mechanistic interpretability: why did the model change?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: typer's rich panels show every flag (even --help) as taking a "<bool>" value
    rich_markup_mode=None,
)

_SHOWN: set[tuple[str, str]] = set()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """One line per warning, each distinct (category, message) once per command."""
    key = (category.__name__, str(message))
    if key in _SHOWN:
        return
    _SHOWN.add(key)
    print(f"warning: {category.__name__}: {message}", file=sys.stderr, flush=True)


@app.callback()
def _root() -> None:
    """mechdelta command line."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextlib.contextmanager
def _errors(resume_hint: str | None = None) -> Iterator[None]:
    """MechDeltaError -> its message on stderr and exit 1; Ctrl-C -> exit 130."""
    from mechdelta.errors import MechDeltaError

    try:
        yield
    except MechDeltaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted." + (f" {resume_hint}" if resume_hint else ""), err=True)
        raise typer.Exit(130) from None


def _summarise(run_dir: Path, top: int) -> list[str]:
    """The shift, the top sites of each sweep and each explanation's status of a stored run,
    as text."""
    from mechdelta.patching.results import BothDirections, SweepResult
    from mechdelta.report._build import NO_SITE_CHANGED, top_sites_table
    from mechdelta.runs.rundir import StoredRun

    run = StoredRun.open(run_dir)
    lines: list[str] = []
    shift_shown = False
    for spec in run.experiment.analyses:
        result = run.load(spec.id, verify=False)
        if spec.kind == "shift" and not shift_shown:
            lines.append(f"Shift: {result}")
            shift_shown = True
        if spec.kind == "explain":  # its status line, and where its audit report lies
            lines.append(f"{spec.id}: {str(result).splitlines()[0]}")
            shift_shown = True
            if "html" in result.reports:
                lines.append(f"  audit report: {os.fspath(result.reports['html'])}")
            continue
        parts = list(result) if isinstance(result, BothDirections) else [result]
        if spec.kind == "sweep" and all(isinstance(p, SweepResult) for p in parts):
            if not shift_shown:
                lines.append(f"Shift: {parts[0].shift}")
                shift_shown = True
            table = top_sites_table(result, top)
            if table.rows:
                lines += ["", f"Top sites of {spec.id} ({table.caption}):", table.text()]
            else:
                lines += ["", f"Top sites of {spec.id}: {NO_SITE_CHANGED}."]
    return lines


def _quote(*parts: str | Path) -> str:
    return " ".join(shlex.quote(os.fspath(p)) for p in parts)


_QUIET = typer.Option(
    "--quiet", "-q", help="No progress output (each distinct warning is still shown once)."
)


@app.command()
def run(
    experiment: Annotated[
        Path, typer.Argument(metavar="EXPERIMENT.toml", help="The experiment TOML file.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run directory (default: runs/<experiment name>)."),
    ] = None,
    quiet: Annotated[bool, _QUIET] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Recompute only the stored analyses whose files are damaged; keep the rest.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Delete the run directory's results and start the run over."
        ),
    ] = False,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            metavar="KIND",
            help="Where the patched forwards run: local (this process) or ray (a Ray cluster); "
            "overrides the experiment's [executor] kind.",
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            metavar="ADDRESS",
            help="Ray cluster to join: auto, or ray://HOST:10001 (default: a local cluster).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            metavar="N",
            min=1,
            help="Ray workers, each loading the pair once.",
            show_default=False,
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-worker",
            metavar="G",
            min=0.0,
            help="GPUs per Ray worker.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run an experiment into a run directory (re-run the same command to resume it).

    Finished shards are kept in RUN_DIR/shards (the experiment's [executor] shards = true, the
    default): a re-run, with any --executor, skips them and gives the same results.

    The directory is locked while the run writes it: a second run, `figures` or `report` on it
    exits 1 naming the process that holds it.
    """
    from mechdelta.runs._lock import run_lock
    from mechdelta.runs.experiment import Experiment
    from mechdelta.runs.run import run_experiment

    scale: list[str] = []  # the executor flags, repeated in the resume hint
    for flag, value in (
        ("--executor", executor),
        ("--address", address),
        ("--workers", workers),
        ("--gpus-per-worker", gpus_per_worker),
    ):
        scale += [] if value is None else [flag, str(value)]
    with _errors():
        exp = Experiment.load(experiment)
        spec = exp.executor.override(
            executor, address=address, num_workers=workers, gpus_per_worker=gpus_per_worker
        )
    out_dir = out if out is not None else Path("runs") / exp.name
    resume = "mechdelta run " + _quote(experiment, "--out", out_dir, *scale)
    flags = [f for f, on in (("--repair", repair), ("--overwrite", overwrite)) if on]
    command = "mechdelta run " + _quote(experiment, "--out", out_dir, *flags, *scale)
    hint = f"Re-run the same command to resume (complete analyses and shards are kept): {resume}"
    # the lock is held until the summary is read back
    with _errors(hint), run_lock(out_dir, command, create=True):
        result = run_experiment(
            experiment,
            out_dir,
            quiet=quiet,
            overwrite=overwrite,
            repair=repair,
            executor=spec,
        )
        lines = _summarise(out_dir, min(5, exp.output.top_k))
    typer.echo("\n".join(lines))
    typer.echo(f"\nRun directory: {os.fspath(out_dir)} ({result.counts()})")
    typer.echo(f"Next: mechdelta report {_quote(out_dir)}")


@app.command()
def figures(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="A run directory written by `mechdelta run`.")
    ],
    format: Annotated[
        list[str] | None,
        typer.Option("--format", "-f", help="Formats (repeatable; default: the run's own)."),
    ] = None,
    quiet: Annotated[bool, _QUIET] = False,
) -> None:
    """Rebuild every figure of a run from its stored results (no model is loaded)."""
    from mechdelta.runs.run import regenerate_figures

    with _errors():
        written = regenerate_figures(
            run_dir, formats=tuple(format) if format else None, quiet=quiet
        )
    n = sum(len(v) for v in written.values())
    typer.echo(f"Wrote {n} files for {len(written)} figures in {os.fspath(run_dir / 'figures')}")


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="A run directory written by `mechdelta run`.")
    ],
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            metavar="LEVEL",
            help="Level of the report's claims: a site is claimed when its adjusted p-value "
            "q < LEVEL (default: the run's [run] alpha, 0.05 unless set).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write the run's transition report (report.md and a self-contained report.html).

    Each analysis section shows its warranted claims at --alpha and the split-half reliability
    of its site ranking; the summary states only warranted claims. An interrupted run gets no
    report: the command exits 1 and names the `mechdelta run` command that finishes it.
    """
    from mechdelta.report._build import write_report

    with _errors():
        md, html = write_report(run_dir, alpha=alpha)
    typer.echo(f"Report: {os.fspath(html)}\nMarkdown: {os.fspath(md)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to (re)write.")] = Path(
        "runs/demo"
    ),
    quiet: Annotated[bool, _QUIET] = False,
) -> None:
    """Where did the `induction` zoo pair's behaviour shift? Shift, head sweep, report."""
    from mechdelta.report._build import write_report
    from mechdelta.runs._lock import run_lock
    from mechdelta.runs.experiment import Experiment
    from mechdelta.runs.run import run_experiment
    from mechdelta.runs.rundir import StoredRun

    with _errors(), run_lock(out, "mechdelta demo --out " + _quote(out), create=True):
        exp = Experiment.packaged("demo")
        result = run_experiment(exp, out, quiet=quiet, overwrite=True)
        md, html = write_report(out)
        models = StoredRun.open(out).manifest["models"]
        lines = [
            f"mechdelta demo: the {exp.pair.zoo!r} zoo pair",
            f"  reference   {models['reference']['name']}  [{models['reference']['weights_hash']}]",
            f"  intervened  {models['intervened']['name']}  [{models['intervened']['weights_hash']}]",
            *_summarise(out, exp.output.top_k),
        ]
    typer.echo("\n".join(lines))
    typer.echo(f"\nRun directory: {os.fspath(out)} ({len(result.computed)} analyses)")
    typer.echo(f"Report: {os.fspath(html)} (Markdown: {os.fspath(md)})")


@app.command()
def version() -> None:
    """Print mechdelta's version."""
    from mechdelta import __version__

    typer.echo(__version__)


app.command("explain")(explain_command)
app.add_typer(zoo_app, name="zoo")


def main() -> None:
    warnings.showwarning = _show_warning  # one line per warning, no source excerpt
    app()
