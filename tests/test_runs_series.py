"""Series analyses in experiments (``kind = "series"``, issue 17): the ``[series]`` table and the
analysis keys (typed errors saying how to fix them), a run over three checkpoints of the zoo's
induction series whose stored results equal direct :class:`CheckpointSeries` calls, per-pair
resume after an interruption, per-pair progress silenced by ``quiet``, and the report's series
sections (trajectories, emergence in words, circuit membership)."""

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

from mechdelta.circuits.series_result import SeriesCircuits, SeriesResult
from mechdelta.core import progress as progress_mod
from mechdelta.errors import ConfigError, RunError
from mechdelta.report._build import write_report
from mechdelta.runs.experiment import Experiment
from mechdelta.runs.run import run_experiment
from mechdelta.runs.rundir import StoredRun
from mechdelta.zoo import induction
from mechdelta.zoo.series import load_series

pytestmark = pytest.mark.filterwarnings(
    "ignore::mechdelta.circuits.CircuitNotFaithfulWarning"  # max_size = 1: a probe, not a fit
)

STEPS = [0, 800, 1500]
SWEEP = "series-sweep-head_out-i2r-ref"
CIRCUIT_ANALYSIS: dict[str, Any] = {
    "kind": "series",
    "analysis": "circuit",
    "compare": "consecutive",
    "method": "greedy",
    "direction": "reference->intervened",
    "max_size": 1,
    "name": "circuits",
}
SWEEP_ANALYSIS: dict[str, Any] = {
    "kind": "series",
    "analysis": "sweep",
    "component": "head_out",
    "direction": "intervened->reference",
    "threshold": 0.1,
}
BOOT = {"n_boot": 200, "seed": 1}


@functools.cache
def _task() -> dict[str, Any]:
    """The first 8 prompts of the induction task as an inline [task] (loss on every token)."""
    tokens, _ = induction.eval_batch(0)
    return {"prompts": tokens[:8].tolist(), "metric": "loss", "name": "induction-8"}


def _config(analyses: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "name": "series-test",
        "series": {"zoo": "induction", "steps": STEPS},
        "task": _task(),
        "run": BOOT,
        "output": {"figures": ["html"]},
        "analyses": analyses if analyses is not None else [SWEEP_ANALYSIS, CIRCUIT_ANALYSIS],
    }


@functools.cache
def _base_run() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mechdelta-test-series-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    run_experiment(_config(), root / "base", quiet=True)
    return root / "base"


@pytest.fixture(scope="module")
def base() -> Path:
    return _base_run()


@pytest.fixture(scope="module")
def direct() -> Any:
    task = Experiment.from_dict(_config()).task
    assert task is not None
    return load_series(steps=STEPS), task.build()


# --- configuration ----------------------------------------------------------------------------

