"""Run directories: layout and manifest, resume after an interruption, figure regeneration,
corrupt or partial directories, and weight hashes in the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mechdelta.errors import ConfigError, RunError
from mechdelta.runs import run as runs
from mechdelta.runs.run import regenerate_figures, run_experiment
from mechdelta.runs.rundir import StoredRun
from tests._tiny_run import ANALYSES, IDS, base_run_dir, copy_run, tiny_config

SMALL = ANALYSES[:3]  # shift, sweep, patch


@pytest.fixture(scope="module")
def base_run():
    out = base_run_dir()
    return out, StoredRun.open(out)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return copy_run(tmp_path)


def _fingerprint(run_dir: Path, ids: tuple[str, ...] = IDS) -> dict[str, object]:
    """Every tensor, parquet table and figure JSON of the given analyses of a run."""
    out: dict[str, object] = {}
    for i in ids:
        for p in sorted((run_dir / "results" / i).rglob("*.safetensors")):
            out[str(p.relative_to(run_dir))] = load_file(p)
        out[f"{i}.parquet"] = pd.read_parquet(run_dir / "results" / i / "table.parquet")
        out[f"{i}.figure"] = (run_dir / "figures" / f"{i}.json").read_text()
    return out


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert sorted(x) == sorted(y), key
            for name in x:
                assert torch.equal(x[name], y[name]), f"{key}:{name}"
        elif isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y)
        else:
            assert x == y, key


def test_run_layout_and_manifest(base_run):
    from mechdelta.core._builtin import tiny_pair

    out, stored = base_run
    ids = list(IDS)
    assert list(stored.ids) == ids
    m = json.loads((out / "manifest.json").read_text())
    assert m["sessions"][0]["computed"] == ids and m["sessions"][0]["skipped"] == []
    assert m["status"] == "complete" and m["format"] == "mechdelta-run"
    env = m["environment"]
    assert {"mechdelta", "transformer_lens", "torch"} <= set(env)
    assert env["torch"] == torch.__version__
    pair = tiny_pair()
    assert m["models"]["reference"]["weights_hash"] == pair.reference_hash
    assert m["models"]["intervened"]["weights_hash"] == pair.intervened_hash
    assert m["models"]["tokenizer_hash"] == pair.tokenizer_hash
    prepared = runs.tiny_task().prepare(None, n_ctx=32, d_vocab=64)
    assert m["task"]["prompt_hash"] == prepared.prompt_hash()
    assert m["seeds"] == {"seed": 3, "n_boot": 200, "alpha": 0.05}
    assert m["config"]["analyses"][1]["id"] == "sweep-head_out-both"
    assert set(m["timings"]["analyses_s"]) == set(ids)
    assert all(a["status"] == "complete" and a["seconds"] >= 0 for a in m["analyses"])
    for i in ids:
        d = out / "results" / i
        assert (d / "analysis.json").is_file() and (d / "table.parquet").is_file()
        assert (out / "figures" / f"{i}.json").is_file()
        assert (out / "figures" / f"{i}.html").is_file()
    assert not list(out.rglob("*.tmp"))
    # stored results are the analyses' own results: the planted head explains the shift
    sweep = stored.load("sweep-head_out-both")
    for r in sweep:
        assert str(r.top(1)[0].site) == "L1H1" and r.top(1)[0].score == pytest.approx(1, abs=1e-3)
    table = StoredRun.open(out).table("sweep-head_out-both")
    assert len(table) == 16 and set(table["direction"]) == {
        "reference->intervened",
        "intervened->reference",
    }


def test_figures_regenerate_identically_without_a_model(base_run, tmp_path, monkeypatch):
    out = _copy(base_run[0], tmp_path)
    before = {p.name: p.read_text() for p in (out / "figures").glob("*.json")}
    html_before = {p.name: p.read_bytes() for p in (out / "figures").glob("*.html")}
    shutil.rmtree(out / "figures")

    def no_model(*a, **k):
        raise AssertionError("regenerate_figures must not load a model")

    monkeypatch.setattr(runs, "load_pair", no_model)
    written = regenerate_figures(out, quiet=True)
    assert set(written) == {p.removesuffix(".json") for p in before}
    after = {p.name: p.read_text() for p in (out / "figures").glob("*.json")}
    assert after == before
    assert {p.name: p.read_bytes() for p in (out / "figures").glob("*.html")} == html_before
    regenerate_figures(out, quiet=True)  # and again: still identical
    assert {p.name: p.read_text() for p in (out / "figures").glob("*.json")} == before


def test_interrupted_run_resumes_with_identical_results(base_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real = runs.EXECUTORS["sweep"]

    def interrupt(ctx, spec):
        raise KeyboardInterrupt

    monkeypatch.setitem(runs.EXECUTORS, "sweep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(SMALL), out, quiet=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"
    assert [a["status"] for a in m["analyses"]] == ["complete", "pending", "pending"]
    stored = StoredRun.open(out)
    assert stored.is_complete("shift") and not stored.is_complete("sweep-head_out-both")
    with pytest.raises(RunError, match="partial"):
        regenerate_figures(out)
    shift_bytes = (out / "results" / "shift" / "tensors.safetensors").read_bytes()

    monkeypatch.setitem(runs.EXECUTORS, "sweep", real)
    result = run_experiment(tiny_config(SMALL), out, quiet=True)
    assert result.skipped == ("shift",)
    assert result.computed == ("sweep-head_out-both", "patch-L1H1+L0H2-both")
    assert (out / "results" / "shift" / "tensors.safetensors").read_bytes() == shift_bytes
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["sessions"]) == 2
    # identical to the uninterrupted run (each analysis depends only on its own config + seeds)
    ids = IDS[:3]
    _assert_same(_fingerprint(out, ids), _fingerprint(base_run[0], ids))

    # a third launch finds everything complete and recomputes nothing
    again = run_experiment(tiny_config(SMALL), out, quiet=True)
    assert again.computed == () and again.skipped == ids
    _assert_same(_fingerprint(out, ids), _fingerprint(base_run[0], ids))


def test_a_half_written_analysis_is_recomputed(base_run, tmp_path):
    out = _copy(base_run[0], tmp_path)
    victim = out / "results" / "patch-L1H1+L0H2-both"
    (victim / "analysis.json").unlink()  # as if killed after the tensors, before the marker
    (victim / "reference_to_intervened" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"partial: 1 of 5 analyses .*patch-L1H1\+L0H2-both"):
        regenerate_figures(out)
    result = run_experiment(tiny_config(), out, quiet=True)
    assert result.computed == ("patch-L1H1+L0H2-both",)
    _assert_same(_fingerprint(out), _fingerprint(base_run[0]))


def test_resume_refuses_another_experiment(base_run, tmp_path):
    out = _copy(base_run[0], tmp_path)
    cfg = tiny_config()
    cfg["run"] = {"n_boot": 300, "seed": 3}
    with pytest.raises(
        RunError, match=r"different experiment \(run.n_boot: stored 200, now 300\).*new --out"
    ):
        run_experiment(cfg, out, quiet=True)
    # output options do not change results: resuming with other figure formats is fine
    ok = run_experiment(tiny_config(figures=["html"], top_k=3), out, quiet=True)
    assert ok.computed == ()
    # overwrite replaces the run
    small = tiny_config([{"kind": "weight_diff"}])
    fresh = run_experiment(small, out, quiet=True, overwrite=True)
    assert fresh.computed == ("weight_diff",) and not (out / "results" / "shift").exists()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json: not a mechdelta run"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "is corrupt"),
        (
            lambda d: (d / "manifest.json").write_text('{"format": "x"}'),
            "not a mechdelta run manifest",
        ),
        (
            lambda d: (d / "results" / "shift" / "tensors.safetensors").write_bytes(b"\0" * 10),
            "tensors.safetensors' is corrupt",
        ),
        (lambda d: (d / "results" / "weight_diff" / "table.parquet").unlink(), "is missing"),
        (lambda d: (d / "results" / "factorial" / "analysis.json").write_text("[]"), "is corrupt"),
        (lambda d: shutil.rmtree(d / "results" / "factorial"), "partial"),
    ],
)
def test_corrupt_or_partial_run_dirs_raise_run_error(base_run, tmp_path, damage, needle):
    from mechdelta import write_report

    out = _copy(base_run[0], tmp_path)
    damage(out)
    with pytest.raises(RunError, match=needle):
        regenerate_figures(out, quiet=True)
    with pytest.raises(RunError, match=needle):
        write_report(out)


def test_out_dir_that_is_not_a_run_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not a mechdelta run directory"):
        run_experiment(tiny_config([{"kind": "weight_diff"}]), out, quiet=True)
    with pytest.raises(RunError):
        run_experiment(tiny_config([{"kind": "weight_diff"}]), out, quiet=True, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(RunError, match="not a directory"):
        regenerate_figures(tmp_path / "absent")


def test_preflight_rejects_analyses_before_computing_any(tmp_path):
    out = tmp_path / "pre"
    bad = [{"kind": "shift"}, {"kind": "sweep", "component": "head_out", "layers": [5]}]
    with pytest.raises(ConfigError, match=r"#2 \(sweep\) cannot run .*layers \[5\] out of range"):
        run_experiment(tiny_config(bad), out, quiet=True)
    assert not (out / "results").exists()


def test_manifest_hashes_follow_the_weights(tmp_path, tokenizer):
    from tests import _builders

    def save(model, name):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    ref = save(_builders.hf_model("gpt2", len(tokenizer), seed=0, n_layers=2), "ref")
    itv_model = _builders.hf_model("gpt2", len(tokenizer), seed=0, n_layers=2)
    with torch.no_grad():
        itv_model.transformer.h[1].attn.c_proj.weight.mul_(1.5)
    itv = save(itv_model, "itv")
    cfg = {
        "pair": {"reference": ref, "intervened": itv, "device": "cpu"},
        "task": {"prompts": ["the cat sat on the mat", "hello world"], "metric": "kl_to_reference"},
        "run": {"n_boot": 200},
        "output": {"figures": ["html"]},
        "analyses": [{"kind": "weight_diff"}],
    }
    first = run_experiment(cfg, tmp_path / "first", quiet=True).manifest["models"]
    with torch.no_grad():
        itv_model.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    save(itv_model, "itv")  # same path, new weights
    with pytest.raises(RunError, match=r"other intervened weights \(hash .*new --out"):
        run_experiment(cfg, tmp_path / "first", quiet=True)
    second = run_experiment(cfg, tmp_path / "second", quiet=True).manifest["models"]
    assert second["reference"]["weights_hash"] == first["reference"]["weights_hash"]
    assert second["intervened"]["weights_hash"] != first["intervened"]["weights_hash"]
    assert second["tokenizer_hash"] == first["tokenizer_hash"] != "none"
