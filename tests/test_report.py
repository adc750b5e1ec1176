"""The transition report: Markdown + self-contained HTML from a stored run."""

from __future__ import annotations

import json
import re

import pytest

from mechdelta.errors import RunError
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


def test_top_sites_table_orders_by_larger_score_of_both_directions():
    stored = StoredRun.open(base_run_dir())
    both = stored.load("sweep-head_out-both")
    table = top_sites_table(both, 3)
    assert table.headers == ("site", "reference → intervened", "intervened → reference")
    assert [r[0] for r in table.rows] == ["L1H1", "L0H0", "L0H1"]
    single = top_sites_table(both.reference_to_intervened, 2)
    assert single.rows[0][0] == "L1H1" and len(single.rows) == 2
    text = table.text().splitlines()
    assert text[0].startswith("site") and set(text[1]) <= {"-", " "} and text[2].startswith("L1H1")


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
    with pytest.raises(RunError, match="partial"):
        write_report(run_dir)
    assert not (run_dir / "report.md").exists()


def test_report_reads_nothing_but_the_run_directory(written):
    run_dir, md, _ = written
    cfg = json.loads((run_dir / "manifest.json").read_text())["config"]
    assert f'"name": "{cfg["name"]}"' in md  # the resolved config is in the report