_SERIES = "[series]\nzoo = 'induction'\n"


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[series]\n", "needs exactly one source: zoo = 'induction'"),
        ("[series]\nzoo = 'induction'\ncheckpoints = ['a', 'b']\n", "exactly one source"),
        ("[series]\nzoo = 'planted'\n", "has no checkpoint series; zoo series: induction"),
        ("[series]\nzoo = 'induction'\nlabels = [0, 1]\n", "choose them with steps"),
        ("[series]\nzoo = 'induction'\nsteps = [800, 0]\n", "increasing order"),
        ("[series]\nzoo = 'induction'\nsteps = [0, 800]\nreference = 2\n", "use 0..1"),
        ("[series]\ncheckpoints = ['a']\n", "a series needs at least 2"),
        ("[series]\ncheckpoints = ['a', 'b']\nlabels = [0]\n", "one label per checkpoint"),
        ("[series]\ncheckpoints = ['a', 'b']\nlabels = [3, 3]\n", "labels must be distinct"),
        ("[series]\ncheckpoints = ['a', 'b']\nsteps = [0, 1]\n", "applies to a zoo series"),
        ("[series]\nzoo = 'induction'\nstep = [0, 1]\n", "unknown key 'step'"),
        ("[series]\ncheckpoints = ['a', 'b']\n", r"\[task\] is required when \[series\]"),
        ("[pair]\nseries = true\n", r"series = true needs a \[series\] table"),
    ],
)
def test_bad_series_tables_are_config_errors(toml, needle):
    text = toml + "[[analyses]]\nkind = 'series'\nanalysis = 'sweep'\ncomponent = 'head_out'\n"
    with pytest.raises(ConfigError, match=needle):
        Experiment.from_toml(text)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("", "needs analysis = 'sweep', 'attribute' or 'circuit'"),
        ("analysis = 'patch'", "unknown analysis 'patch'; choose one of"),
        ("analysis = 'sweep'", r"\(analysis = 'sweep'\): a sweep needs component"),
        ("analysis = 'sweep'\ncomponent = 'head_out'\nlevel = 'node'", "'level' does not apply"),
        ("analysis = 'circuit'\nlevel = 'graph'", "unknown level 'graph'"),
        ("analysis = 'sweep'\ncomponent = 'head_out'\ndirection = 'both'", "one \\[\\[analyses"),
        ("analysis = 'sweep'\ncomponent = 'head_out'\ncompare = 'pairs'", "'consecutive'"),
        ("analysis = 'attribute'\ncomponent = 'head_out'\nverify = 2", "unknown key 'verify'"),
        ("analysis = 'circuit'\nthreshold = 0.1", "not to circuit searches"),
        ("analysis = 'sweep'\ncomponent = 'head_out'\nthreshold = 2", r"in \[0, 1\)"),
    ],
)
def test_bad_series_analyses_are_config_errors(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        Experiment.from_toml(f"{_SERIES}[[analyses]]\nkind = 'series'\n{extra}\n")


def test_a_series_analysis_needs_a_series_table():
    with pytest.raises(ConfigError, match=r"needs a \[series\] table naming the checkpoints"):
        Experiment.from_toml(
            "[pair]\nzoo = 'induction'\n[[analyses]]\nkind = 'series'\nanalysis = 'sweep'\n"
            "component = 'head_out'\n"
        )
    with pytest.raises(ConfigError, match=r"needs a \[pair\] table \(or a \[series\] table\)"):
        Experiment.from_toml("[[analyses]]\nkind = 'shift'\n")


def test_ids_defaults_and_round_trip():
    exp = Experiment.from_dict(_config([SWEEP_ANALYSIS, CIRCUIT_ANALYSIS]))
    sweep, circuit = exp.analyses
    assert exp.ids == (SWEEP, "circuits") and exp.pair.series and exp.pair.source == "series"
    assert sweep.compare == "reference" and sweep.threshold == 0.1
    assert (circuit.level, circuit.semantics, circuit.target) == ("node", "graft", 0.9)
    anonymous = {k: v for k, v in CIRCUIT_ANALYSIS.items() if k != "name"}
    unnamed = Experiment.from_dict(_config([anonymous])).ids[0]
    assert unnamed.startswith("series-circuit-node-graft-greedy-r2i-") and unnamed.endswith("-cons")
    again = Experiment.from_resolved(json.loads(json.dumps(exp.to_dict())))
    assert again == exp and again.ids == exp.ids


def test_the_example_parses():
    path = Path(__file__).resolve().parents[1] / "examples" / "series.toml"
    exp = Experiment.load(path)
    assert exp.series is not None and exp.series.zoo == "induction" and exp.pair.series
    assert [a.kind for a in exp.analyses] == ["shift", "series", "series"]
    assert {a.compare for a in exp.analyses[1:]} == {"reference", "consecutive"}


# --- the run ------------------------------------------------------------------------------------


def test_stored_results_equal_direct_series_calls(base, direct):
    series, task = direct
    run = StoredRun.open(base)
    assert run.manifest["status"] == "complete"
    got = run.load(SWEEP)
    assert isinstance(got, SeriesResult) and got.labels == (800, 1500) and got.mode == "reference"
    want = series.sweep(task, "head_out", "intervened->reference", progress=False, **BOOT)
    for a, b in zip(got.results, want.results, strict=True):
        assert torch.equal(a.per_prompt, b.per_prompt) and torch.equal(a.ci, b.ci)
    assert got.emergence(threshold=0.1, scale="series") == want.emergence(
        threshold=0.1, scale="series"
    )
    circuits = run.load("circuits")
    assert isinstance(circuits, SeriesCircuits) and circuits.pair_labels == ((0, 800), (800, 1500))
    want_c = series.search_circuit(
        task, mode="consecutive", method="greedy", direction="reference->intervened",
        max_size=1, progress=False,
    )  # fmt: skip
    assert list(want_c) == list(circuits.labels)
    for c, w in zip(circuits, want_c.values(), strict=True):
        assert c.names == w.names and torch.allclose(c.per_prompt, w.per_prompt, atol=1e-6)
    assert circuits[1500].names == ("L0H3",)  # the previous-token head, as test_series finds
    hashes = [c["weights_hash"] for c in run.manifest["series"]["checkpoints"]]
    assert (
        len(set(hashes)) == 3 and run.manifest["models"]["intervened"]["name"] == "checkpoint 1500"
    )
    names = {p.name for p in (base / "figures").glob("*.json")}
    assert names == {f"{SWEEP}.json", f"{SWEEP}.series.json", "circuits.json"}
    assert not (base / "results" / ".partial").exists()


def test_the_report_has_the_series_sections(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    md_path, html_path = write_report(out)
    text = md_path.read_text()
    section = text.split(f"({SWEEP})")[1].split("\n## ")[0]
    assert "each checkpoint against the reference checkpoint 0" in section
    large = "First checkpoint whose effect's 95% CI lies beyond ±0.1 of the whole series' shift"
    line = next(x for x in section.splitlines() if x.startswith(large))
    assert "at checkpoint 800: L1H0, L1H1, L1H2, L1H3; never: L0H0, L0H1, L0H2, L0H3." in line
    assert "First checkpoint whose 95% CI of the score excludes 0: at checkpoint 800:" in section
    assert f"figures/{SWEEP}.html" in section and f"figures/{SWEEP}.series.html" in section
    rows = [r for r in section.splitlines() if r.startswith("| L1H")]
    assert len(rows) == 4 and all(r.split("|")[3].strip() == "800" for r in rows)
    circ = text.split("(circuits)")[1].split("\n## ")[0]
    assert "each checkpoint against the one before it" in circ and "Semantics graft" in circ
    assert "L0H3 at 1500" in circ and "| 1500 | 800 → 1500 | 1 |" in circ
    assert "series checkpoint 800" in text  # provenance
    html = html_path.read_text()
    assert f'id="figure-{SWEEP}.series"' in html and 'id="figure-circuits"' in html


def test_a_resumed_series_skips_finished_pairs(base, tmp_path, monkeypatch, capsys):
    """A run interrupted while computing the second pair keeps the first: re-launched, it
    computes only the second, with the same result as an uninterrupted run; per-pair progress
    shows unless quiet."""
    import mechdelta.patching.sweep as sweep_mod

    real = sweep_mod.sweep
    calls: list[int] = []
    fail_at = [2]

    def counting(*args, **kw):
        calls.append(1)
        if len(calls) == fail_at[0]:
            raise KeyboardInterrupt  # the interruption, while computing the second pair
        return real(*args, **kw)

    monkeypatch.setattr(sweep_mod, "sweep", counting)
    out = tmp_path / "run"
    config = _config([SWEEP_ANALYSIS])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, out, quiet=True)
    assert "[mechdelta]" not in capsys.readouterr().err  # quiet: no progress at all
    assert (out / "results" / ".partial" / SWEEP / "pair_000" / "done.json").is_file()
    ticks = iter(range(0, 10_000, 5))  # a clock 5 s per reading: every progress line shows
    monkeypatch.setattr(progress_mod, "_clock", lambda: float(next(ticks)))
    calls.clear()
    fail_at[0] = 0
    result = run_experiment(config, out)
    assert result.computed == (SWEEP,) and len(calls) == 1  # the second pair only
    err = capsys.readouterr().err
    assert "running (1 pairs kept from before)" in err
    assert "[mechdelta] series sweep head_out (reference mode): 2 done in" in err
    a, b = StoredRun.open(out).load(SWEEP), StoredRun.open(base).load(SWEEP)
    for x, y in zip(a.results, b.results, strict=True):
        assert torch.equal(x.per_prompt, y.per_prompt) and torch.equal(x.ci, y.ci)
    assert not (out / "results" / ".partial").exists()
    assert run_experiment(config, out, quiet=True).skipped == (SWEEP,) and len(calls) == 1


def test_a_series_with_other_checkpoints_is_not_resumed(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    m = json.loads((out / "manifest.json").read_text())
    m["series"]["checkpoints"][1]["weights_hash"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunError, match="other series checkpoints"):
        run_experiment(_config(), out, quiet=True)
