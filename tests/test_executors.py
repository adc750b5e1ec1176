"""``executor=`` on the public entry points: a :class:`LocalExecutor` with a shard directory
gives the in-process numbers bit for bit, and a second run of the same call reads every shard
back instead of running it (the resumable store). Ray itself: tests/test_scale_ray.py."""

from __future__ import annotations

import pytest
import torch

import mechdelta as md
from mechdelta.scale.executor import LocalExecutor
from tests._builders import native_pair


class Counting(LocalExecutor):
    """A LocalExecutor counting the shards it actually runs."""

    def __init__(self, shard_dir) -> None:
        super().__init__(shard_dir, on_shard=self._count)
        self.ran = 0

    def _count(self, shard) -> None:
        self.ran += 1


@pytest.fixture(scope="module")
def pair_task():
    def perturb(model):
        model.blocks[1].attn.o.weight[:, 16:32] *= 3.0
        for p in model.blocks[2].mlp.parameters():
            p.mul_(1.5)

    ref, itv = native_pair(perturb, seed=3)
    pair = md.ModelPair(ref, itv)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (8, 7), generator=gen)
    task = md.Task(tokens, metric="kl_to_reference")
    return pair, task


def _same(a, b) -> None:
    for x, y in zip(a, b, strict=True):  # a BothDirections iterates over its two results
        assert torch.equal(x.per_prompt, y.per_prompt)


def _twice(tmp_path, call):
    """The call in process, then twice with a counting LocalExecutor on one shard directory."""
    plain = call(None)
    first = Counting(tmp_path)
    got = call(first)
    again = Counting(tmp_path)
    resumed = call(again)
    assert first.ran > 1, "the call sharded nothing"
    assert again.ran == 0, "a second run re-ran stored shards"
    return plain, got, resumed


@pytest.mark.parametrize("per_position", [False, True])
def test_sweep_is_identical_and_resumes(pair_task, tmp_path, per_position):
    pair, task = pair_task

    def call(ex):
        return md.sweep(
            pair, task, "head_out", "both", per_position=per_position, batch_budget=8,
            n_boot=100, progress=False, executor=ex,
        )  # fmt: skip

    plain, got, resumed = _twice(tmp_path, call)
    _same(plain, got)
    _same(plain, resumed)


def test_graft_sweep_and_patch(pair_task, tmp_path):
    pair, task = pair_task

    def graft(ex):
        return md.sweep(pair, task, "head_out", "both", semantics="graft", batch_budget=4,
                        n_boot=100, progress=False, executor=ex)  # fmt: skip

    plain, got, resumed = _twice(tmp_path / "graft", graft)
    _same(plain, got)
    _same(plain, resumed)

    def patch(ex):
        return md.patch(pair, task, ["L1H1", "L0H2"], "both", batch_budget=2, n_boot=100,
                        executor=ex)  # fmt: skip

    plain, got, resumed = _twice(tmp_path / "patch", patch)
    for x, y in zip(plain, got, strict=True):
        assert torch.equal(x.per_prompt, y.per_prompt)


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_attribution_is_identical(pair_task, tmp_path, method):
    pair, task = pair_task

    def call(ex):
        return md.attribute(pair, task, "head_out", "reference->intervened", method, steps=3,
                            batch_budget=2, n_boot=100, progress=False, executor=ex)  # fmt: skip

    plain, got, resumed = _twice(tmp_path, call)
    assert torch.equal(plain.per_prompt, got.per_prompt)
    assert torch.equal(plain.per_prompt, resumed.per_prompt)


@pytest.mark.parametrize("semantics", ["splice", "ablate", "graft"])
def test_patch_edges_is_identical(pair_task, tmp_path, semantics):
    pair, task = pair_task
    graph = md.Graph.from_model(pair)
    edges = [e for e in graph.edges if e.sender.kind == "head"][:5]

    def call(ex):
        return md.patch_edges(pair, task, edges, "both", semantics=semantics, batch_budget=2,
                              n_boot=100, executor=ex)  # fmt: skip

    plain, got, resumed = _twice(tmp_path, call)
    _same(plain, got)
    _same(plain, resumed)


# (edge-level searches run EdgePatcher.run, covered above; one here took 60 s on this machine)
@pytest.mark.parametrize(("level", "semantics"), [("node", "graft"), ("node", "splice")])
def test_search_circuit_finds_the_same_circuit(pair_task, tmp_path, level, semantics):
    pair, task = pair_task

    def call(ex):
        import warnings

        with warnings.catch_warnings():  # whether it reaches the target is not the point here
            warnings.simplefilter("ignore", md.CircuitNotFaithfulWarning)
            return md.search_circuit(pair, task, level=level, method="greedy",
                                     semantics=semantics, target=0.8, max_size=3,
                                     batch_budget=4, progress=False, executor=ex)  # fmt: skip

    plain, got, resumed = _twice(tmp_path, call)
    assert plain.members == got.members == resumed.members
    assert plain.faithfulness == got.faithfulness == resumed.faithfulness


def test_a_bad_executor_is_a_config_error(pair_task):
    pair, task = pair_task
    with pytest.raises(md.ConfigError, match="executor must be"):
        md.sweep(pair, task, "head_out", executor="dask")
