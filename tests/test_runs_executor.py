"""Executors in runs: the ``[executor]`` table (parsing, validation, resolved form, not part of
the run's identity), shards written into RUN/shards as they finish, an interrupted run resumed
from its stored shards (counted) with the results of an uninterrupted run, and the command
line's --executor / --address / --workers / --gpus-per-worker overriding the table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from mechdelta.cli import app
from mechdelta.errors import ConfigError
from mechdelta.runs import run as runs
from mechdelta.runs._executor_spec import SHARDS_DIR, ExecutorSpec
from mechdelta.runs.experiment import Experiment
from mechdelta.runs.run import run_experiment
from mechdelta.scale import _shards
from mechdelta.scale.executor import LocalExecutor
from tests._tiny_run import assert_same_files, fingerprint, tiny_config

# six prompts (no split halves), one row per forward: each shard is one site (or the patch's
# joint variant) x one prompt. The sweep of the 8 heads runs L1H1 only (the other heads' outputs
# are bitwise equal in both models, which the engine skips): 6 shards; the patch of two sites
# jointly, both directions: 2 x 6 shards
TASK: dict[str, Any] = {
    "prompts": [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [9, 10, 11, 12, 13, 14, 15, 16],
        [3, 5, 7, 9, 11, 13, 15, 17],
        [20, 21, 22, 23, 24, 25, 26, 27],
        [30, 2, 31, 4, 32, 6, 33, 8],
        [40, 41, 40, 41, 40, 41, 40, 41],
    ],
    "metric": "kl_to_reference",
}
ANALYSES: list[dict[str, Any]] = [
    {"kind": "shift"},
    {
        "kind": "sweep",
        "component": "head_out",
        "direction": "reference->intervened",
        "batch_budget": 1,
    },
    {"kind": "patch", "sites": ["L1H1", "L0H2"], "direction": "both", "batch_budget": 1},
]
N_SHARDS = 6 + 12
IDS = ("shift", "sweep-head_out-r2i", "patch-L1H1+L0H2-both")

runner = CliRunner()


def _config(**executor: Any) -> dict[str, Any]:
    cfg = {**tiny_config(ANALYSES), "task": TASK}
    if executor:
        cfg["executor"] = executor
    return cfg


def _fingerprint(run_dir: Path, ids: tuple[str, ...] = IDS) -> dict[str, object]:
    return fingerprint(run_dir, ids)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The experiment run by the plain in-process loop (no executor, nothing stored)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    result = run_experiment(_config(shards=False), out, quiet=True)
    assert result.manifest["executor"]["info"] is None
    return out


class _Writes:
    """Counts shard files written (ShardStore.write); raises after ``stop_after`` of them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
        self.n = 0
        self.seen_files: list[Path] = []
        original = _shards.ShardStore.write

        def write(store: Any, shard: Any, values: Any) -> None:
            if stop_after is not None and self.n >= stop_after:
                raise RuntimeError("simulated interruption")
            original(store, shard, values)
            self.n += 1
            self.seen_files.append(store.path(shard.index))

        monkeypatch.setattr(_shards.ShardStore, "write", write)


# --- the [executor] table -----------------------------------------------------------------------


