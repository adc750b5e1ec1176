"""The transition report: Markdown + self-contained HTML from a stored run."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from mechdelta.cli import app
from mechdelta.errors import RunIncompleteError
from mechdelta.report import _build as report_mod
from mechdelta.report._build import (
    Section,
    Table,
    Text,
    register_section,
    top_sites_table,
    write_report,
)
from mechdelta.runs.rundir import StoredRun
from tests._tiny_run import IDS, base_run_dir, copy_run


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    import shutil

    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(base_run_dir(), run_dir)
    md_path, html_path = write_report(run_dir)
    return run_dir, md_path.read_text(), html_path.read_text()


def test_markdown_says_what_shifted_where_and_from_what(written):
    run_dir, md, _ = written
    stored = StoredRun.open(run_dir)
    shift = stored.load("shift")
    lo, hi = shift.ci
    assert md.startswith("# Transition report: tiny-test\n")
    # what shifted, by how much, with the CI
    assert f"a shift of {shift.shift:+.4g} (95% bootstrap CI [{lo:+.4g}, {hi:+.4g}])" in md
    assert "The shift is significant" in md
    # where: the planted head tops both directions in the sweep's table
    rows = [line for line in md.splitlines() if line.startswith("| L1H1 |")]
    assert rows and rows[0].count("+1.000 [+1.000, +1.000]") == 2
    assert "| site | reference → intervened | intervened → reference |" in md
    sweep_table = md.split("## Where it is localised: head_out sweep")[1].split("##")[0]
    first_row = next(ln for ln in sweep_table.splitlines() if ln.startswith("| L"))
    assert first_row.startswith("| L1H1 |")
    # one section per analysis, then provenance
    for title in ("## What shifted", "## Joint patch: L1H1, L0H2", "## Weight changes"):
        assert title in md
    assert "## Model × input (factorial)" in md and md.rstrip().endswith("```")
    # figures linked (HTML only in this run: no PNG to show inline)
    for i in IDS:
        assert f"(figures/{i}.html)" in md
    # provenance from the manifest
    m = stored.manifest
    assert m["models"]["reference"]["weights_hash"] in md
    assert m["models"]["intervened"]["weights_hash"] in md
    assert m["task"]["prompt_hash"] in md and m["environment"]["torch"] in md
    assert "| L1H1.head_o | 1 |" in md  # the weight change: W_O of head 1 doubled -> ratio 1


def test_html_is_self_contained_with_plotly_inlined_once(written):
    _, _, html = written
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]*\bsrc=", html)  # nothing fetched: plotly.js is inline
    assert not re.search(r"<link[^>]*\bhref=", html)
    assert html.count("plotly.js v") >= 1
    banner = re.findall(r"\* plotly\.js v[\d.]+", html)
    assert len(banner) == 1, banner
    for i in IDS:
        assert f'id="figure-{i}"' in html
    assert "<table>" in html and "L1H1" in html


def _with_scores(sweep, scores: dict[str, float]):
    """The sweep with the given sites' patched metric set to give those scores (a score of 0:
    the unpatched model's own per-prompt metric, which scores exactly 0)."""
    shift, toward = sweep.shift, sweep.direction.toward_reference
    unpatched = shift.intervened if toward else shift.reference
    denom = shift.intervened_mean - shift.reference_mean
    per_prompt = sweep.per_prompt.clone().reshape(len(sweep.sites), -1)
    for i, site in enumerate(sweep.sites):
        s = scores.get(str(site))
        if s == 0.0:
            per_prompt[i] = unpatched
        elif s is not None:
            per_prompt[i] = unpatched.double().mean() + (-s if toward else s) * denom
    return dataclasses.replace(sweep, per_prompt=per_prompt.reshape(sweep.per_prompt.shape))


