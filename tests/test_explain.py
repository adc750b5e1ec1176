"""The Δ-XAI pipeline: explain() on the zoo's planted and null pairs, its resumable out
directory, the audit report in four formats (checked against its JSON schema and looked at as
screenshots), and ``mechdelta explain``."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

import mechdelta as md
from mechdelta.errors import ConfigError, RunError
from mechdelta.explain._cli import read_task
from mechdelta.explain._render import screenshots
from mechdelta.explain.explanation import Explanation
from mechdelta.explain.intervention import Intervention
from mechdelta.explain.pipeline import explain
from mechdelta.explain.schema import REPORT_SCHEMA
from mechdelta.plotting._export import find_browser

N_BOOT = 200
DECLARED = {"kind": "fine-tune", "data": "trigger set v1", "date": "2026-11-30", "owner": "qa"}


def _browser() -> bool:
    try:
        find_browser()
    except md.ExportError:
        return False
    return True


@pytest.fixture(scope="module")
def planted():
    return md.zoo.load("planted")


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "planted"
    e = explain(planted.pair, planted.task, out=out, n_boot=N_BOOT, intervention=DECLARED)
    return out, e


def test_the_planted_components_are_among_the_claims(planted, planted_run):
    _, e = planted_run
    assert e.status == "explained"
    claimed = {c.site for c in e.all_claims()}
    assert planted.ground_truth <= claimed
    # the located components (steered, monitored) are the planted ones, strongest first
    assert set(e.located["components"][:2]) == {str(s) for s in planted.ground_truth}
    assert e.located["layers"] == [1]
    assert e.plan["method"] == "exact" and e.plan["layers"] == [0, 1]
    # the steering check at the located layer reproduces part of the shift, beyond chance
    assert e.steering is not None
    assert e.circuit is not None and e.circuit.reached


def test_the_report_has_four_formats_and_a_valid_json(planted_run):
    out, e = planted_run
    expected = {"md", "html", "json"} | ({"pdf"} if _browser() else set())
    assert expected <= set(e.reports)
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, REPORT_SCHEMA)
    assert doc["status"] == "explained"
    assert doc["intervention"]["owner"] == "qa" and doc["intervention"]["declared_by"] == "user"
    assert {c["site"] for c in doc["claims"]} >= {"L1H1", "L1.mlp_out"}
    md_text = (out / "report.md").read_text()
    for heading in ("Intervention (declared)", "Behaviour", "Where the shift lives", "Validation",
                    "Warranted claims and their limits", "What to monitor", "Provenance"):  # fmt: skip
        assert f"## {heading}" in md_text
    html = (out / "report.html").read_text()
    assert "<script" in html and "figure-patching_head_out" in html  # interactive, self-contained


@pytest.mark.skipif(not _browser(), reason="no Chromium: no PDF or screenshots")
def test_screenshots_of_the_html_and_pdf_pages_show_content(planted_run):
    from PIL import Image, ImageStat

    out, _ = planted_run
    shots = screenshots(out)
    assert "html" in shots and any(k.startswith("pdf_p") for k in shots)
    for path in shots.values():
        with Image.open(path) as im:
            gray = im.convert("L")
            # not a blank page: some dark ink (text, axes) on a light page
            assert ImageStat.Stat(gray).extrema[0][0] < 80
            assert gray.size[0] >= 800


def test_a_second_call_resumes_every_stage(planted, planted_run):
    out, first = planted_run
    again = explain(planted.pair, planted.task, out=out, n_boot=N_BOOT, intervention=DECLARED)
    assert set(again.provenance["loaded_stages"]) >= {"shift", "weights", "patching_head_out"}
    assert [c.text for c in again.all_claims()] == [c.text for c in first.all_claims()]
    loaded = Explanation.load(out)
    assert [c.text for c in loaded.all_claims()] == [c.text for c in first.all_claims()]
    with pytest.raises(RunError, match="another pair, task or parameters"):
        explain(planted.pair, planted.task, out=out, n_boot=N_BOOT + 1)


def test_the_null_pair_stops_early_with_a_short_report(tmp_path):
    null = md.zoo.load("null")
    e = explain(null.pair, null.task, out=tmp_path, n_boot=N_BOOT, pdf=False)
    assert e.status == "no_shift" and not e.claims and e.patching == {}
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["shift", "shift.done"]
    doc = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(doc, REPORT_SCHEMA)
    assert doc["status"] == "no_shift" and doc["claims"] == []
    assert "No shift to explain" in (tmp_path / "report.md").read_text()
    assert "nothing to explain" in str(e)


def test_bad_input_is_refused(planted):
    with pytest.raises(ConfigError, match="budget"):
        explain(planted.pair, planted.task, budget="fast")
    with pytest.raises(ConfigError, match="steering_alphas"):
        explain(planted.pair, planted.task, steering_alphas=(float("nan"),))
    with pytest.raises(ConfigError, match="circuit must be"):
        explain(planted.pair, planted.task, circuit="sometimes")
    with pytest.raises(ConfigError, match="alpha"):
        explain(planted.pair, planted.task, alpha=1.5)
    assert Intervention.coerce({"kind": "LoRA", "rank": 8}).extra == {"rank": "8"}


def test_read_task_takes_a_task_table_or_its_keys(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('[task]\nprompts = [[1, 2, 3]]\nanswers = [4]\nwrong = [5]\nname = "t"\n')
    b = tmp_path / "b.toml"
    b.write_text('prompts = [[1, 2, 3]]\nanswers = [4]\nwrong = [5]\nname = "t"\n')
    assert read_task(a).name == read_task(b).name == "t"
    c = tmp_path / "c.toml"
    c.write_text("prompts = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_task(c)


def test_the_cli_explains_a_zoo_pair_and_refuses_bad_arguments(tmp_path):
    from mechdelta.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["explain", "--zoo", "null", "--out", str(tmp_path / "x"),
                              "--no-pdf", "--owner", "qa", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "nothing to explain" in res.output
    assert json.loads((tmp_path / "x" / "report.json").read_text())["intervention"]["owner"] == "qa"
    res = runner.invoke(app, ["explain", "ref", "int", "--out", str(tmp_path / "y")])
    assert res.exit_code == 1 and "--task" in res.output
    res = runner.invoke(app, ["explain", "--out", str(tmp_path / "z")])
    assert res.exit_code == 1 and "REFERENCE INTERVENED" in res.output


def test_in_memory_explanations_write_nothing(planted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    null = md.zoo.load("null")
    e = explain(null.pair, null.task, n_boot=N_BOOT)
    assert e.out is None and e.reports == {} and list(Path(tmp_path).iterdir()) == []