def test_executor_table_parses_and_defaults():
    exp = Experiment.from_dict(_config())
    assert exp.executor == ExecutorSpec()
    assert exp.executor.kind == "local" and exp.executor.shards is True
    toml = """name = "x"
[pair]
builtin = "tiny"
[executor]
kind = "Ray"
address = "ray://head:10001"
num_workers = 3
gpus_per_worker = 1
cpus_per_worker = 2
shards = false
[[analyses]]
kind = "shift"
"""
    spec = Experiment.from_toml(toml).executor
    assert spec == ExecutorSpec("ray", "ray://head:10001", 3, 1.0, 2.0, False)
    assert isinstance(spec.gpus_per_worker, float) and isinstance(spec.cpus_per_worker, float)
    # the resolved form round-trips; a manifest of an older run (no executor key) reads as local
    exp = Experiment.from_toml(toml)
    assert Experiment.from_resolved(exp.to_dict()).executor == spec
    old = {k: v for k, v in exp.to_dict().items() if k != "executor"}
    assert Experiment.from_resolved(old).executor == ExecutorSpec()
    # not part of the run's identity: another executor resumes the same run
    without = Experiment.from_resolved(old)
    assert exp.executor != without.executor
    assert exp.compute_dict() == without.compute_dict()
    assert "executor" not in exp.compute_dict()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"kind": "ray", "adress": "auto"},
            r"\[executor\]: unknown key 'adress'; allowed keys: kind, address, num_workers, "
            r"gpus_per_worker, cpus_per_worker, shards",
        ),
        ({"kind": "dask"}, r"\[executor\] kind must be one of 'local', 'ray', got 'dask'"),
        ({"kind": 3}, r"\[executor\] kind must be a non-empty string"),
        ({"kind": "ray", "num_workers": 0}, r"\[executor\] num_workers must be >= 1, got 0"),
        ({"kind": "ray", "num_workers": 1.5}, r"\[executor\] num_workers must be an integer"),
        ({"kind": "ray", "gpus_per_worker": -1}, r"\[executor\] gpus_per_worker must be >= 0"),
        ({"kind": "ray", "cpus_per_worker": -1}, r"\[executor\] cpus_per_worker must be >= 0"),
        ({"kind": "ray", "gpus_per_worker": "1"}, r"\[executor\] gpus_per_worker must be a num"),
        ({"kind": "ray", "address": ""}, r"\[executor\] address must be a non-empty string"),
        ({"shards": "yes"}, r"\[executor\] shards must be true or false"),
        ({"address": "auto"}, r"\[executor\] address applies to kind = 'ray' only"),
        ({"kind": "local", "num_workers": 2}, r"\[executor\] num_workers applies to kind = 'ray'"),
    ],
)
def test_executor_table_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        Experiment.from_dict(_config(**table))


def test_executor_table_must_be_a_table():
    with pytest.raises(ConfigError, match=r"\[executor\] must be a table, got str"):
        Experiment.from_dict({**_config(), "executor": "ray"})


def test_overrides():
    ray = ExecutorSpec("ray", "auto", 4, 1.0, 2.0, shards=False)
    # --executor local drops the table's Ray settings, keeps shards
    assert ray.override("local") == ExecutorSpec(shards=False)
    assert ray.override("ray") == ray  # same kind: the table's settings stay
    assert ray.override(None, address="ray://h:1", num_workers=2, gpus_per_worker=0.5) == (
        ExecutorSpec("ray", "ray://h:1", 2, 0.5, 2.0, shards=False)
    )
    local = ExecutorSpec()
    assert local.override("RAY", address="auto") == ExecutorSpec("ray", "auto")
    assert local.override() == local
    with pytest.raises(ConfigError, match="--address needs a Ray executor: pass --executor ray"):
        local.override(address="auto")
    with pytest.raises(ConfigError, match="--workers needs a Ray executor"):
        ray.override("local", num_workers=2)
    with pytest.raises(ConfigError, match="--executor must be one of local, ray, got 'dask'"):
        local.override("dask")
    with pytest.raises(ConfigError, match="num_workers must be >= 1"):
        ray.override(num_workers=0)


def test_build():
    assert ExecutorSpec(shards=False).build("/tmp/run") is None  # the plain in-process loop
    assert ExecutorSpec().build(None) is None
    ex = ExecutorSpec().build("/tmp/run")
    assert isinstance(ex, LocalExecutor) and ex.shard_dir == Path("/tmp/run") / SHARDS_DIR


# --- runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """The experiment run with ``[executor] kind = "local"`` (shards stored), its shard writes
    counted, and whether each work's shard files existed when its map returned."""
    out = tmp_path_factory.mktemp("shards") / "run"
    seen: list[bool] = []
    with pytest.MonkeyPatch.context() as m:
        writes = _Writes(m)
        original = LocalExecutor.map

        def spy(self: LocalExecutor, work: Any, pair: Any, **kw: Any) -> Any:
            values = original(self, work, pair, **kw)
            seen.append(all(p.is_file() for p in writes.seen_files))
            return values

        m.setattr(LocalExecutor, "map", spy)
        result = run_experiment(_config(kind="local"), out, quiet=True)
    return out, result, writes, seen


