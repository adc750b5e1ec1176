"""``mechdelta zoo list / card / build`` through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mechdelta import zoo
from mechdelta.cli import app

runner = CliRunner()


def test_zoo_list():
    result = runner.invoke(app, ["zoo", "list"])
    assert result.exit_code == 0, result.output
    for name in zoo.names():
        assert name in result.output
        assert zoo.describe(name) in result.output


def test_zoo_card():
    result = runner.invoke(app, ["zoo", "card", "induction"])
    assert result.exit_code == 0, result.output
    assert "# zoo: induction" in result.output and "## Ground truth" in result.output


def test_zoo_build_tiny_planted(tmp_path):
    out = tmp_path / "planted"
    result = runner.invoke(
        app, ["zoo", "build", "planted", "--steps", "3", "--seed", "2", "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "card.json", "reference.safetensors", "intervened.safetensors"} <= names
    card = json.loads((out / "card.json").read_text())
    assert card["seed"] == 2
    entry = zoo.load("planted", path=out)
    assert entry.card.steps["planted fine-tune"] == 3
    assert entry.ground_truth == zoo.load("planted").ground_truth
    # the shipped package data is untouched
    assert zoo.load("planted").card.steps["planted fine-tune"] == 600


def test_zoo_build_tiny_induction(tmp_path):
    out = tmp_path / "induction"
    args = ["zoo", "build", "induction", "--steps", "6", "--reference-steps", "2"]
    result = runner.invoke(app, [*args, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    entry = zoo.load("induction", path=out)
    assert entry.card.steps == {"training": 6}
    assert entry.card.measurements["reference_step"] == 2
    assert entry.ground_truth is None  # far too short for induction heads to form
    assert "too short" in entry.ground_truth_reason


def test_zoo_build_errors(tmp_path):
    result = runner.invoke(app, ["zoo", "build", "nope", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 1
    assert "unknown zoo entry 'nope'" in result.output
    bad = ["zoo", "build", "induction", "--steps", "4", "--reference-steps", "4"]
    result = runner.invoke(app, [*bad, "--out", str(tmp_path / "x"), "-q"])
    assert result.exit_code == 1
    assert "reference_steps" in result.output


def test_zoo_build_induction_series(tmp_path):
    from mechdelta.zoo.series import load_series

    out = tmp_path / "series"
    args = ["zoo", "build", "induction", "--series", "--steps", "3", "--out", str(out), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "steps 0, 3" in result.output
    series = load_series(out)
    assert series.labels == (0, 3)
    result = runner.invoke(app, ["zoo", "build", "planted", "--series", "--out", str(out), "-q"])
    assert result.exit_code == 1 and "induction entry only" in result.output
