"""``mechdelta zoo``: list the zoo's entries, show a card, rebuild an entry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechdelta.errors import MechDeltaError

zoo_app = typer.Typer(
    name="zoo",
    help="The offline model zoo: reference/intervened pairs with known ground truth.",
    no_args_is_help=True,
    add_completion=False,
)


@zoo_app.command("list")
def list_entries() -> None:
    """List the zoo's entries with one-line descriptions."""
    from mechdelta.zoo import describe, names

    width = max(len(n) for n in names())
    for name in names():
        typer.echo(f"{name:<{width}}  {describe(name)}")


@zoo_app.command("card")
def card(name: Annotated[str, typer.Argument(help="Entry name.")]) -> None:
    """Print a shipped entry's card (how it was trained, its behaviour, its ground truth)."""
    from mechdelta.zoo import data_dir
    from mechdelta.zoo._entry import read_card

    try:
        typer.echo(read_card(data_dir(name)).to_markdown())
    except MechDeltaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@zoo_app.command("build")
def build(
    name: Annotated[str, typer.Argument(help="Entry name (see `mechdelta zoo list`).")],
    steps: Annotated[
        int | None,
        typer.Option(help="Main stage's training steps (default: the shipped entry's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Build seed.")] = 0,
    reference_steps: Annotated[
        int | None,
        typer.Option(
            help="induction: the reference checkpoint's step; planted/null/finetune: retrain "
            "the recall reference from scratch for this many steps."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default: ~/.cache/mechdelta/zoo/NAME)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    series: Annotated[
        bool,
        typer.Option(
            "--series",
            help="induction only: the training series (checkpoints across the phase change, "
            "load with mechdelta.zoo.series.load_series(path)) instead of the pair.",
        ),
    ] = False,
) -> None:
    """Regenerate an entry by training it (deterministic under --seed on CPU)."""
    from mechdelta.zoo._registry import build as build_entry
    from mechdelta.zoo._registry import default_out

    if series:
        _build_series(name, out, steps=steps, seed=seed, progress=not quiet)
        return
    try:
        target = out if out is not None else default_out(name)
        entry = build_entry(
            name,
            target,
            steps=steps,
            seed=seed,
            reference_steps=reference_steps,
            progress=not quiet,
        )
    except MechDeltaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {target}")
    for b in entry.card.behaviours:
        typer.echo(f"  {b.line()}")
    typer.echo(f"load it with mechdelta.zoo.load({name!r}, path={str(target)!r})")


def _build_series(
    name: str, out: Path | None, *, steps: int | None, seed: int, progress: bool
) -> None:
    """The induction training series; ``steps``: train that long, keeping the default
    checkpoints before it and one at the end."""
    from mechdelta.zoo._registry import default_out
    from mechdelta.zoo.series import STEPS, build_series

    if name != "induction":
        typer.echo(f"error: --series exists for the induction entry only, not {name!r}", err=True)
        raise typer.Exit(1)
    target = out if out is not None else default_out(name).with_name("induction_series")
    chosen = STEPS if steps is None else (*(s for s in STEPS if s < steps), steps)
    try:
        build_series(target, steps=chosen, seed=seed, progress=progress)
    except MechDeltaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {target} (steps {', '.join(str(s) for s in chosen)})")
    typer.echo(f"load it with mechdelta.zoo.series.load_series({str(target)!r})")