def test_local_executor_writes_shards_with_identical_results(plain_run, shard_run):
    out, result, writes, seen = shard_run
    # every shard went through the store under RUN/shards/<work key>/, each written as its
    # shard finished (present when its work's map returned: 3 works, the sweep's and the
    # patch's two directions)
    assert writes.n == N_SHARDS
    assert len(seen) == 3 and all(seen)
    assert {p.parent.parent for p in writes.seen_files} == {out / SHARDS_DIR}
    assert len({p.parent for p in writes.seen_files}) == 3
    assert not (out / SHARDS_DIR).exists()  # removed once every analysis is stored
    assert result.computed == IDS
    record = result.manifest["executor"]
    assert record["spec"] == ExecutorSpec().to_dict()
    assert record["info"] == {"kind": "local", "shard_dir": str(out / SHARDS_DIR)}
    assert result.manifest["sessions"][-1]["executor"] == record
    assert_same_files(_fingerprint(out), _fingerprint(plain_run))


class _FakeRay(LocalExecutor):
    """Stands for :class:`~mechdelta.scale.ray.RayExecutor` (no cluster): runs in process,
    records how the run built it and whether it was closed."""

    made: ClassVar[list[_FakeRay]] = []

    def __init__(self, **kw: Any) -> None:
        super().__init__(kw["shard_dir"])
        self.kw, self.closed = kw, 0
        _FakeRay.made.append(self)

    def info(self) -> dict[str, Any]:
        return {"kind": "ray", "fake": True}

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def fake_ray(monkeypatch):
    import mechdelta.scale.ray as ray_module

    _FakeRay.made = []
    monkeypatch.setattr(ray_module, "RayExecutor", _FakeRay)
    return _FakeRay.made


@pytest.mark.parametrize(
    ("stop", "first", "then"),
    [
        (3, "ray", "object"),  # inside the sweep: a Ray run resumed by a LocalExecutor object
        (10, "local", "ray"),  # inside the patch: a local run resumed on Ray (--executor ray)
    ],
)
def test_interrupted_run_resumes_from_stored_shards(
    plain_run, tmp_path, monkeypatch, fake_ray, stop, first, then
):
    out = tmp_path / "run"
    table = {"kind": "ray", "address": "auto", "num_workers": 2} if first == "ray" else {}
    with monkeypatch.context() as m:
        before = _Writes(m, stop_after=stop)
        with pytest.raises(RuntimeError, match="simulated interruption"):
            run_experiment(_config(**table), out, quiet=True)
    assert before.n == stop
    if first == "ray":  # built once from the table, closed although the run failed
        assert [(x.kw, x.closed) for x in fake_ray] == [
            (
                {
                    "address": "auto",
                    "num_workers": 2,
                    "gpus_per_worker": 0.0,
                    "cpus_per_worker": 1.0,
                    "shard_dir": out / SHARDS_DIR,
                },
                1,
            )
        ]
    assert len(list((out / SHARDS_DIR).glob("*/shard-*.safetensors"))) == stop
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert manifest["executor"]["info"]["kind"] == first
    done = [a["id"] for a in manifest["analyses"] if a["status"] == "complete"]
    assert done == list(IDS[: 2 if stop > 6 else 1])

    # another executor resumes (the executor is not part of the run's identity): only the
    # shards left of the unfinished analysis run; the finished analyses are skipped whole
    ran: list[int] = []
    executor: Any = ExecutorSpec("ray", "ray://head:10001", gpus_per_worker=0.5)
    if then == "object":
        executor = LocalExecutor(out / SHARDS_DIR, on_shard=lambda s: ran.append(s.index))
    fake_ray.clear()
    with monkeypatch.context() as m:
        after = _Writes(m)
        result = run_experiment(_config(**table), out, quiet=True, executor=executor)
    assert after.n == N_SHARDS - stop
    assert result.skipped == tuple(done) and result.manifest["status"] == "complete"
    record = result.manifest["executor"]
    if then == "object":  # an executor object, not a spec
        assert len(ran) == after.n and not fake_ray
        assert record == {"spec": None, "info": executor.info()}
    else:
        assert [(x.kw["address"], x.kw["gpus_per_worker"], x.closed) for x in fake_ray] == [
            ("ray://head:10001", 0.5, 1)
        ]
        assert record == {"spec": executor.to_dict(), "info": {"kind": "ray", "fake": True}}
    assert not (out / SHARDS_DIR).exists()
    assert_same_files(_fingerprint(out), _fingerprint(plain_run))


