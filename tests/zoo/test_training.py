"""Seeded training reproduces bit for bit; partial training leaves frozen weights untouched."""

from __future__ import annotations

import pytest
import torch

from mechdelta import ConfigError, Site, ZooError, zoo
from mechdelta.zoo import _recall_base as recall
from mechdelta.zoo import induction
from mechdelta.zoo._models import build_model, state_dict_of
from mechdelta.zoo._training import TrainSpec, deterministic, train


def _run(config, batch_fn, steps, seed=0, **kw):
    model = build_model(config, seed=seed)
    spec = TrainSpec(steps=steps, lr=1e-3, batch_size=32, weight_decay=0.01, seed=seed)
    result = train(model, spec, batch_fn, **kw)
    return result, state_dict_of(model)


@pytest.mark.parametrize(
    ("config", "batch_fn", "steps"),
    [
        (induction.MODEL, induction.DATA.train_batch, 20),
        (recall.MODEL, recall.DATA.batch, 150),
    ],
    ids=["induction", "recall"],
)
def test_same_seed_same_loss_curve_bit_for_bit(config, batch_fn, steps):
    a, state_a = _run(config, batch_fn, steps)
    b, state_b = _run(config, batch_fn, steps)
    assert len(a.curve) == steps
    assert a.curve.losses == b.curve.losses  # exact float equality
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    s = a.curve.summary(points=4)
    assert s["window_means"][-1] < s["window_means"][0], "training makes progress"
    c, _ = _run(config, batch_fn, 3, seed=1)
    assert c.curve.losses != a.curve.losses[:3], "another seed, another curve"


def test_deterministic_restores_global_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic(7):
        assert torch.are_deterministic_algorithms_enabled()
        torch.rand(5)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.equal(torch.rand(3), expected)


def test_snapshots_and_spec_validation():
    model = build_model(recall.MODEL)
    spec = TrainSpec(steps=3, batch_size=8)
    result = train(model, spec, recall.DATA.batch, snapshots=[0, 3])
    assert set(result.snapshots) == {0, 3}
    with pytest.raises(ConfigError):
        train(model, spec, recall.DATA.batch, snapshots=[4])
    with pytest.raises(ConfigError):
        TrainSpec(steps=-1)
    with pytest.raises(ConfigError):
        TrainSpec(steps=1, optimizer="sgd")


def test_planted_pair_puts_delta_exactly_on_chosen_components():
    chosen = ["L0H2", Site("head_q", 1, head=3), "L0.mlp_out"]
    entry = zoo.planted_pair(chosen, seed=3, steps=4)
    expected = {Site("head_out", 0, head=2), Site("head_q", 1, head=3), Site("mlp_out", 0)}
    assert entry.ground_truth == expected
    masks = zoo.component_masks(entry.pair.intervened, expected)
    ref = entry.pair.reference.state_dict()
    itv = entry.pair.intervened.state_dict()
    for key, r in ref.items():
        if key in masks:
            assert torch.equal(itv[key][~masks[key]], r[~masks[key]]), key
            assert not torch.equal(itv[key][masks[key]], r[masks[key]]), key
        else:
            assert torch.equal(itv[key], r), key
    changed = {r.label for r in entry.pair.weight_diff().changed()}
    assert changed == {
        "L0H2.head_q",
        "L0H2.head_k",
        "L0H2.head_v",
        "L0H2.head_o",
        "L1H3.head_q",
        "L0.mlp",
    }
    assert entry.card.steps["planted fine-tune"] == 4
    assert entry.name == "planted[L0H2, L1H3.head_q, L0.mlp_out]/seed3"
    # the shipped reference is the starting point, untouched
    shipped = zoo.load("planted").pair.reference_hash
    assert entry.pair.reference_hash == shipped


def test_planted_pair_rejects_bad_components():
    with pytest.raises(ZooError, match="position"):
        zoo.component_masks(zoo.load("planted").pair.reference, ["L1H1P3"])
    with pytest.raises(ZooError, match="head_out / head_q"):
        zoo.component_masks(zoo.load("planted").pair.reference, [Site("attn_out", 1)])
    with pytest.raises(ZooError, match="at least one"):
        zoo.planted_pair([], steps=1)
