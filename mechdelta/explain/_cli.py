"""``mechdelta explain``: the Δ-XAI pipeline from the command line (:func:`explain_command`)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from mechdelta.errors import ConfigError

__all__ = ["explain_command", "read_task"]


def read_task(path: Path) -> Any:
    """A :class:`~mechdelta.Task` from a TOML file: a ``[task]`` table (as in experiment files)
    or the same keys at the top level (``prompts``, ``answers``, ``wrong``, ``corrupted``,
    ``metric``, ``prepend_bos``, ``name``)."""
    from mechdelta.runs.experiment import TaskSpec

    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the task file {os.fspath(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)!r} is not valid TOML: {exc}") from None
    table = data.get("task", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{os.fspath(path)!r}: [task] must be a table")
    return TaskSpec.from_dict(table).build()


def explain_command(
    reference: Annotated[
        str | None, typer.Argument(help="Reference checkpoint: a local directory or a hub name.")
    ] = None,
    intervened: Annotated[
        str | None, typer.Argument(help="Intervened checkpoint: a local directory or a hub name.")
    ] = None,
    task: Annotated[
        Path | None, typer.Option("--task", "-t", help="Task TOML ([task] table or its keys).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
        "runs/explain"
    ),
    zoo: Annotated[
        str | None, typer.Option("--zoo", help="Use a zoo pair (and its task) instead.")
    ] = None,
    budget: Annotated[str, typer.Option(help="auto | exact | attribution | N sites.")] = "auto",
    alpha: Annotated[float, typer.Option(help="Level of the claims.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of every bootstrap and test.")] = 0,
    kind: Annotated[str, typer.Option("--kind", help="Declared: the intervention's type.")] = "",
    description: Annotated[str, typer.Option(help="Declared: what was done.")] = "",
    data: Annotated[str, typer.Option(help="Declared: the data it used.")] = "",
    date: Annotated[str, typer.Option(help="Declared: when.")] = "",
    owner: Annotated[str, typer.Option(help="Declared: who is responsible.")] = "",
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="Print report.pdf.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an out directory of another pair/task/parameters.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, ...")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Explain why the intervened checkpoint behaves differently: shift, weights, representation
    screen, cross-model patching in both directions, steering, warranted claims, and a transition
    report (report.md / .html / .json / .pdf in --out). Re-running the same command resumes."""
    from mechdelta.cli import _errors, _quote
    from mechdelta.explain.pipeline import explain

    hint = "Re-run the same command to resume: " + _quote("mechdelta", "explain", "--out", out)
    with _errors(hint):
        pair, the_task = _pair_and_task(reference, intervened, task, zoo, device, dtype)
        b: str | int = int(budget) if budget.strip().isdigit() else budget
        result = explain(
            pair,
            the_task,
            out=out,
            budget=b,
            alpha=alpha,
            seed=seed,
            intervention={"kind": kind, "description": description, "data": data, "date": date,
                          "owner": owner},
            pdf=pdf,
            overwrite=overwrite,
            progress=False if quiet else None,
        )  # fmt: skip
    typer.echo(str(result))


def _pair_and_task(
    reference: str | None,
    intervened: str | None,
    task: Path | None,
    zoo: str | None,
    device: str | None,
    dtype: str | None,
) -> tuple[Any, Any]:
    if zoo is not None:
        if reference is not None or intervened is not None:
            raise ConfigError("give either --zoo NAME or REFERENCE INTERVENED, not both")
        from mechdelta import zoo as zoo_mod

        entry = zoo_mod.load(zoo)
        return entry.pair, read_task(task) if task is not None else entry.task
    if reference is None or intervened is None:
        raise ConfigError(
            "name both checkpoints (mechdelta explain REFERENCE INTERVENED --task task.toml) or "
            "a zoo pair (--zoo planted)"
        )
    if task is None:
        raise ConfigError("checkpoints need a task: --task task.toml (a [task] table)")
    from mechdelta.core.pair import ModelPair

    the_task = read_task(task)
    return ModelPair.load(reference, intervened, device=device, dtype=dtype), the_task