def test_nothing_to_compute_builds_no_executor(plain_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(plain_run, out)

    def fail(self: ExecutorSpec, run_dir: Any) -> Any:
        raise AssertionError("built an executor with nothing to compute")

    monkeypatch.setattr(ExecutorSpec, "build", fail)
    result = run_experiment(_config(kind="ray", address="auto"), out, quiet=True)
    assert result.skipped == IDS and result.computed == ()
    assert result.manifest["executor"] == {
        "spec": ExecutorSpec("ray", "auto").to_dict(),
        "info": None,
    }


# --- the command line ---------------------------------------------------------------------------

RAY_TOML = """name = "tiny-exec"
[pair]
builtin = "tiny"
[run]
n_boot = 200
[output]
figures = ["html"]
[executor]
kind = "ray"
address = "ray://nowhere:10001"
num_workers = 8
[[analyses]]
kind = "shift"
"""


def test_cli_executor_flags_override_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.toml").write_text(RAY_TOML)
    calls: list[Any] = []

    def fake_run(experiment: Any, out_dir: Any, **kw: Any) -> Any:
        calls.append(kw["executor"])
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "run_experiment", fake_run)
    args = ["run", "exp.toml", "-o", "out", "--executor", "ray", "--address", "auto"]
    res = runner.invoke(app, [*args, "--workers", "2", "--gpus-per-worker", "0.5"])
    assert res.exit_code == 130, res.output
    assert calls[-1] == ExecutorSpec("ray", "auto", 2, 0.5)
    # the resume hint is the same command, executor flags included
    hint = "mechdelta run exp.toml --out out --executor ray --address auto --workers 2 "
    assert hint + "--gpus-per-worker 0.5" in res.stderr

    res = runner.invoke(app, ["run", "exp.toml", "-o", "out", "--workers", "3"])
    assert res.exit_code == 130
    assert calls[-1] == ExecutorSpec("ray", "ray://nowhere:10001", 3)  # the table's, bar N

    res = runner.invoke(app, ["run", "exp.toml", "-o", "out", "--executor", "local", "-q"])
    assert res.exit_code == 130 and calls[-1] == ExecutorSpec()
    assert "mechdelta run exp.toml --out out --executor local" in res.stderr

    n = len(calls)
    res = runner.invoke(
        app, ["run", "exp.toml", "-o", "out", "--executor", "local", "--address", "auto"]
    )
    assert res.exit_code == 1 and len(calls) == n
    assert "error: --address needs a Ray executor: pass --executor ray too" in res.stderr
    res = runner.invoke(app, ["run", "exp.toml", "--executor", "dask"])
    assert res.exit_code == 1 and "--executor must be one of local, ray" in res.stderr
    res = runner.invoke(app, ["run", "exp.toml", "--executor", "ray", "--workers", "0"])
    assert res.exit_code == 2  # typer: --workers >= 1


def test_cli_executor_local_runs(tmp_path, monkeypatch):
    """--executor local on an experiment whose table asks for Ray: runs here, recorded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.toml").write_text(RAY_TOML)
    res = runner.invoke(app, ["run", "exp.toml", "-o", "out", "--executor", "local", "-q"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["executor"]["spec"]["kind"] == "local"
    assert manifest["config"]["executor"]["kind"] == "ray"  # the file's table, as written


# --- Ray (optional) -----------------------------------------------------------------------------


@pytest.mark.slow  # ~35 s on 2 CPUs: Ray's start (~16 s) and the actor's imports
def test_ray_executor_run_matches_plain(plain_run, tmp_path):
    """``[executor] kind = "ray"`` (one actor on a one-CPU local cluster; the sweep only, to keep
    it small): the same stored numbers as the in-process run, shards stored, Ray recorded."""
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=False,
    )
    try:
        cfg = {**_config(kind="ray", num_workers=1), "analyses": ANALYSES[1:2]}
        with pytest.MonkeyPatch.context() as m:
            writes = _Writes(m)
            result = run_experiment(cfg, tmp_path / "run", quiet=True)
    finally:
        ray.shutdown()
    assert writes.n == 6 and result.computed == IDS[1:2]
    assert result.manifest["executor"]["info"]["kind"] != "local"
    sweep = IDS[1]
    mine, plain = _fingerprint(tmp_path / "run", (sweep,)), _fingerprint(plain_run, (sweep,))
    assert_same_files(mine, plain)
