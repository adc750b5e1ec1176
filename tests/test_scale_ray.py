"""RayExecutor on a local 2-CPU Ray cluster: sharded sweeps and edge patching give exactly the
in-process numbers (torch.equal), a killed actor loses and double-counts nothing, an interrupted
run with a shard directory resumes to the same numbers running only the missing shards, the
transport rebuilds native and HF-backed pairs on the workers, and a work's own error comes back
as itself."""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta.core.sites import Site
from mechdelta.errors import ConfigError, PatchingError, SiteError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching._work import SitesWork, pair_identity, plan
from mechdelta.patching.edges import EdgePatcher
from mechdelta.scale._transport import build_pair, check_hashes, pair_payload
from mechdelta.scale.executor import Shard, merge
from tests import _builders
from tests import _reference as ref

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")

from mechdelta.scale.ray import RayExecutor  # noqa: E402  (after the skip: needs no ray, but reads better)

R2I = md.Direction.REFERENCE_TO_INTERVENED
I2R = md.Direction.INTERVENED_TO_REFERENCE
BUDGET = 8  # 6 prompts -> row chunks of 6, variants stacked 1 per forward: many small shards


class Interrupted(Exception):
    """Stands for a Ctrl-C or a lost driver in the middle of a run."""


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A local Ray cluster of 2 CPUs for this module, quiet, stopped at the end."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pair() -> md.ModelPair:
    return md.ModelPair(
        *_builders.native_pair(lambda m: ref.perturb_matching(m, lambda k: True, scale=0.3))
    )


@pytest.fixture(scope="module")
def task(pair: md.ModelPair) -> md.Task:
    return ref.contrast_task(pair, ref.random_tokens(6, 8, int(pair.cfg.d_vocab), seed=1))


@pytest.fixture(scope="module")
def executor(cluster: Any) -> Any:
    """Two actors sharing the cluster's 2 CPUs at half a CPU each (leaving one CPU for the one
    actor of a second executor); the pair travels by the object store (no recipe)."""
    ex = RayExecutor(num_workers=2, cpus_per_worker=0.5)
    yield ex
    ex.close()


