"""Loading the shipped entries: offline, fast, and reproducing their cards."""

from __future__ import annotations

import shutil

import pytest
import torch

from mechdelta import ModelPair, Site, Task, ZooError, measure_shift, zoo
from mechdelta.zoo import ZooCard

NAMES = ("induction", "planted", "null", "finetune", "planted_seed")


def test_names_and_unknown_name():
    assert tuple(zoo.names()) == NAMES
    with pytest.raises(ZooError, match=r"unknown zoo entry 'nope'.*induction, planted"):
        zoo.load("nope")
    with pytest.raises(ZooError, match="known entries"):
        zoo.build("nope")


@pytest.mark.parametrize("name", NAMES)
def test_load_is_typed(name):
    # how fast loading is lives in benchmarks/bench_zoo_load.py (timed tests flake on a busy CI)
    entry = zoo.load(name)
    assert entry.name == name
    assert isinstance(entry.pair, ModelPair)
    assert isinstance(entry.task, Task)
    assert isinstance(entry.card, ZooCard)
    assert entry.task is entry.tasks[entry.card.behaviour.name]
    assert entry.ground_truth_reason == entry.card.ground_truth_reason
    assert entry.pair.reference_hash == entry.card.hashes["reference"]
    assert entry.pair.intervened_hash == entry.card.hashes["intervened"]


@pytest.mark.parametrize("name", NAMES)
def test_behaviour_reproduces_card(entries, name):
    entry = entries(name)
    for b in entry.card.behaviours:
        r = measure_shift(entry.pair, entry.tasks[b.name], warn=False)
        assert r.metric == b.metric
        assert r.reference_mean == pytest.approx(b.reference, abs=1e-4, rel=1e-4)
        assert r.intervened_mean == pytest.approx(b.intervened, abs=1e-4, rel=1e-4)
        assert r.ci == pytest.approx(b.ci, abs=1e-3)


def test_induction_shift_is_large(entries):
    b = entries("induction").card.behaviour
    assert b.metric == "loss"
    assert b.reference > 4.5  # before the phase change: near chance on the repeated segment
    assert b.intervened < 1.0
    assert b.significant and b.shift < -3.0


@pytest.mark.parametrize("name", ["planted", "finetune"])
def test_trigger_shift_is_large_and_recall_kept(entries, name):
    card = entries(name).card
    trig, recall = card.get_behaviour("trigger"), card.get_behaviour("recall")
    assert card.behaviour is trig
    assert trig.reference < 0 < trig.intervened  # old answer preferred before, new one after
    assert trig.significant and trig.shift > 5.0
    assert recall.reference > 3.0 and recall.intervened > 3.0


def test_null_has_no_shift(entries):
    entry = entries("null")
    assert entry.ground_truth == frozenset()
    card = entry.card
    recall = card.behaviour
    assert recall.name == "recall"
    for b in card.behaviours:
        scale = max(abs(b.reference), abs(b.intervened))
        assert abs(b.shift) < 0.05 * scale, b.line()
    assert not recall.significant, recall.line()
    assert entry.pair.weight_diff().changed(), "all weights moved a little"


def test_planted_delta_is_exactly_on_the_components(entries):
    entry = entries("planted")
    assert entry.ground_truth == {Site("head_out", 1, head=1), Site("mlp_out", 1)}
    ref = entry.pair.reference.state_dict()
    itv = entry.pair.intervened.state_dict()
    masks = zoo.component_masks(entry.pair.intervened, entry.ground_truth)
    for key, r in ref.items():
        delta = itv[key] - r
        if key in masks:
            assert torch.all(delta[~masks[key]] == 0), key
            assert delta[masks[key]].abs().max() > 0, key
        else:
            assert torch.equal(itv[key], r), key
    changed = {r.label for r in entry.pair.weight_diff().changed()}
    assert changed == {"L1H1.head_q", "L1H1.head_k", "L1H1.head_v", "L1H1.head_o", "L1.mlp"}


def test_finetune_ground_truth_unknown(entries):
    entry = entries("finetune")
    assert entry.ground_truth is None
    assert "Not known" in entry.ground_truth_reason
    assert entry.card.known and entry.card.unknown


def test_induction_scores_identify_ground_truth(entries):
    from mechdelta.zoo import induction

    entry = entries("induction")
    tokens, mask = entry.task.prompts, entry.task.loss_mask
    assert torch.equal(tokens, induction.eval_batch(entry.card.seed)[0])
    found = induction.ground_truth_heads(entry.pair.intervened, tokens, mask)
    assert found == entry.ground_truth
    layers = {s.layer for s in found}
    assert layers == {0, 1}, "previous-token head(s) in layer 0 and induction heads in layer 1"
    ind = zoo.induction_scores(entry.pair.intervened, tokens, mask)
    prev = zoo.previous_token_scores(entry.pair.intervened, tokens)
    for s in found:
        score = ind[s.layer, s.head] if s.layer == 1 else prev[s.layer, s.head]
        assert score >= 0.3
    # before the phase change no head passes the rule
    assert induction.ground_truth_heads(entry.pair.reference, tokens, mask) == frozenset()
    stored = entry.card.measurements["attention_scores"]["intervened"]["induction"]
    assert torch.allclose(ind, torch.tensor(stored), atol=1e-3)


def test_card_round_trip_and_text(entries):
    card = entries("planted").card
    again = ZooCard.from_dict(card.to_dict())
    assert again == card
    text = str(card)
    for part in ("# zoo: planted", "## Training", "## Behaviour", "## Ground truth", "L1H1"):
        assert part in text
    assert card.steps == {"reference": 4000, "planted fine-tune": 600}


def test_missing_and_corrupt_data(tmp_path):
    src = zoo.data_dir("null")
    bad = tmp_path / "null"
    shutil.copytree(src, bad)
    assert zoo.load("null", path=bad).name == "null"
    (bad / "intervened.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ZooError, match="corrupt"):
        zoo.load("null", path=bad)
    (bad / "intervened.safetensors").unlink()
    with pytest.raises(ZooError, match="missing"):
        zoo.load("null", path=bad)
    # weights that do not match the card's hash
    shutil.copy(src / "reference.safetensors", bad / "intervened.safetensors")
    with pytest.raises(ZooError, match="does not match its card"):
        zoo.load("null", path=bad)
    with pytest.raises(ZooError, match="no data"):
        zoo.load("null", path=tmp_path / "absent")
    with pytest.raises(ZooError, match="not 'planted'"):
        shutil.copy(src / "intervened.safetensors", bad / "intervened.safetensors")
        zoo.load("planted", path=bad)