def test_top_sites_table_orders_by_larger_score_of_both_directions_and_drops_zeros():
    from mechdelta.patching.results import BothDirections

    both = StoredRun.open(base_run_dir()).load("sweep-head_out-both")
    # the tiny pair differs in L1H1 only: every other head scores exactly 0, in both directions
    table = top_sites_table(both, 3)
    assert table.headers == ("site", "reference → intervened", "intervened → reference")
    assert [r[0] for r in table.rows] == ["L1H1"]
    assert "sorted by the larger |score| of the two directions, largest first" in table.caption
    r2i = _with_scores(both.reference_to_intervened, {"L0H0": 0.5, "L0H1": -0.6})
    i2r = _with_scores(both.intervened_to_reference, {"L0H1": 0.7, "L0H2": 0.2})
    assert r2i.scores.flatten()[0].item() == pytest.approx(0.5, abs=1e-4)
    table = top_sites_table(BothDirections(r2i, i2r), 3)
    assert [r[0] for r in table.rows] == ["L1H1", "L0H1", "L0H0"]
    assert [r[0] for r in top_sites_table(BothDirections(r2i, i2r), 10).rows] == [
        "L1H1",
        "L0H1",
        "L0H0",
        "L0H2",  # 0 in one direction only: kept
    ]
    single = top_sites_table(r2i, 10)  # by |score|: -0.6 before 0.5; zeros left out
    assert [r[0] for r in single.rows] == ["L1H1", "L0H1", "L0H0"]
    assert "sorted by |score|, largest first" in single.caption
    text = table.text().splitlines()
    assert text[0].startswith("site") and set(text[1]) <= {"-", " "} and text[2].startswith("L1H1")


def test_a_sweep_where_no_site_changed_the_metric(tmp_path):
    both = StoredRun.open(base_run_dir()).load("sweep-head_out-both")
    none = _with_scores(both.reference_to_intervened, {"L1H1": 0.0})
    assert float(none.scores.abs().max()) == 0.0
    assert top_sites_table(none, 5).rows == ()
    section = report_mod._SECTIONS["sweep"](
        report_mod.ReportContext(StoredRun.open(base_run_dir())), "x", none
    )
    texts = [b.text for b in section.blocks if isinstance(b, Text)]
    assert "No site changed the metric (every site scored exactly 0)." in texts
    assert not any(isinstance(b, Table) for b in section.blocks)


def test_sections_come_from_a_registry(tmp_path, monkeypatch):
    run_dir = copy_run(tmp_path)
    monkeypatch.setitem(report_mod._SECTIONS, "weight_diff", report_mod._SECTIONS["weight_diff"])

    @register_section("weight_diff")
    def custom(ctx, analysis_id, result):
        return Section("Custom weights", (Text("hello"), Table(("a",), (("b",),))), analysis_id)

    md_path, _ = write_report(run_dir)
    md = md_path.read_text()
    assert "## Custom weights\n\nhello" in md and "## Weight changes" not in md


def test_partial_run_has_no_report(tmp_path):
    run_dir = copy_run(tmp_path)
    (run_dir / "results" / "factorial" / "analysis.json").unlink()
    with pytest.raises(RunIncompleteError, match="partial"):
        write_report(run_dir)
    assert not (run_dir / "report.md").exists()