def _sites_work(
    engine: PatchEngine, direction: md.Direction, variants: Sequence[Sequence[Site]]
) -> SitesWork:
    """The work of ``engine.run(direction, variants)``, planned exactly as its loop plans it."""
    engine.clean_run({s for v in variants for s in v})
    batch = engine.prepared.batch_size
    chunk_b = min(batch, engine.budget)
    per_v = max(1, engine.budget // chunk_b)
    order = sorted(range(len(variants)), key=lambda i: engine._variant_key(variants[i]))
    jobs = [
        (slice(b0, min(b0 + chunk_b, batch)), order[v0 : v0 + per_v])
        for b0 in range(0, batch, chunk_b)
        for v0 in range(0, len(order), per_v)
    ]
    return SitesWork(
        task=engine.prepared.task,
        direction=direction,
        variants=tuple(tuple(v) for v in variants),
        jobs=tuple(plan(jobs)),
        budget=engine.budget,
        prefix_reuse=engine.prefix_reuse,
        pair_hashes=pair_identity(engine.pair),
        task_hash=engine.prepared.prompt_hash(),
    )


def _variants(pair: md.ModelPair) -> list[list[Site]]:
    n_layers, n_heads = pair.shape.n_layers, pair.shape.n_heads
    heads = [[Site("head_out", layer, head=h)] for layer in range(n_layers) for h in range(n_heads)]
    resid = [[Site("resid_pre", layer, position=p)] for layer in range(n_layers) for p in (3, 7)]
    return heads + resid + [[Site("mlp_out", 0), Site("head_out", 2, head=1)]]


def _merged(work: SitesWork, values: list[torch.Tensor], engine: PatchEngine) -> torch.Tensor:
    out = engine.metric_of(work.direction.target).repeat(len(work.variants), 1)
    return merge(work.shards(), values, out, range(len(work.variants)))


@pytest.fixture(scope="module")
def engine(pair: md.ModelPair, task: md.Task) -> PatchEngine:
    return PatchEngine(pair, task, batch_budget=BUDGET, progress=False)


# --- identical numbers ---------------------------------------------------------------------------


def test_sweep_shards_equal_in_process(executor: Any, pair: Any, engine: PatchEngine) -> None:
    variants = _variants(pair)
    for direction in (R2I, I2R):
        work = _sites_work(engine, direction, variants)
        assert len(work.shards()) == len(variants) > 4 * len(executor.actors)
        got = _merged(work, executor.map(work, pair, progress=False), engine)
        want = engine.run(direction, variants)
        assert torch.equal(got, want)
        assert not torch.equal(want, engine.metric_of(direction.target).expand_as(want))
    assert len(executor.actors) == 2
    info = executor.info()
    assert info["kind"] == "ray" and info["num_workers"] == 2 and info["ray_version"]


def test_edge_patching_equal_in_process(executor: Any, pair: Any, task: Any) -> None:
    local = EdgePatcher(pair, task, batch_budget=BUDGET)
    remote = EdgePatcher(pair, task, batch_budget=BUDGET, executor=executor)
    edges = list(local.graph.edges)
    rng = random.Random(0)
    circuits = [rng.sample(edges, k) for k in (1, 3, 8, 20, len(edges) // 2)] + [[]]
    for semantics in ("splice", "ablate"):
        want = local.run(R2I, circuits, semantics=semantics)
        got = remote.run(R2I, circuits, semantics=semantics)
        assert torch.equal(got, want), semantics


def test_public_calls_equal_in_process(executor: Any, pair: Any, task: Any) -> None:
    """``executor=`` on :func:`mechdelta.sweep` (both directions) and :func:`mechdelta.attribute`
    (the gradient passes by prompt chunks): the same per-prompt numbers as in process."""

    def sweep(ex: Any) -> Any:
        return md.sweep(pair, task, "head_out", "both", batch_budget=BUDGET, n_boot=100,
                        progress=False, executor=ex)  # fmt: skip

    for x, y in zip(sweep(None), sweep(executor), strict=True):
        assert torch.equal(x.per_prompt, y.per_prompt)
        # provenance says where it ran, and the workers' peak memory per shard (CPU: sampled)
        assert x.provenance["engine"]["executor"] == {"kind": "local"}
        assert x.provenance["engine"]["worker_peak_memory"] is None
        assert y.provenance["engine"]["executor"]["kind"] == "ray"
        worker = y.provenance["engine"]["worker_peak_memory"]
        assert worker["method"] == "rss_sampled" and worker["bytes"] >= 0

    def attribute(ex: Any) -> Any:
        return md.attribute(pair, task, "head_out", R2I, "atp", batch_budget=2, n_boot=100,
                            progress=False, executor=ex)  # fmt: skip

    assert torch.equal(attribute(None).per_prompt, attribute(executor).per_prompt)


def test_work_error_is_raised_as_itself(executor: Any, pair: Any, engine: PatchEngine) -> None:
    bad = _sites_work(engine, R2I, [[Site("head_out", 0, head=0)]])
    bad.variants = ((Site("head_out", 7, head=0),),)  # layer 7 of a 3-layer model
    with pytest.raises(SiteError, match="layer"):
        executor.map(bad, pair, progress=False)
    assert len(executor.actors) == 2  # a work error is not a dead actor


# --- faults ---------------------------------------------------------------------------------------


def test_killed_actor_loses_nothing(executor: Any, pair: Any, engine: PatchEngine) -> None:
    variants = _variants(pair)
    work = _sites_work(engine, I2R, variants)
    work.desc = "killed-actor sweep"  # same numbers; only the label differs
    seen: list[int] = []
    victim: list[Any] = []

    def kill_first(shard: Shard) -> None:
        seen.append(shard.index)
        if len(seen) == 1:
            victim.append(executor.actors[0])
            ray.kill(victim[0])

    executor.on_shard = kill_first
    try:
        values = executor.map(work, pair, progress=False)
    finally:
        executor.on_shard = None
    assert sorted(seen) == list(range(len(work.shards())))  # each shard recorded exactly once
    assert torch.equal(_merged(work, values, engine), engine.run(I2R, variants))
    assert victim[0] not in executor.actors and len(executor.actors) == 2  # replaced


def test_interrupted_run_resumes(executor: Any, pair: Any, engine: PatchEngine, tmp_path) -> None:
    variants = _variants(pair)
    work = _sites_work(engine, R2I, variants)
    n, k = len(work.shards()), 5

    def interrupt(shard: Shard) -> None:
        count.append(shard.index)
        if len(count) == k:
            raise Interrupted(f"stopped after {k} shards")

    count: list[int] = []
    executor.shard_dir, executor.on_shard = tmp_path, interrupt
    try:
        with pytest.raises(Interrupted):
            executor.map(work, pair, progress=False)
    finally:
        executor.shard_dir, executor.on_shard = None, None
    stored = sorted((tmp_path / work.key).glob("shard-*.safetensors"))
    assert len(stored) == k
    # The re-run: the same command again. A RayExecutor carries nothing from one map call to the
    # next but its actors (started once: ~5 s each), so the same executor object stands for a
    # new one here; the store alone decides what is skipped (tests/test_scale_local.py resumes
    # with a new executor object).
    resumed: list[int] = []
    executor.shard_dir, executor.on_shard = tmp_path, lambda s: resumed.append(s.index)
    try:
        values = executor.map(work, pair, progress=False)
    finally:
        executor.shard_dir, executor.on_shard = None, None
    assert sorted(resumed + count) == list(range(n))  # only the missing shards ran
    assert torch.equal(_merged(work, values, engine), engine.run(R2I, variants))


# --- transport ------------------------------------------------------------------------------------


def test_native_payload_round_trip(pair: md.ModelPair) -> None:
    rebuilt = build_pair(pickle.loads(pickle.dumps(pair_payload(pair))))
    assert pair_identity(rebuilt) == pair_identity(pair)
    assert rebuilt.names == pair.names
    other = md.ModelPair(*_builders.native_pair(lambda m: ref.perturb_matching(m, lambda k: True)))
    with pytest.raises(PatchingError, match="weight hashes"):
        check_hashes(other, pair_identity(pair))


def test_unsupported_bridge_needs_a_loader(pair: md.ModelPair) -> None:
    class Opaque:
        cfg = None
        original_model = torch.nn.Linear(2, 2)

    fake = type(
        "FakePair", (), {"reference": Opaque(), "intervened": Opaque(), "names": ("a", "b")}
    )
    with pytest.raises(ConfigError, match="pair_loader"):
        pair_payload(fake())


def test_hf_payload_round_trip(tokenizer: Any) -> None:
    """A HuggingFace-backed pair (GPT-2, with its tokenizer) rebuilt from its payload (as a worker
    gets it from the object store) has the same weights, tokenizer and patched values; the trip
    through Ray itself is the native pair's, in the tests above."""
    hf = md.ModelPair.from_hf(
        _builders.hf_model("gpt2", len(tokenizer), 0, n_layers=2),
        _builders.hf_model("gpt2", len(tokenizer), 1, n_layers=2),
        tokenizer=tokenizer,
    )
    rebuilt = build_pair(pickle.loads(pickle.dumps(pair_payload(hf))))
    assert pair_identity(rebuilt) == pair_identity(hf)
    assert rebuilt.tokenizer_hash == hf.tokenizer_hash and rebuilt.names == hf.names
    task = ref.contrast_task(hf, ref.random_tokens(2, 6, len(tokenizer), seed=2))
    variants = [[Site("head_out", layer, head=h)] for layer in range(2) for h in range(4)]
    want = PatchEngine(hf, task, progress=False).run(R2I, variants)
    assert torch.equal(PatchEngine(rebuilt, task, progress=False).run(R2I, variants), want)
