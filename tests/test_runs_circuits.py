"""Circuit analyses in experiments (``kind = "circuit"``): configuration and ids, stored circuits
equal to a direct :func:`~mechdelta.circuits.search_circuit` call, figures written and
regenerated identically, the report's circuit section, resume after an interruption."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta.circuits import Circuit, search_circuit
from mechdelta.errors import ConfigError
from mechdelta.patching.results import BothDirections
from mechdelta.report._build import write_report
from mechdelta.report._circuits import SEMANTICS_TEXT
from mechdelta.runs import run as runs
from mechdelta.runs.experiment import Experiment
from mechdelta.runs.run import regenerate_figures, run_experiment
from mechdelta.runs.rundir import StoredRun

GREEDY = "circuit-node-graft-greedy-i2r"
BOTH = "circuit-node-graft-attribution-both"
IDS = (GREEDY, BOTH)
ANALYSES: list[dict[str, Any]] = [
    {"kind": "circuit", "method": "greedy", "direction": "intervened->reference"},
    {"kind": "circuit", "direction": "both"},
]
N_PROMPTS = 8


@functools.cache
def _planted_task() -> dict[str, Any]:
    """The first prompts of the planted pair's trigger task, as an inline [task] table."""
    task = md.zoo.load("planted").task
    n = N_PROMPTS
    return {
        "prompts": task.prompts[:n].tolist(),
        "answers": task.answers[:n].tolist(),
        "wrong": task.wrong[:n].tolist(),
        "metric": "logit_diff",
        "name": "planted-trigger-8",
    }


def _config(analyses: list[dict[str, Any]] = ANALYSES) -> dict[str, Any]:
    return {
        "name": "circuit-test",
        "pair": {"zoo": "planted"},
        "task": _planted_task(),
        "run": {"n_boot": 200, "seed": 1},
        "output": {"figures": ["html"]},
        "analyses": analyses,
    }


@functools.cache
def _base_run() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mechdelta-test-circuit-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    run_experiment(_config(), root / "base", quiet=True)
    return root / "base"


@pytest.fixture(scope="module")
def base() -> Path:
    return _base_run()


