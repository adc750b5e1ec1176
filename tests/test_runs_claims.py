"""Warranted claims in runs and reports: the zoo's planted pair (with the null pair as its seed-
variation control) gets claims on exactly its planted components, the null pair none, with the
reason; split-half reliability is stored with each sweep and rendered from the stored results;
the control pair is part of the run's identity."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mechdelta.errors import RunError
from mechdelta.patching.shift import ShiftNotSignificantWarning
from mechdelta.report._build import write_report
from mechdelta.runs.run import regenerate_figures, run_experiment
from mechdelta.runs.rundir import StoredRun

N_PROMPTS = 16  # of the zoo's 64 trigger prompts: enough for q < 0.001, quick to sweep
HEADS, MLPS, NULL_HEADS = "sweep-head_out-both", "sweep-mlp_out-r2i", "sweep-head_out-r2i"


@functools.cache
def _task() -> dict[str, Any]:
    """The first prompts of the planted entry's trigger task, inline (the null pair's trigger
    task has the same prompts)."""
    import mechdelta as md

    t = md.zoo.load("planted").tasks["trigger"]
    return {
        "prompts": t.prompts[:N_PROMPTS].tolist(),
        "answers": t.answers[:N_PROMPTS].tolist(),
        "wrong": t.wrong[:N_PROMPTS].tolist(),
        "metric": "logit_diff",
        "name": "trigger-16",
    }


def _config(pair: str, analyses: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": f"{pair}-claims",
        "pair": {"zoo": pair},
        "task": _task(),
        "run": {"n_boot": 200},
        "output": {"figures": ["html"]},
        "analyses": analyses,
        **extra,
    }


PLANTED = [
    {"kind": "shift"},
    {"kind": "sweep", "component": "head_out", "direction": "both"},
    {"kind": "sweep", "component": "mlp_out"},
]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims") / "planted"
    run_experiment(_config("planted", PLANTED, control={"zoo": "null"}), out, quiet=True)
    md_path, _ = write_report(out)
    return out, md_path.read_text()


@pytest.fixture(scope="module")
def null(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims") / "null"
    analyses = [{"kind": "shift"}, {"kind": "sweep", "component": "head_out"}]
    with pytest.warns(ShiftNotSignificantWarning):
        run_experiment(_config("null", analyses), out, quiet=True)
    md_path, _ = write_report(out)
    return out, md_path.read_text()


def _section(md: str, title: str) -> str:
    """The body of the section whose heading ends with ``title`` (an analysis id in
    parentheses, or the whole heading)."""
    for part in md.split("\n## ")[1:]:
        heading = part.split("\n")[0]
        if heading.endswith(f"({title})") or heading == title:
            return part
    raise AssertionError(f"no section {title!r}")


def _claim_rows(section: str) -> list[list[str]]:
    """The rows of a section's claims table (the table after its "Criteria:" line)."""
    table = section.split("Criteria: ")[1]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| site")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def test_the_planted_components_are_claimed_and_nothing_else(planted):
    out, md = planted
    summary = md.split("\n## ")[0]
    # the summary states the warranted claims, in both directions, with q and the control check
    assert "Warranted claims in sweep-head_out-both (q < 0.05, |effect| >= 5% of the shift)" in (
        summary
    )
    assert "restoring L1H1 from the reference undoes" in summary
    assert "putting L1H1 from the intervened model into the reference carries" in summary
    assert "restoring L1.mlp_out from the reference undoes" in summary
    assert summary.count("q < 0.001; 16 prompts; exceeds seed variation") == 3
    assert "Largest" not in summary and "L0H" not in summary
    # the sections' claims tables: exactly the planted sites, beyond seed variation
    heads = _claim_rows(_section(md, HEADS))
    assert [(r[0], r[1]) for r in heads] == [
        ("L1H1", "reference → intervened"),
        ("L1H1", "intervened → reference"),
    ] or [(r[0], r[1]) for r in heads] == [
        ("L1H1", "intervened → reference"),
        ("L1H1", "reference → intervened"),
    ]
    assert all(r[3] == "< 0.001" and r[4] == "16" and r[5] == "yes" for r in heads)
    mlps = _claim_rows(_section(md, MLPS))
    assert [(r[0], r[1], r[5]) for r in mlps] == [("L1.mlp_out", "reference → intervened", "yes")]
    assert "Criteria: q < 0.05 (sign-flip permutation test over prompts, Benjamini-Hochberg-" in md
    assert "16 tests) and |effect| >= 5% of the shift." in _section(md, HEADS)
    assert "Seed-variation control: the same analysis on the control pair (zoo:null)" in md
    # the report's numbers are mechdelta.claims of the stored results, with the stored control
    import mechdelta as md_

    run = StoredRun.open(out)
    found = md_.claims(run.load(HEADS), 0.05, control=run.control(HEADS))
    assert sorted(c.label for c in found) == ["L1H1", "L1H1"]
    for c in found:
        assert f"{c.effect * 100:+.0f}% [{c.ci[0] * 100:+.0f}%" in _section(md, HEADS)
    # the control pair is in the provenance and the manifest
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["control"]["zoo"] == "null"
    for role in ("reference", "intervened"):
        assert f"| control {role} | zoo:null/{role} (weights " in md
        assert m["control_models"][role]["weights_hash"] in md


