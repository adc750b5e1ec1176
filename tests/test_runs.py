"""Run directories: layout and manifest, resume after an interruption, figure regeneration,
corrupt or partial directories and their repair, overwrite, warnings once per run, and weight
hashes in the manifest. (The directory lock with real processes: test_run_lock.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mechdelta.errors import ConfigError, RunCorruptError, RunError, RunIncompleteError
from mechdelta.patching.shift import ShiftNotSignificantWarning
from mechdelta.report._build import write_report
from mechdelta.runs import _controls
from mechdelta.runs import run as runs
from mechdelta.runs._lock import LOCK_FILE
from mechdelta.runs.experiment import Experiment
from mechdelta.runs.run import regenerate_figures, run_experiment
from mechdelta.runs.rundir import StoredRun
from tests._tiny_run import (
    ANALYSES,
    IDS,
    NOT_SIGNIFICANT_TOML,
    assert_same_files,
    base_run_dir,
    copy_run,
    fingerprint,
    tiny_config,
)

SMALL = ANALYSES[:3]  # shift, sweep, patch


@pytest.fixture(scope="module")
def base_run():
    out = base_run_dir()
    return out, StoredRun.open(out)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return copy_run(tmp_path)


def _fingerprint(run_dir: Path, ids: tuple[str, ...] = IDS) -> dict[str, object]:
    return fingerprint(run_dir, ids)


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
    assert not (out / LOCK_FILE).exists()  # the lock is released on Ctrl-C too
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"
    assert [a["status"] for a in m["analyses"]] == ["complete", "pending", "pending"]
    stored = StoredRun.open(out)
    assert stored.is_complete("shift") and not stored.is_complete("sweep-head_out-both")
    with pytest.raises(RunIncompleteError, match="partial"):
        regenerate_figures(out)
    with pytest.raises(RunIncompleteError, match="partial"):
        write_report(out)
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
    assert_same_files(_fingerprint(out, ids), _fingerprint(base_run[0], ids))

    # a third launch finds everything complete and recomputes nothing
    again = run_experiment(tiny_config(SMALL), out, quiet=True)
    assert again.computed == () and again.skipped == ids
    assert_same_files(_fingerprint(out, ids), _fingerprint(base_run[0], ids))


def test_a_half_written_analysis_is_recomputed(base_run, tmp_path):
    out = _copy(base_run[0], tmp_path)
    victim = out / "results" / "patch-L1H1+L0H2-both"
    (victim / "analysis.json").unlink()  # as if killed after the tensors, before the marker
    (victim / "reference_to_intervened" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"partial: 1 of 5 analyses .*patch-L1H1\+L0H2-both"):
        regenerate_figures(out)
    result = run_experiment(tiny_config(), out, quiet=True)
    assert result.computed == ("patch-L1H1+L0H2-both",)
    assert_same_files(_fingerprint(out), _fingerprint(base_run[0]))


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
    (out / "manifest.json").write_text("{not json")  # a damaged manifest among other files
    with pytest.raises(RunError, match="is corrupt") as info:
        run_experiment(tiny_config([{"kind": "weight_diff"}]), out, quiet=True, overwrite=True)
    assert "--overwrite" not in str(info.value)
    assert (out / "notes.txt").read_text() == "keep me" and not (out / LOCK_FILE).exists()
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


def test_interrupted_while_writing_figures_gets_no_report_until_resumed(
    base_run, tmp_path, monkeypatch
):
    out = tmp_path / "run"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_write_figures", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(SMALL), out, quiet=True)
    assert StoredRun.open(out).incomplete() == ()  # every analysis is stored, the figures not
    with pytest.raises(
        RunIncompleteError, match=r"incomplete: its manifest says status 'running'.*mechdelta run"
    ):
        write_report(out)
    assert not (out / "report.md").exists()
    monkeypatch.undo()
    again = run_experiment(tiny_config(SMALL), out, quiet=True)
    assert again.computed == () and again.skipped == IDS[:3]
    md, _ = write_report(out)
    for i in IDS[:3]:
        assert (out / "figures" / f"{i}.html").is_file() and f"(figures/{i}.html)" in md.read_text()


def test_a_failing_run_releases_the_lock(tmp_path):
    out = tmp_path / "pre"
    bad = [{"kind": "sweep", "component": "head_out", "layers": [5]}]
    with pytest.raises(ConfigError):
        run_experiment(tiny_config(bad), out, quiet=True)
    assert not (out / LOCK_FILE).exists()
    run_experiment(tiny_config([{"kind": "weight_diff"}]), out, quiet=True)  # not locked


def _damage_tensors(d: Path) -> str:
    (d / "results" / "shift" / "tensors.safetensors").write_bytes(b"\0" * 10)
    return "shift"


def _damage_record(d: Path) -> str:
    (d / "results" / "factorial" / "analysis.json").write_text("{not json")
    return "factorial"


def _remove_table(d: Path) -> str:
    (d / "results" / "weight_diff" / "table.parquet").unlink()
    return "weight_diff"


@pytest.mark.parametrize("damage", [_damage_tensors, _damage_record, _remove_table])
def test_repair_recomputes_only_the_damaged_analysis(base_run, tmp_path, damage):
    out = _copy(base_run[0], tmp_path)
    victim = damage(out)
    with pytest.raises(RunCorruptError) as info:
        run_experiment(tiny_config(), out, quiet=True)
    msg = str(info.value)
    assert f"analysis {victim!r}" in msg
    assert f"mechdelta run EXPERIMENT.toml --out {out} --repair" in msg
    assert "--overwrite" in msg and "\n" not in msg
    other = sorted(set(IDS) - {victim})
    untouched = {i: (out / "results" / i / "analysis.json").read_bytes() for i in other}

    result = run_experiment(tiny_config(), out, quiet=True, repair=True)
    assert result.computed == (victim,) and result.repaired == (victim,)
    assert sorted(result.skipped) == other
    assert str(result).endswith("1 analyses computed, 4 already complete, 1 repaired")
    assert {i: (out / "results" / i / "analysis.json").read_bytes() for i in other} == untouched
    assert_same_files(_fingerprint(out), _fingerprint(base_run[0]))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["sessions"][-1]["repaired"] == [victim]
    # a repaired run is an ordinary run again
    assert run_experiment(tiny_config(), out, quiet=True, repair=True).computed == ()


def test_the_resume_command_names_the_experiment_file(base_run, tmp_path):
    from tests._tiny_run import TOML

    src = tmp_path / "exp.toml"
    src.write_text(TOML)
    out = tmp_path / "run"
    run_experiment(src, out, quiet=True)
    (out / "results" / "shift" / "tensors.safetensors").write_bytes(b"\0")
    with pytest.raises(RunCorruptError, match=rf"`mechdelta run {src} --out {out} --repair`"):
        run_experiment(src, out, quiet=True)
    assert run_experiment(src, out, quiet=True, repair=True).repaired == ("shift",)


def test_overwrite_and_repair_exclude_each_other_and_overwrite_starts_over(base_run, tmp_path):
    out = _copy(base_run[0], tmp_path)
    with pytest.raises(RunError, match="pass only one"):
        run_experiment(tiny_config(), out, quiet=True, overwrite=True, repair=True)
    # a damaged manifest: not repairable (nothing vouches for the stored results), but it can
    # be overwritten
    (out / "manifest.json").write_text("{not json")
    for repair in (False, True):
        with pytest.raises(RunError, match=r"is corrupt.*start it over with .*--overwrite"):
            run_experiment(tiny_config(), out, quiet=True, repair=repair)
    fresh = run_experiment(tiny_config(SMALL), out, quiet=True, overwrite=True)
    assert fresh.computed == IDS[:3] and not (out / "results" / "factorial").exists()
    assert not (out / LOCK_FILE).exists()


def test_each_distinct_warning_is_shown_once_per_run(tmp_path):
    exp = Experiment.from_toml(NOT_SIGNIFICANT_TOML)
    with pytest.warns(ShiftNotSignificantWarning) as caught:
        run_experiment(exp, tmp_path / "run", quiet=True)
    shown = [w for w in caught if issubclass(w.category, ShiftNotSignificantWarning)]
    assert len(shown) == 1, [str(w.message) for w in caught]
    # each analysis still records the warnings it raised
    stored = StoredRun.open(tmp_path / "run")
    for i in stored.ids:
        warned = stored.record(i)["warnings"]
        assert any(w.startswith("ShiftNotSignificantWarning") for w in warned), i


def test_several_damaged_analyses_are_named_and_repaired_together(base_run, tmp_path):
    out = _copy(base_run[0], tmp_path)
    _damage_tensors(out)
    _damage_record(out)
    with pytest.raises(
        RunCorruptError, match=r"2 stored analyses are damaged \(shift, factorial\)"
    ):
        run_experiment(tiny_config(), out, quiet=True)
    result = run_experiment(tiny_config(), out, quiet=True, repair=True)
    assert result.repaired == ("shift", "factorial") == result.computed
    assert_same_files(_fingerprint(out), _fingerprint(base_run[0]))


def test_split_halves_are_part_of_the_sweep_and_resume_with_it(base_run, tmp_path, monkeypatch):
    """The split-half reliability is stored inside the sweep's directory before its marker: a
    run interrupted while computing it resumes by redoing the sweep, to identical files."""
    sweep_id = "sweep-head_out-both"
    stored = base_run[1]
    rel = stored.reliability(sweep_id)
    assert set(rel) == {"reference->intervened", "intervened->reference"}
    for r in rel.values():  # the tiny pair: only L1H1 changed, in both halves
        assert r.sites[int(r.scores_a.abs().argmax())] == "L1H1" and r.k == 2
    assert stored.record(sweep_id)["reliability"]["prompts_per_half"] == 8
    assert stored.reliability("patch-L1H1+L0H2-both") is None  # joint patches rank no sites
    assert "reliability" not in stored.record("patch-L1H1+L0H2-both")
    assert (base_run[0] / "figures" / f"{sweep_id}.reliability.html").is_file()

    out = tmp_path / "interrupted"
    real = _controls._split_half

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(_controls, "_split_half", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(SMALL), out, quiet=True)
    run = StoredRun.open(out)
    assert run.is_complete("shift") and not run.is_complete(sweep_id)
    monkeypatch.setattr(_controls, "_split_half", real)
    result = run_experiment(tiny_config(SMALL), out, quiet=True)
    assert result.computed == (sweep_id, "patch-L1H1+L0H2-both")
    files = _fingerprint(out, IDS[:3])
    assert any("reliability" in k for k in files)
    assert_same_files(files, _fingerprint(base_run[0], IDS[:3]))


def test_a_damaged_reliability_is_refused_and_repaired(base_run, tmp_path):
    out = _copy(base_run[0], tmp_path)
    victim = out / "results" / "sweep-head_out-both" / "reliability" / "intervened_to_reference"
    (victim / "tensors.safetensors").write_bytes(b"not tensors")
    with pytest.raises(RunCorruptError, match="reliability"):
        StoredRun.open(out).reliability("sweep-head_out-both")
    result = run_experiment(tiny_config(), out, quiet=True, repair=True)
    assert result.repaired == ("sweep-head_out-both",)
    assert_same_files(_fingerprint(out), _fingerprint(base_run[0]))


def test_a_task_too_small_for_split_halves_says_so(tmp_path):
    exp = Experiment.from_toml(NOT_SIGNIFICANT_TOML)  # 6 prompts
    with pytest.warns(ShiftNotSignificantWarning):
        run_experiment(exp, tmp_path / "run", quiet=True)
    stored = StoredRun.open(tmp_path / "run")
    sweep_id = stored.ids[1]
    assert stored.reliability(sweep_id) is None
    assert stored.record(sweep_id)["reliability"] == {
        "skipped": "the task has 6 prompts; split halves need at least 8 (4 per half)"
    }
    assert not (tmp_path / "run" / "figures" / f"{sweep_id}.reliability.json").exists()
