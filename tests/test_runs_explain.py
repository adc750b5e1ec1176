"""Explain analyses in experiments (``kind = "explain"``, issue 13): the analysis keys and the
intervention table (typed errors saying how to fix them), a run of ``examples/explain.toml`` on
the zoo's planted pair, interrupted inside the explanation and resumed (finished stages loaded,
not recomputed), whose stored :class:`Explanation` equals a direct :func:`explain` call, the
run report's explain section with the relative paths of the audit report, the end-of-run
summary, and the null pair's short form."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta.cli import _summarise
from mechdelta.errors import ConfigError
from mechdelta.explain import pipeline
from mechdelta.explain.explanation import Explanation
from mechdelta.explain.pipeline import explain
from mechdelta.report._build import write_report
from mechdelta.report._explain import AUDIT_NOTE
from mechdelta.runs._explain_spec import explain_kwargs
from mechdelta.runs.analyses import AnalysisSpec
from mechdelta.runs.experiment import Experiment
from mechdelta.runs.run import run_experiment
from mechdelta.runs.rundir import StoredRun

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "explain.toml"
N_BOOT = 200
SEED = 0
#: The stages an explanation finishes before steering (the stage the interruption hits).
BEFORE_STEERING = ["shift", "weights", "representations", "patching_head_out", "patching_mlp_out"]


def _example(pair: str = "planted") -> dict[str, Any]:
    """examples/explain.toml, made fast: 200 resamples, no PDF, HTML figures only."""
    data = tomllib.loads(EXAMPLE.read_text("utf-8"))
    data["pair"] = {"zoo": pair}
    data["run"] = {"n_boot": N_BOOT, "seed": SEED}
    data["output"] = {"figures": ["html"]}
    data["analyses"][0]["pdf"] = False
    return data


def _analysis(**keys: Any) -> AnalysisSpec:
    return AnalysisSpec.from_dict({"kind": "explain", **keys})


# --- configuration ------------------------------------------------------------------------------


def test_the_example_parses_with_its_declared_intervention():
    exp = Experiment.load(EXAMPLE)
    (spec,) = exp.analyses
    assert spec.id == "explain"
    assert spec.intervention is not None
    assert spec.intervention["kind"] == "fine-tune"
    assert spec.intervention["date"] == "2026-01-15"  # a TOML date, written as ISO 8601
    assert (spec.budget, spec.circuit, spec.pdf, spec.alpha) == ("auto", "auto", True, None)
    assert Experiment.from_resolved(exp.to_dict()) == exp  # as read back from a manifest


def test_defaults_ids_and_keyword_arguments():
    spec = _analysis()
    assert spec.id == "explain"
    assert spec.steering_alphas == (0.0, 1.0, 2.0) and spec.min_effect == 0.05
    # pdf, batch_budget and the declared intervention do not change results: same id
    assert _analysis(pdf=False, batch_budget=64, intervention={"owner": "x"}).id == "explain"
    changed = _analysis(budget="EXACT", steering_alphas=[0, 1])
    assert changed.budget == "exact" and changed.steering_alphas == (0.0, 1.0)
    assert changed.id.startswith("explain-") and changed.id != _analysis(budget="exact").id
    assert _analysis(name="why").id == "why"
    run = Experiment.from_dict({"pair": {"zoo": "planted"}, "analyses": [{"kind": "explain"}]}).run
    kw = explain_kwargs(_analysis(), run)  # alpha: the run's unless the analysis sets one
    assert kw["alpha"] == float(run.alpha) and kw["n_boot"] == run.n_boot
    assert kw["seed"] == run.seed and kw["budget"] == "auto"
    assert explain_kwargs(_analysis(alpha=0.1), run)["alpha"] == 0.1


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"component": "head_out"}, r"unknown key 'component'; allowed keys: kind, name, budget"),
        ({"n_boot": 10}, r"unknown key 'n_boot'"),
        ({"budget": "cheap"}, r"budget must be 'auto', 'exact', 'attribution' or a positive"),
        ({"budget": 0}, r"budget must be"),
        ({"alpha": 1.5}, r"alpha must lie in \(0, 1\)"),
        ({"alpha": "0.05"}, r"alpha must be a number"),
        ({"min_effect": -0.1}, r"min_effect must be a number >= 0"),
        ({"steering_alphas": []}, r"steering_alphas must be a non-empty list"),
        ({"steering_alphas": "1, 2"}, r"steering_alphas must be a non-empty list"),
        ({"steering_alphas": [1, True]}, r"steering_alphas\[\] must be a finite number"),
        ({"circuit": "yes"}, r"circuit must be true, false or 'auto'"),
        ({"pdf": "no"}, r"pdf must be true or false"),
        ({"intervention": "fine-tune"}, r"intervention must be a table: an \[analyses.inter"),
        ({"intervention": {"onwer": "me"}}, r"unknown key 'onwer'.*extra = \{ onwer"),
        ({"intervention": {"data": 3}}, r"intervention data must be text \(in quotes\)"),
        ({"intervention": {"extra": "x"}}, r"extra must be a table of text"),
        ({"intervention": {"extra": {"n": 1}}}, r"extra.n must be text"),
    ],
)
def test_bad_keys_are_refused_saying_how_to_fix(keys: dict[str, Any], match: str):
    with pytest.raises(ConfigError, match=r"\[\[analyses\]\] #1 \(explain\)") as info:
        _analysis(**keys)
    assert info.match(match)


def test_keys_of_other_kinds_are_refused_in_a_spec_too():
    with pytest.raises(ConfigError, match="'component' does not apply to kind 'explain'"):
        AnalysisSpec(kind="explain", component="head_out")
    with pytest.raises(ConfigError, match="'budget' does not apply to kind 'sweep'"):
        AnalysisSpec(kind="sweep", component="head_out", budget="auto")


def test_an_inline_intervention_table_and_toml_dates():
    exp = Experiment.from_toml(
        '[pair]\nzoo = "planted"\n[[analyses]]\nkind = "explain"\n'
        'intervention = { kind = "LoRA", date = 2026-02-01T10:00:00, extra = { ticket = "ML-1" } }\n'
    )
    (spec,) = exp.analyses
    assert spec.intervention == {
        "kind": "LoRA",
        "date": dt.datetime(2026, 2, 1, 10).isoformat(),
        "extra": {"ticket": "ML-1"},
    }


# --- a run, interrupted and resumed -------------------------------------------------------------


class _Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The example run on the planted pair, interrupted at the explanation's steering stage, then
    resumed (the second run's stderr kept)."""
    out = tmp_path_factory.mktemp("explain-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BROWSER_PATH", str(out / "no-such-chromium"))  # no PNGs: fast, as without one

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            raise _Interrupted("stopped inside the explanation")

        with mp.context() as inner:
            inner.setattr(pipeline, "_steer", interrupted)
            with pytest.raises(_Interrupted):
                run_experiment(_example(), out, quiet=True)
        partial = out / "results" / ".partial" / "explain"
        left = sorted(p.stem for p in (partial / "stages").glob("*.done"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            result = run_experiment(_example(), out)
    return {"out": out, "result": result, "left": left, "stderr": err.getvalue()}


def test_an_interrupted_explanation_resumes_at_its_first_missing_stage(planted_run):
    out, result = planted_run["out"], planted_run["result"]
    assert planted_run["left"] == sorted(BEFORE_STEERING)
    assert "(5 explanation stages kept from before)" in planted_run["stderr"]
    assert result.computed == ("explain",)
    record = StoredRun.open(out).record("explain")
    assert record["result_type"] == "StoredExplanation"
    assert record["explain"]["status"] == "explained"
    assert record["explain"]["loaded_stages"] == BEFORE_STEERING
    assert set(record["explain"]["timings_s"]) >= {*BEFORE_STEERING, "steering"}
    assert not (out / "results" / ".partial").exists()  # removed once the analysis is stored
    assert any(f.startswith("explanation/stages/steering/") for f in record["files"])


def test_the_stored_explanation_equals_a_direct_call(planted_run):
    stored = StoredRun.open(planted_run["out"]).load("explain")
    assert isinstance(stored, Explanation)
    entry = md.zoo.load("planted")
    torch.manual_seed(SEED)
    direct = explain(entry.pair, entry.task, n_boot=N_BOOT, seed=SEED, pdf=False, intervention=None)
    assert stored.status == direct.status == "explained"
    assert stored.shift.shift == pytest.approx(direct.shift.shift, abs=1e-6)
    assert stored.shift.ci == pytest.approx(direct.shift.ci, abs=1e-6)
    texts = [c.text for c in stored.all_claims()]
    assert texts == [c.text for c in direct.all_claims()] and texts
    assert {"L1H1", "L1.mlp_out"} <= {c.label for c in stored.all_claims()}  # the planted parts
    assert stored.located == direct.located
    assert stored.steering.to_dataframe().equals(direct.steering.to_dataframe())
    assert str(stored.circuit) == str(direct.circuit)
    assert stored.intervention.kind == "fine-tune"  # the example's declaration
    assert stored.params["n_boot"] == N_BOOT and stored.params["alpha"] == 0.05
    # the stored audit report, found by the loader
    root = planted_run["out"] / "results" / "explain" / "explanation"
    assert stored.reports == {fmt: root / f"report.{fmt}" for fmt in ("html", "md", "json")}


def test_the_figures_of_an_explanation(planted_run):
    names = {p.stem for p in (planted_run["out"] / "figures").glob("*.json")}
    assert names == {
        "explain",
        "explain.head_out",
        "explain.mlp_out",
        "explain.steering",
        "explain.circuit",
    }


def test_the_report_section_points_at_the_audit_report(planted_run):
    out = planted_run["out"]
    md_path, html_path = write_report(out)
    text, page = md_path.read_text(), html_path.read_text()
    assert "## Explanation: what changed, where, and how it was validated" in text
    assert "Status: explained." in text
    assert "The strongest: putting L1.mlp_out from the intervened model" in text
    assert "| mlp_out | L1.mlp_out | intervened->reference |" in text
    assert "Steering at L1.resid_post" in text and "Circuit: node-level graft circuit" in text
    assert "Located components (to monitor in future checkpoints): L1.mlp_out, L1H1" in text
    assert "(figures/explain.head_out.html)" in text
    for fmt in ("html", "md", "json"):
        rel = f"results/explain/explanation/report.{fmt}"
        assert (out / rel).is_file()
        assert rel in text and rel in page
    assert "No report.pdf: not requested (pdf = false)." in text
    assert AUDIT_NOTE in text and "the document to hand to an auditor" in page
    assert 'id="figure-explain.steering"' in page


def test_the_end_of_run_summary_states_the_explanation(planted_run):
    lines = _summarise(planted_run["out"], 5)
    assert lines[0].startswith("explain: Explanation (explained): logit_diff on 64 prompts")
    assert lines[1].endswith("results/explain/explanation/report.html")


def test_the_null_pair_gets_the_short_form(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    result = run_experiment(_example("null"), tmp_path / "run", quiet=True)
    stored = result.load("explain")
    assert stored.status == "no_shift" and stored.patching == {} and stored.steering is None
    record = StoredRun.open(tmp_path / "run").record("explain")
    assert record["explain"]["status"] == "no_shift"
    assert {p.stem for p in (tmp_path / "run" / "figures").glob("*.json")} == {"explain"}
    md_path, html_path = write_report(tmp_path / "run")
    text = md_path.read_text()
    assert "## Explanation: no shift to explain" in text
    assert "Status: no shift to explain." in text and "stopped after measuring it" in text
    section = text.split("## Explanation: no shift to explain")[1].split("## Provenance")[0]
    for longer_form in ("warranted claim(s)", "Localisation:", "Steering", "Located components"):
        assert longer_form not in section
    assert "[interactive figure](figures/explain.html)" in section  # the shift per prompt
    assert "results/explain/explanation/report.html" in html_path.read_text()
    lines = _summarise(tmp_path / "run", 5)
    assert lines[0].startswith("explain: Explanation (no_shift)")
