"""LocalExecutor with a shard directory: an interrupted sharded run resumes, in a new executor,
to the in-process numbers exactly, running only the shards not stored."""

from __future__ import annotations

import pytest
import torch

import mechdelta as md
from mechdelta.core.sites import Site
from mechdelta.errors import ResultFormatError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching._work import SitesWork, pair_identity, plan
from mechdelta.scale._shards import ShardStore
from mechdelta.scale.executor import LocalExecutor, Shard, merge
from tests import _builders
from tests import _reference as ref

R2I = md.Direction.REFERENCE_TO_INTERVENED


class Interrupted(Exception):
    """Stands for a Ctrl-C in the middle of a run."""


@pytest.fixture(scope="module")
def engine() -> PatchEngine:
    pair = md.ModelPair(
        *_builders.native_pair(lambda m: ref.perturb_matching(m, lambda k: True, scale=0.3))
    )
    task = ref.contrast_task(pair, ref.random_tokens(4, 6, int(pair.cfg.d_vocab), seed=1))
    return PatchEngine(pair, task, batch_budget=4, progress=False)


def _work(engine: PatchEngine, variants: list[list[Site]]) -> SitesWork:
    """One variant per forward over all 4 prompts, in the order ``engine.run`` stacks them."""
    order = sorted(range(len(variants)), key=lambda i: engine._variant_key(variants[i]))
    return SitesWork(
        task=engine.prepared.task,
        direction=R2I,
        variants=tuple(tuple(v) for v in variants),
        jobs=tuple(plan([(slice(0, 4), [i]) for i in order])),
        budget=engine.budget,
        prefix_reuse=engine.prefix_reuse,
        pair_hashes=pair_identity(engine.pair),
        task_hash=engine.prepared.prompt_hash(),
    )


def test_interrupted_local_run_resumes(engine: PatchEngine, tmp_path) -> None:
    variants = [[Site("head_out", layer, head=h)] for layer in range(3) for h in range(2)]
    work = _work(engine, variants)
    want = engine.run(R2I, variants)
    first: list[int] = []

    def interrupt(shard: Shard) -> None:
        first.append(shard.index)
        if len(first) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        LocalExecutor(tmp_path, on_shard=interrupt).map(work, engine.pair, local_state=engine)
    assert len(list((tmp_path / work.key).glob("shard-*.safetensors"))) == 2
    second: list[int] = []
    resumed = LocalExecutor(tmp_path, on_shard=lambda s: second.append(s.index))
    values = resumed.map(work, engine.pair)  # no local state: the executor builds its own
    assert sorted(first + second) == list(range(len(variants)))
    out = engine.metric_of("intervened").repeat(len(variants), 1)
    assert torch.equal(merge(work.shards(), values, out, range(len(variants))), want)
    again: list[int] = []
    LocalExecutor(tmp_path, on_shard=lambda s: again.append(s.index)).map(work, engine.pair)
    assert again == []  # everything stored: nothing runs


def test_store_refuses_another_works_shard(tmp_path) -> None:
    store = ShardStore(tmp_path, "some-work")
    store.write(Shard(0, (0, 4), (0, 1)), torch.ones(2, 4))
    assert torch.equal(store.finished([Shard(0, (0, 4), (0, 1))])[0], torch.ones(2, 4))
    with pytest.raises(ResultFormatError, match="another work"):
        store.finished([Shard(0, (0, 4), (2, 3))])


def test_loaded_pairs_carry_a_recipe_that_loads_the_same_weights(
    hf_checkpoints, hf_checkpoints_seed1
):
    """A RayExecutor's actors load a pair from its recipe (paths, hub names, the zoo) when it
    has one: calling it (a pickled copy, as an actor gets it) gives the same weights."""
    import pickle

    from mechdelta.scale._transport import build_pair, pair_route

    entry = md.zoo.load("planted")
    loaded = md.ModelPair.load(hf_checkpoints["gpt2"], hf_checkpoints_seed1["gpt2"], device="cpu")
    for pair in (entry.pair, loaded):
        route = pair_route(pair, None)
        assert route is pair.recipe is not None
        again = build_pair(pickle.loads(pickle.dumps(route)), "cpu")
        assert (again.reference_hash, again.intervened_hash) == pair_identity(pair)
    built = md.ModelPair(*_builders.native_pair(lambda m: ref.perturb_matching(m, lambda k: True)))
    assert built.recipe is None and pair_route(built, None) is None  # its weights travel