def _copy(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("levels = 'node'", "unknown key 'levels'"),
        ("component = 'head_out'", "unknown key 'component'"),
        ("level = 'graph'", "unknown level 'graph'"),
        ("method = 'eap'", "unknown method 'eap'"),
        ("level = 'node'\nsemantics = 'ablate'", "not available for level='node'"),
        ("semantics = 'patch'", "semantics 'patch' is not available"),
        ("target = 0", r"target must be a fraction of the shift in \(0, 1\]"),
        ("target = 1.5", r"target must be a fraction of the shift in \(0, 1\]"),
        ("target = 'high'", "target must be a number"),
        ("max_size = 0", "max_size must be >= 1"),
        ("direction = 'sideways'", "direction"),
    ],
)
def test_bad_circuit_keys_are_config_errors(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        Experiment.from_toml(f"[pair]\nzoo = 'planted'\n[[analyses]]\nkind = 'circuit'\n{extra}\n")


def test_circuit_keys_do_not_apply_to_other_kinds():
    with pytest.raises(ConfigError, match="unknown key 'semantics'"):
        Experiment.from_toml(
            "[pair]\nbuiltin = 'tiny'\n[[analyses]]\nkind = 'sweep'\ncomponent = 'head_out'\n"
            "semantics = 'graft'\n"
        )


def test_circuit_ids_defaults_and_round_trip():
    exp = Experiment.from_dict(
        {
            "pair": {"zoo": "planted"},
            "analyses": [
                *ANALYSES,
                {"kind": "circuit", "level": "edge", "target": 1, "max_size": 4},
            ],
        }
    )
    a, b, c = exp.analyses
    assert (a.id, b.id) == IDS
    assert c.id.startswith("circuit-edge-splice-attribution-r2i-")  # the default semantics
    assert (b.level, b.method, b.semantics, b.target) == ("node", "attribution", "graft", 0.9)
    assert c.target == 1.0 and isinstance(c.target, float)
    again = Experiment.from_resolved(json.loads(json.dumps(exp.to_dict())))
    assert again == exp and again.ids == exp.ids


def test_the_example_parses():
    path = Path(__file__).resolve().parents[1] / "examples" / "circuit.toml"
    exp = Experiment.load(path)
    spec = next(a for a in exp.analyses if a.kind == "circuit")
    assert exp.pair.zoo == "planted"
    assert (spec.level, spec.method, spec.semantics) == ("node", "greedy", "graft")


# --- the run ------------------------------------------------------------------------------------


def test_stored_circuits_equal_a_direct_search(base):
    stored = StoredRun.open(base)
    assert stored.ids == IDS and stored.manifest["status"] == "complete"
    pair = md.zoo.load("planted").pair
    task = Experiment.from_dict(_config()).task
    assert task is not None
    direct = search_circuit(
        pair,
        task.build(),
        level="node",
        method="greedy",
        direction="intervened->reference",
        semantics="graft",
        target=0.9,
        progress=False,
    )
    got = stored.load(GREEDY)
    assert isinstance(got, Circuit)
    assert got.names == direct.names and set(got.names) == {"L1H1", "MLP1"}
    assert got.reached and got.faithfulness == pytest.approx(direct.faithfulness, abs=1e-6)
    assert torch.allclose(got.per_prompt, direct.per_prompt, atol=1e-6)
    assert got.minimality == pytest.approx(direct.minimality, abs=1e-6)
    assert [s for s, _ in got.curve] == [s for s, _ in direct.curve]
    assert [f for _, f in got.curve] == pytest.approx([f for _, f in direct.curve], abs=1e-6)

    both = stored.load(BOTH)
    assert isinstance(both, BothDirections)
    assert [c.direction.value for c in both] == ["reference->intervened", "intervened->reference"]
    assert all(isinstance(c, Circuit) and c.method == "attribution" for c in both)
    table = stored.table(BOTH)
    assert set(table["direction"]) == {"reference->intervened", "intervened->reference"}
    assert {"member", "minimality"} <= set(table.columns)
    root = base / "results" / BOTH
    for d in ("reference_to_intervened", "intervened_to_reference"):
        assert (root / d / "tensors.safetensors").is_file()


def test_figures_are_written_and_regenerate_identically(base, tmp_path, monkeypatch):
    names = {p.name for p in (base / "figures").glob("*.json")}
    assert names == {
        f"{GREEDY}.json",
        f"{GREEDY}.curve.json",
        *(f"{BOTH}.{d}{c}.json" for d in ("r2i", "i2r") for c in ("", ".curve")),
    }
    assert (base / "figures" / f"{GREEDY}.curve.html").is_file()
    out = _copy(base, tmp_path)
    before = {p.name: p.read_text() for p in (out / "figures").glob("*.json")}
    shutil.rmtree(out / "figures")

    def no_model(*a, **k):
        raise AssertionError("regenerate_figures must not load a model")

    monkeypatch.setattr(runs, "load_pair", no_model)
    regenerate_figures(out, quiet=True)
    assert {p.name: p.read_text() for p in (out / "figures").glob("*.json")} == before
    curve = json.loads(before[f"{GREEDY}.curve.json"])
    assert [t["x"] for t in curve["data"][:1]] == [[0, 1, 2]]


def test_the_report_has_the_circuit_section(base, tmp_path):
    out = _copy(base, tmp_path)
    md_path, html_path = write_report(out)
    text = md_path.read_text()
    section = text.split(f"({GREEDY})")[1].split("\n## ")[0]
    assert SEMANTICS_TEXT["graft"] in section
    assert "the source is the intervened model, the target the reference model" in section
    assert "faithfulness +1.000" in section and "It reaches the target 0.9" in section
    rows = [r for r in section.splitlines() if r.startswith("| ") and "member" not in r]
    assert {r.split("|")[1].strip() for r in rows} == {"L1H1", "MLP1"}
    assert rows[0].startswith("| MLP1 |")  # the larger drop-one loss first
    assert f"figures/{GREEDY}.html" in section and f"figures/{GREEDY}.curve.html" in section
    assert "Warranted claims: none tested. A circuit is a search result" in section
    both = text.split(f"({BOTH})")[1].split("\n## ")[0]
    assert "the source is the reference model" in both and "the source is the intervened" in both
    assert f"figures/{BOTH}.r2i.curve.html" in both
    html = html_path.read_text()
    assert f'id="figure-{GREEDY}.curve"' in html and f'id="figure-{BOTH}.i2r"' in html


def test_a_resumed_run_skips_the_finished_circuit_analysis(base, tmp_path, monkeypatch):
    """An interrupted run (the greedy search's result left without its analysis.json, as a run
    stopped while storing it leaves it) recomputes only that search."""
    out = _copy(base, tmp_path)
    (out / "results" / GREEDY / "analysis.json").unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    kept = {p: p.read_bytes() for p in sorted((out / "results" / BOTH).rglob("*")) if p.is_file()}
    real = runs.EXECUTORS["circuit"]
    calls: list[str] = []

    def counting(ctx, spec):
        calls.append(spec.id)
        return real(ctx, spec)

    monkeypatch.setitem(runs.EXECUTORS, "circuit", counting)
    result = run_experiment(_config(), out, quiet=True)
    assert result.skipped == (BOTH,) and result.computed == (GREEDY,) and calls == [GREEDY]
    assert {
        p: p.read_bytes() for p in sorted((out / "results" / BOTH).rglob("*")) if p.is_file()
    } == kept
    a, b = StoredRun.open(out).load(GREEDY), StoredRun.open(base).load(GREEDY)
    assert a.names == b.names and torch.equal(a.per_prompt, b.per_prompt)
    assert run_experiment(_config(), out, quiet=True).skipped == IDS and calls == [GREEDY]
