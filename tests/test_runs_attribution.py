"""Attribution analyses in experiments (``kind = "attribute"`` and ``"attribute_edges"``):
configuration and ids, stored results (with the verification) that reload equal, figures that
regenerate identically, the report's sections, resume after an interruption, damaged
verification files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import mechdelta as md
from mechdelta.attribution._edge_result import EdgeAttribution
from mechdelta.attribution.results import AttributionResult, Verification
from mechdelta.errors import ConfigError, RunCorruptError
from mechdelta.patching.results import BothDirections
from mechdelta.report._build import write_report
from mechdelta.runs import run as runs
from mechdelta.runs.experiment import AnalysisSpec, Experiment
from mechdelta.runs.run import regenerate_figures, run_experiment
from mechdelta.runs.rundir import StoredRun
from tests._tiny_run import (
    ATTRIBUTION_ANALYSES,
    assert_same_files,
    attribution_run_dir,
    tiny_config,
)

NODES = "attribute-head_out-atp-both-v2"
IG = "attribute-head_out-ig-r2i-v1-4df04971"
EDGES = "edges-eap-both"
IDS = ("shift", NODES, IG, EDGES)


@pytest.fixture(scope="module")
def base() -> Path:
    return attribution_run_dir()


@pytest.fixture(scope="module")
def stored(base) -> StoredRun:
    return StoredRun.open(base)


def _copy(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def _fingerprint(run_dir: Path, ids: tuple[str, ...] = IDS) -> dict[str, object]:
    """Every tensor, parquet table and figure JSON of the given analyses of a run."""
    out: dict[str, object] = {}
    for i in ids:
        root = run_dir / "results" / i
        for p in sorted(root.rglob("*.safetensors")):
            out[str(p.relative_to(run_dir))] = load_file(p)
        for p in sorted(root.rglob("*.parquet")):
            out[str(p.relative_to(run_dir))] = pd.read_parquet(p)
        for p in sorted((run_dir / "figures").glob(f"{i}.*json")):
            out[p.name] = p.read_text()
    return out


# --- configuration ----------------------------------------------------------------------------


def _analysis(extra: str) -> Experiment:
    return Experiment.from_toml(f"[pair]\nbuiltin = 'tiny'\n[[analyses]]\n{extra}\n")


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("kind = 'attribute'\ncomponent = 'head_out'\nlayer = [0]", "unknown key 'layer'"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nsites = ['L1H1']", "unknown key 'sites'"),
        ("kind = 'attribute'", "an attribution needs component"),
        ("kind = 'attribute'\ncomponent = 'head_outt'", "unknown component"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nmethod = 'eap'", "unknown method 'eap'"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nsteps = 4", "steps (integration points)"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nmethod = 'ig'\nsteps = 0", "steps must be"),
        ("kind = 'attribute'\ncomponent = 'head_out'\ngraddrop = true", "belongs to method 'atp*'"),
        ("kind = 'attribute'\ncomponent = 'head_out'\ngraddrop = 1", "true or false"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nverify = 0", "verify must be >= 1"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nverify = '4'", "must be an integer"),
        ("kind = 'attribute'\ncomponent = 'head_out'\nlayers = [1, 1]", "duplicates"),
        ("kind = 'attribute'\ncomponent = 'head_out'\ndirection = 'up'", "unknown direction"),
        ("kind = 'attribute_edges'\ncomponent = 'head_out'", "unknown key 'component'"),
        ("kind = 'attribute_edges'\nverify = 3", "unknown key 'verify'"),
        ("kind = 'attribute_edges'\nmethod = 'atp'", "unknown method 'atp'"),
        ("kind = 'attribute_edges'\nsteps = 4", "applies to method 'eap-ig'"),
        ("kind = 'attribute_edges'\nbatch_budget = 0", "batch_budget must be >= 1"),
    ],
)
def test_bad_attribution_keys_are_config_errors(extra, needle):
    with pytest.raises(ConfigError) as err:
        _analysis(extra)
    assert needle in str(err.value)
    assert "[[analyses]] #1" in str(err.value)


def test_keys_of_one_kind_do_not_apply_to_another():
    with pytest.raises(ConfigError, match="'verify' does not apply to kind 'sweep'"):
        AnalysisSpec("sweep", component="head_out", verify=2)
    with pytest.raises(ConfigError, match="'method' does not apply to kind 'patch'"):
        AnalysisSpec("patch", sites=("L1H1",), method="atp")


def test_attribution_ids_are_derived_and_stable():
    exp = _analysis(
        "kind = 'attribute'\ncomponent = 'head_out'\n"
        "[[analyses]]\nkind = 'attribute'\ncomponent = 'head_out'\nmethod = 'ATP*'\n"
        "graddrop = true\nverify = 3\ndirection = 'both'\n"
        "[[analyses]]\nkind = 'attribute'\ncomponent = 'head_out'\nmethod = 'ig'\nsteps = 16\n"
        "[[analyses]]\nkind = 'attribute'\ncomponent = 'head_out'\nmethod = 'ig'\nsteps = 4\n"
        "[[analyses]]\nkind = 'attribute'\ncomponent = 'resid_pre'\npositions = [1]\n"
        "[[analyses]]\nkind = 'attribute_edges'\n"
        "[[analyses]]\nkind = 'attribute_edges'\nmethod = 'eap-ig'\ndirection = 'both'\n"
        "[[analyses]]\nkind = 'attribute_edges'\nmethod = 'eap-ig'\nsteps = 3\nname = 'e3'\n"
    )
    ids = exp.ids
    assert ids[:3] == (
        "attribute-head_out-atp-r2i",
        "attribute-head_out-atpstar-both-gd-v3",
        "attribute-head_out-ig-r2i",  # steps = 16 is the default: same id as without it
    )
    assert ids[3].startswith("attribute-head_out-ig-r2i-") and ids[3] != ids[2]
    assert ids[4].startswith("attribute-resid_pre-atp-r2i-pos-")
    assert ids[5:] == ("edges-eap-r2i", "edges-eap-ig-both", "e3")
    # defaults are filled in and the resolved configuration rebuilds the same experiment
    specs = exp.analyses
    assert specs[0].method == "atp" and specs[0].steps is None
    assert specs[1].method == "atp*" and specs[2].steps == 16 and specs[6].steps == 16
    assert specs[4].params()["per_position"] is True
    again = Experiment.from_resolved(json.loads(json.dumps(exp.to_dict())))
    assert again == exp and again.ids == ids
    ig = "kind = 'attribute'\ncomponent = 'head_out'\nmethod = 'ig'"
    implicit, explicit = _analysis(ig), _analysis(ig + "\nsteps = 16")
    assert implicit.compute_dict() == explicit.compute_dict()


def test_the_example_parses():
    path = Path(__file__).resolve().parents[1] / "examples" / "attribution.toml"
    exp = Experiment.load(path)
    kinds = [a.kind for a in exp.analyses]
    assert "attribute" in kinds and "attribute_edges" in kinds
    node = next(a for a in exp.analyses if a.kind == "attribute")
    assert node.verify == 4


def test_preflight_rejects_an_attribution_grid_the_model_lacks(tmp_path):
    analyses = [{"kind": "attribute", "component": "head_out", "layers": [7]}]
    with pytest.raises(ConfigError, match=r"#1 \(attribute\) cannot run"):
        run_experiment(tiny_config(analyses), tmp_path / "pre", quiet=True)
    assert not (tmp_path / "pre" / "results").exists()


# --- the run ------------------------------------------------------------------------------------


def test_results_reload_equal_to_a_direct_call(stored):
    from mechdelta.core._builtin import tiny_pair
    from mechdelta.runs.run import tiny_task

    assert stored.ids == IDS and stored.manifest["status"] == "complete"
    pair, task = tiny_pair(), tiny_task()
    boot = {"n_boot": 200, "alpha": 0.05, "seed": 3}
    torch.manual_seed(3)
    direct = md.attribute(pair, task, "head_out", "both", "atp", verify=2, **boot)
    loaded = stored.load(NODES)
    assert isinstance(loaded, BothDirections)
    for got, want in zip(loaded, direct, strict=True):
        assert isinstance(got, AttributionResult) and got.method == "atp"
        assert torch.equal(got.per_prompt, want.per_prompt)
        assert torch.equal(got.ci, want.ci)
        v, w = got.verification, want.verification
        assert isinstance(v, Verification) and w is not None
        assert v.sites == w.sites and v.selected == w.selected
        assert torch.equal(v.estimated, w.estimated) and torch.equal(v.exact, w.exact)
        assert str(v) == str(w)

    ig = stored.load(IG)
    assert isinstance(ig, AttributionResult) and ig.method == "ig" and ig.steps == 2
    assert ig.dims == ("layer", "head") and ig.coords["layer"] == (1,)
    assert ig.verification is not None and len(ig.verification.sites) == 2  # top 1 + 1 random

    direct_edges = md.attribute_edges(pair, task, "both", "eap", **boot)
    edges = stored.load(EDGES)
    assert isinstance(edges, BothDirections)
    for got_e, want_e in zip(edges, direct_edges, strict=True):
        assert isinstance(got_e, EdgeAttribution)
        assert got_e.edges == want_e.edges
        assert torch.equal(got_e.per_prompt, want_e.per_prompt)
        assert torch.equal(got_e.bias, want_e.bias)


def test_the_run_directory_holds_the_verification_and_its_table(base, stored):
    root = base / "results" / NODES
    for d in ("reference_to_intervened", "intervened_to_reference"):
        assert (root / "verification" / d / "tensors.safetensors").is_file()
    record = json.loads((root / "analysis.json").read_text())
    assert record["result_type"] == "BothDirections"
    assert any(f.startswith("verification/") for f in record["files"])
    table = pd.read_parquet(root / "verification.parquet")
    assert list(table.columns) == ["direction", "site", "selected", "estimated", "exact", "error"]
    assert len(table) == 8  # top 2 + 2 random, both directions
    assert (base / "results" / IG / "verification" / "reference_to_intervened").is_dir()
    assert not (base / "results" / EDGES / "verification").exists()
    edges = stored.table(EDGES)
    assert {"edge", "sender", "receiver", "input", "score", "fraction"} <= set(edges.columns)
    assert set(edges["direction"]) == {"reference->intervened", "intervened->reference"}
    figures = {p.name for p in (base / "figures").glob("*.json")}
    assert figures == {
        "shift.json",
        f"{NODES}.json",
        f"{NODES}.verification.r2i.json",
        f"{NODES}.verification.i2r.json",
        f"{IG}.json",
        f"{IG}.verification.json",
        f"{EDGES}.r2i.json",
        f"{EDGES}.i2r.json",
    }


def test_figures_regenerate_identically_without_a_model(base, tmp_path, monkeypatch):
    out = _copy(base, tmp_path)
    before = {p.name: p.read_text() for p in (out / "figures").glob("*.json")}
    shutil.rmtree(out / "figures")

    def no_model(*a, **k):
        raise AssertionError("regenerate_figures must not load a model")

    monkeypatch.setattr(runs, "load_pair", no_model)
    written = regenerate_figures(out, quiet=True)
    assert set(written) == {p.removesuffix(".json") for p in before}
    assert {p.name: p.read_text() for p in (out / "figures").glob("*.json")} == before
    scatter = json.loads(before[f"{IG}.verification.json"])
    assert [t["type"] for t in scatter["data"]] == ["scatter", "scatter", "scatter"]
    heat = json.loads(before[f"{EDGES}.r2i.json"])
    assert heat["data"][0]["type"] == "heatmap"


def test_the_report_has_a_section_per_attribution_kind(base, tmp_path):
    out = _copy(base, tmp_path)
    md_path, html_path = write_report(out)
    text = md_path.read_text()
    assert "## Attribution estimate: head_out (atp) (" + NODES + ")" in text
    assert "## Edge attribution (eap)" in text
    assert "Estimated effect of splicing the source model's activation at each site" in text
    assert "method atp" in text and "verify them against exact patching" in text
    assert "method ig" in text and "2 points of the straight path" in text
    assert "edge score = (source write − target write) · ∂metric/∂(receiver input)" in text
    assert "in the target run" in text
    # top rows: the planted head first, sorted by |score|, exact zeros dropped
    node_section = text.split(f"({NODES})")[1].split("## ")[0]
    rows = [r for r in node_section.splitlines() if r.startswith("| L")]
    assert rows[0].startswith("| L1H1 |")
    assert "sites scoring 0 in both left out" in node_section
    assert "| estimated reference → intervened |" in node_section.replace("site | ", "")
    # the verification summary line and figure
    for needle in ("Pearson", "Spearman", "top-5 recall", "max |error|"):
        assert needle in node_section
    assert f"figures/{NODES}.verification.r2i.html" in node_section
    assert f"figures/{IG}.verification.html" in text
    edge_section = text.split("## Edge attribution (eap)")[1].split("## ")[0]
    edge_rows = [r for r in edge_section.splitlines() if r.startswith("| ") and "->" in r]
    assert edge_rows and all("| +0 |" not in r for r in edge_rows)
    scores = [abs(float(r.split("|")[2])) for r in edge_rows]
    assert scores == sorted(scores, reverse=True)
    assert f"figures/{EDGES}.r2i.html" in edge_section
    assert f"figures/{EDGES}.i2r.html" in edge_section
    assert "estimated scores (atp, not exact patches)" in text  # the summary says so
    html = html_path.read_text()
    assert f'id="figure-{NODES}.verification.i2r"' in html
    assert f'id="figure-{EDGES}.i2r"' in html


def test_an_interrupted_attribution_run_resumes_to_identical_results(base, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real = runs.EXECUTORS["attribute_edges"]

    def interrupt(ctx, spec):
        raise KeyboardInterrupt

    monkeypatch.setitem(runs.EXECUTORS, "attribute_edges", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(ATTRIBUTION_ANALYSES), out, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    assert [a["status"] for a in m["analyses"]] == ["complete", "complete", "complete", "pending"]
    node_bytes = {
        p: p.read_bytes() for p in sorted((out / "results" / NODES).rglob("*")) if p.is_file()
    }

    monkeypatch.setitem(runs.EXECUTORS, "attribute_edges", real)
    result = run_experiment(tiny_config(ATTRIBUTION_ANALYSES), out, quiet=True)
    assert result.skipped == IDS[:3] and result.computed == (EDGES,)
    assert {
        p: p.read_bytes() for p in sorted((out / "results" / NODES).rglob("*")) if p.is_file()
    } == node_bytes
    assert_same_files(_fingerprint(out), _fingerprint(base))


def test_a_damaged_verification_is_refused_and_repaired(base, tmp_path):
    out = _copy(base, tmp_path)
    victim = out / "results" / NODES / "verification" / "intervened_to_reference"
    (victim / "tensors.safetensors").write_bytes(b"not tensors")
    with pytest.raises(RunCorruptError, match="intervened_to_reference"):
        StoredRun.open(out).load(NODES)
    result = run_experiment(tiny_config(ATTRIBUTION_ANALYSES), out, quiet=True, repair=True)
    assert result.repaired == (NODES,) and result.computed == (NODES,)
    assert_same_files(_fingerprint(out), _fingerprint(base))