def test_interrupted_run_has_no_report_and_says_how_to_finish_it(tmp_path):
    """Every analysis stored, but the run stopped before its figures: status "running"."""
    run_dir = copy_run(tmp_path)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["status"] = "running"
    m["experiment"]["source"] = "/work/exp.toml"
    (run_dir / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(run_dir / "figures")
    finish = f"`mechdelta run /work/exp.toml --out {run_dir}`"
    with pytest.raises(RunIncompleteError, match=rf"is incomplete: .*status 'running'.*{finish}"):
        write_report(run_dir)
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.startswith("error: the run in") and res.stderr.count("\n") == 1
    assert finish in res.stderr
    assert not (run_dir / "report.md").exists() and not (run_dir / "report.html").exists()


def test_missing_figure_files_are_not_linked(tmp_path):
    run_dir = copy_run(tmp_path)
    shutil.rmtree(run_dir / "figures")
    md = write_report(run_dir)[0].read_text()
    assert "(figures/" not in md
    # one per analysis, plus the sweep's split-half reliability figure
    assert (
        md.count(f"(figure not written: `mechdelta figures {run_dir}` writes it)") == len(IDS) + 1
    )


def test_report_reads_nothing_but_the_run_directory(written):
    run_dir, md, _ = written
    cfg = json.loads((run_dir / "manifest.json").read_text())["config"]
    assert f'"name": "{cfg["name"]}"' in md  # the resolved config is in the report


def test_each_site_analysis_shows_its_claims_and_reliability(written):
    _, md, html = written
    summary = md.split("\n## ")[0]
    # the summary states warranted claims only (no ranking of unwarranted scores)
    assert "Largest" not in summary
    assert "Warranted claims in sweep-head_out-both (q < 0.05, |effect| >= 5% of the shift): " in (
        summary
    )
    assert "restoring L1H1 from the reference undoes 100% [100, 100] of the shift" in summary
    assert "Warranted claims in patch-L1H1+L0H2-both" in summary
    sweep = md.split("## Where it is localised: head_out sweep")[1].split("\n## ")[0]
    criteria = (
        "Criteria: q < 0.05 (sign-flip permutation test over prompts, Benjamini-Hochberg-"
        "adjusted; 16 tests) and |effect| >= 5% of the shift."
    )
    assert criteria in sweep
    claims = sweep.split(criteria)[1]
    rows = [ln for ln in claims.splitlines() if ln.startswith("| L")]
    assert sorted(rows) == [
        "| L1H1 | intervened → reference | +100% [+100%, +100%] | < 0.001 | 16 |",
        "| L1H1 | reference → intervened | +100% [+100%, +100%] | < 0.001 | 16 |",
    ]
    assert "*2 warranted claims, by |effect|, largest first;" in claims
    assert "beyond seed variation" not in md  # the run has no [control]
    assert "Reliability (split halves): the analysis' site scores on two disjoint random" in sweep
    assert "(8 each, seed 3)" in sweep and "Spearman 1.00 over 8 sites; top-2 overlap 100%" in sweep
    assert "(figures/sweep-head_out-both.reliability.html)" in sweep
    patch = md.split("## Joint patch: L1H1, L0H2")[1].split("\n## ")[0]
    assert "| {L1H1, L0H2} | reference → intervened |" in patch
    assert "Reliability: not applicable (a joint patch ranks no sites)." in patch
    # the HTML embeds the reliability figure and the sweep's significance overlay
    assert 'id="figure-sweep-head_out-both.reliability"' in html
    assert "Split-half reliability of the site ranking" in html
    assert "not significant" in html


def test_alpha_must_be_a_level(tmp_path):
    from mechdelta.errors import ConfigError

    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"alpha=.* must lie in \(0, 1\)"):
            write_report(base_run_dir(), alpha=bad)


def test_a_run_stored_without_reliability_is_reported_as_such(tmp_path):
    """A run written before split halves existed: the report says so, no figure is linked."""
    run_dir = copy_run(tmp_path)
    root = run_dir / "results" / "sweep-head_out-both"
    shutil.rmtree(root / "reliability")
    rec = json.loads((root / "analysis.json").read_text())
    rec["files"] = {k: v for k, v in rec["files"].items() if not k.startswith("reliability/")}
    del rec["reliability"]
    (root / "analysis.json").write_text(json.dumps(rec))
    (run_dir / "figures" / "sweep-head_out-both.reliability.html").unlink()
    md = write_report(run_dir)[0].read_text()
    assert "Reliability (split halves): not computed (not stored with this run)." in md
    assert "sweep-head_out-both.reliability" not in md
    assert "| L1H1 | reference → intervened |" in md  # the claims do not need it