def test_the_null_pair_gets_no_claims_and_the_reason(null):
    out, md = null
    summary = md.split("\n## ")[0]
    assert (
        "No warranted claims in sweep-head_out-r2i (q < 0.05, |effect| >= 5% of the shift): "
        "the shift's interval contains 0: the shift itself is not warranted." in summary
    )
    section = _section(md, "Where it is localised: head_out sweep")
    assert "No warranted claims: the shift's interval contains 0" in section
    assert "warranted claim," not in section and "warranted claims, by |effect|" not in section
    assert _claim_rows(section) == []
    assert not (out / "results" / NULL_HEADS / "control").exists()  # no [control]: none stored


def test_split_half_reliability_is_stored_and_matches_a_direct_call(planted):
    import mechdelta as md_

    out, md = planted
    run = StoredRun.open(out)
    rel = run.reliability(HEADS)
    assert set(rel) == {"reference->intervened", "intervened->reference"}
    rec = run.record(HEADS)
    assert rec["reliability"] == {"seed": 0, "k": 2, "prompts_per_half": 8, "of": "scores"}
    assert rec["control"] == {"pair": "zoo:null"} and rec["control_type"] == "BothDirections"
    assert any(f.startswith("reliability/") for f in rec["files"])  # checksummed with the rest
    pair = md_.zoo.load("planted").pair
    task = StoredRun.open(out).experiment.task.build()
    direct = md_.split_half(
        pair, task, md_.sweep, k=2, seed=0, component="head_out", direction="both",
        n_boot=200, alpha=0.05, progress=False,
    )  # fmt: skip
    for d, r in direct.items():
        stored = rel[d]
        assert stored.sites == r.sites and stored.k == r.k == 2
        assert torch.equal(stored.scores_a, r.scores_a) and torch.equal(stored.scores_b, r.scores_b)
        assert stored.spearman == pytest.approx(r.spearman) and stored.top_k_overlap == 1.0
    # rendered from the stored results: a line and a figure per sweep
    section = _section(md, HEADS)
    assert (
        "Reliability (split halves): the analysis' site scores on two disjoint random halves"
        in (section)
    )
    assert "(8 each, seed 0)" in section and "top-2 overlap 100%" in section
    assert "figures/sweep-head_out-both.reliability.html" in section
    assert "Spearman 1.00 over 2 sites; top-1 overlap 100%" in _section(md, MLPS)
    fig = json.loads((out / "figures" / f"{HEADS}.reliability.json").read_text())
    assert "Split-half reliability" in fig["layout"]["title"]["text"]
    assert "Spearman" in json.dumps(fig["layout"]["annotations"])


def test_figures_and_report_need_no_model(planted, tmp_path, monkeypatch):
    from mechdelta.runs import run as runs

    out = tmp_path / "copy"
    shutil.copytree(planted[0], out)
    before = {p.name: p.read_text() for p in (out / "figures").glob("*.json")}
    assert f"{HEADS}.reliability.json" in before and f"{MLPS}.reliability.json" in before

    def no_model(*a, **k):
        raise AssertionError("figures and reports are built from stored results")

    monkeypatch.setattr(runs, "load_pair", no_model)
    shutil.rmtree(out / "figures")
    regenerate_figures(out, quiet=True)
    assert {p.name: p.read_text() for p in (out / "figures").glob("*.json")} == before
    assert write_report(out)[0].read_text() == planted[1].replace(str(planted[0]), str(out))


def test_the_control_pair_is_part_of_the_runs_identity(planted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(planted[0], out)
    cfg = _config("planted", PLANTED, control={"zoo": "null"})
    with pytest.raises(RunError, match=r"different experiment \(control: stored"):
        run_experiment({**cfg, "control": None}, out, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    m["control_models"]["intervened"]["weights_hash"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunError, match="other control intervened weights"):
        run_experiment(cfg, out, quiet=True)


def test_claims_follow_alpha(planted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(planted[0], out)
    md = write_report(out, alpha=1e-6)[0].read_text()
    # 16 prompts, 10000 sign-flip resamples: no p-value below 1/10001, so nothing at 1e-6
    assert "Criteria: q < 1e-06 (" in md and "Criteria: q < 0.05" not in md
    assert "No warranted claims in sweep-head_out-both (q < 1e-06" in md
    assert "Note: the smallest attainable p-value is" in md
    assert "Claims here are at alpha = 1e-06; the run's figure files" in md
    assert md.count("| L1H1 |") == 1  # the top-sites table only
    assert Path(out / "report.html").read_text().count("figure-sweep-head_out-both") >= 2
