"""The command line end to end: run (resume, --repair, --overwrite), figures, report, demo; exit
codes, error messages, --help, and warnings shown once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechdelta.cli import app
from tests._tiny_run import NOT_SIGNIFICANT_TOML, TOML, copy_run

runner = CliRunner()


def test_run_figures_report_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TOML)
    res = runner.invoke(app, ["run", "tiny.toml", "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "tiny-test"  # default --out: runs/<experiment name>
    assert (out / "manifest.json").is_file()
    assert "Top sites of sweep-head_out-both" in res.stdout
    lines = res.stdout.splitlines()
    l1h1 = next(ln for ln in lines if ln.startswith("L1H1"))
    assert l1h1.split()[1] == "+1.000"
    assert "Run directory: runs/tiny-test (2 analyses computed, 0 already complete)" in res.stdout
    assert res.stderr == ""  # --quiet: no progress output

    before = (out / "figures" / "sweep-head_out-both.json").read_text()
    res = runner.invoke(app, ["figures", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "Wrote 6 files for 3 figures" in res.stdout  # with the sweep's reliability figure
    assert (out / "figures" / "sweep-head_out-both.json").read_text() == before

    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert f"Report: {out / 'report.html'}" in res.stdout
    assert (out / "report.md").read_text().startswith("# Transition report: tiny-test")

    # re-running resumes: nothing to compute; progress is on stderr without --quiet
    res = runner.invoke(app, ["run", "tiny.toml", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(0 analyses computed, 2 already complete)" in res.stdout
    assert "complete, skipped" in res.stderr

    # a damaged result: refused, with both ways out named, in one line
    (out / "results" / "shift" / "tensors.safetensors").write_bytes(b"\0" * 10)
    res = runner.invoke(app, ["run", "tiny.toml", "--out", str(out), "-q"])
    assert res.exit_code == 1 and res.stdout == "" and res.stderr.count("\n") == 1
    assert "tensors.safetensors' is corrupt" in res.stderr
    assert f"`mechdelta run {tmp_path / 'tiny.toml'} --out {out} --repair`" in res.stderr
    assert "--overwrite" in res.stderr
    res = runner.invoke(app, ["run", "tiny.toml", "--out", str(out), "--repair", "--overwrite"])
    assert res.exit_code == 1 and "pass only one" in res.stderr
    res = runner.invoke(app, ["run", "tiny.toml", "--out", str(out), "--repair", "-q"])
    assert res.exit_code == 0, res.output
    assert "(1 analyses computed, 1 already complete, 1 repaired)" in res.stdout
    res = runner.invoke(app, ["run", "tiny.toml", "--out", str(out), "--overwrite", "-q"])
    assert res.exit_code == 0, res.output
    assert "(2 analyses computed, 0 already complete)" in res.stdout
    assert not (out / "report.md").exists()  # overwritten: the old report went with the results


def test_help_shows_flags_as_flags():
    res = runner.invoke(app, ["run", "--help"])
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.stdout and "--no-" not in res.stdout
    lines = [ln.strip() for ln in res.stdout.splitlines()]
    for flag in ("-q, --quiet", "--repair", "--overwrite", "--help"):
        assert any(ln.startswith(f"{flag} ") or ln == flag for ln in lines), flag
    assert any(ln.startswith("-o, --out <path>") for ln in lines)
    for command in ("figures", "report", "demo"):
        assert "<bool>" not in runner.invoke(app, [command, "--help"]).stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "missing.toml"], "error: experiment file 'missing.toml' does not exist"),
        (
            ["run", "bad.toml"],
            "error: [run]: unknown key 'seeds'; allowed keys: seed, n_boot, alpha",
        ),
        (["figures", "nowhere"], "error: 'nowhere' is not a directory"),
        (["report", "."], "has no manifest.json"),
    ],
)
def test_mechdelta_errors_exit_1_with_a_message(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text(TOML.replace("seed = 3", "seeds = 3"))
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output and res.stdout == ""


def test_partial_run_dir_exit_1(tmp_path):
    run_dir = copy_run(tmp_path)
    (run_dir / "results" / "shift" / "analysis.json").unlink()
    res = runner.invoke(app, ["figures", str(run_dir)])
    assert res.exit_code == 1 and "is partial" in res.stderr and "resume" in res.stderr


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["run"]).exit_code == 2
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["run", "x.toml", "--colour"]).exit_code == 2


def _check_demo_output(stdout: str, out: Path) -> None:
    lines = stdout.rstrip().splitlines()
    assert lines[0].startswith("mechdelta demo: the 'induction' zoo pair")
    assert any(ln.startswith("Shift: ") for ln in lines)
    header = next(i for i, ln in enumerate(lines) if ln.startswith("site "))
    assert "reference → intervened" in lines[header] and "intervened → reference" in lines[header]
    table = lines[header + 2 : header + 2 + 8]
    assert all(ln.startswith("L") and ln.count("[") == 2 for ln in table)
    # it ends with the table, the run directory and the report path
    assert lines[-2].startswith(f"Run directory: {out}")
    assert lines[-1] == f"Report: {out / 'report.html'} (Markdown: {out / 'report.md'})"
    assert lines[-3] == "" and lines[-4] == table[-1]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["pair"]["zoo"] == "induction"
    assert (out / "figures" / "sweep-head_out-both.html").is_file()
    assert (out / "report.html").is_file()


def test_not_significant_shift_warns_once_and_zero_scores_are_not_listed(tmp_path):
    """-q silences progress, not warnings: each distinct warning is one line, shown once."""
    exe = Path(sys.executable).with_name("mechdelta")
    (tmp_path / "ns.toml").write_text(NOT_SIGNIFICANT_TOML)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(exe), "run", "ns.toml", "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("warning: ShiftNotSignificantWarning: the shift is not")
    # the layer-0 sweep: every score is exactly 0, so no site is listed as "top"
    assert "Top sites of sweep-head_out-r2i-" in proc.stdout
    assert "no site changed the metric (every site scored exactly 0)." in proc.stdout
    assert "+0.000" not in proc.stdout and "L0H" not in proc.stdout
    md = Path(runner.invoke(app, ["report", str(out)]).stdout.split("Markdown: ")[1].strip())
    text = md.read_text()
    assert "Largest scores" not in text and "| L0H" not in text
    assert "no site changed the metric (every site scored exactly 0)" in text
    # no claims (the shift itself is not warranted), and no split halves of 6 prompts
    assert "No warranted claims in sweep-head_out-r2i-" in text
    assert "No warranted claims: the shift's interval contains 0" in text
    assert (
        "Reliability (split halves): not computed: the task has 6 prompts; split halves need at "
        "least 8 (4 per half)." in text
    )


def test_demo_in_process_without_a_browser(tmp_path, monkeypatch):
    """The demo's experiment allows HTML-only figures: with no browser it notes the skipped PNGs
    (even with --quiet) and still succeeds. (The subprocess test below uses the real browser.)"""
    import mechdelta.plotting
    from mechdelta.errors import ExportError

    def no_browser():
        raise ExportError("no browser (test)")

    monkeypatch.setattr(mechdelta.plotting, "find_browser", no_browser)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["demo", "--quiet"])
    assert res.exit_code == 0, res.output
    out = Path("runs/demo")
    _check_demo_output(res.stdout, out)
    assert "static figures skipped (png)" in res.stderr
    assert not list((out / "figures").glob("*.png"))
    m = json.loads((out / "manifest.json").read_text())
    assert "no browser (test)" in m["static_figures_skipped"]
    # a second demo replaces the first run directory rather than resuming it
    res = runner.invoke(app, ["demo", "--quiet"])
    assert res.exit_code == 0 and "Run directory: runs/demo (3 analyses)" in res.stdout


def test_demo_subprocess(tmp_path):
    exe = Path(sys.executable).with_name("mechdelta")
    assert exe.is_file(), f"{exe} missing: install the package (bash scripts/setup.sh)"
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "error"}
    proc = subprocess.run(
        [str(exe), "demo", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    _check_demo_output(proc.stdout, out)
    assert (out / "figures" / "sweep-head_out-both.png").stat().st_size > 1000
    # --quiet: no progress, and no warning or error from mechdelta (with warnings as errors)
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith(("warning:", "error:"))]
    assert "it/s]" not in proc.stderr


def test_report_alpha_sets_the_level_of_the_claims(tmp_path):
    run_dir = copy_run(tmp_path)
    criteria = "Criteria: q < {} (sign-flip permutation test over prompts"
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    default = (run_dir / "report.md").read_text()
    assert criteria.format("0.05") in default and "Claims here are at alpha" not in default
    res = runner.invoke(app, ["report", str(run_dir), "--alpha", "0.01"])
    assert res.exit_code == 0, res.output
    text = (run_dir / "report.md").read_text()
    assert criteria.format("0.01") in text and criteria.format("0.05") not in text
    assert "Warranted claims in sweep-head_out-both (q < 0.01," in text
    assert "Claims here are at alpha = 0.01; the run's figure files (figures/) grey" in text
    res = runner.invoke(app, ["report", str(run_dir), "--alpha", "1.5"])
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr == "error: alpha=1.5 must lie in (0, 1), e.g. 0.05\n"
    assert runner.invoke(app, ["report", str(run_dir), "--alpha", "x"]).exit_code == 2
    help_text = runner.invoke(app, ["report", "--help"]).stdout
    assert "--alpha LEVEL" in help_text and "q < LEVEL" in help_text
