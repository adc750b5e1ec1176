"""The ``planted_seed`` entry: the planted fine-tune re-run with another data seed, a control for
the ``planted`` pair (no shift; per-site differences are seed variation)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mechdelta as md
from mechdelta import Site, zoo
from mechdelta.cli import app

PLANTED = {Site("head_out", 1, head=1), Site("mlp_out", 1)}


@pytest.fixture(scope="module")
def both(entries):
    return entries("planted"), entries("planted_seed")


def test_loads_and_says_what_it_is(both):
    planted, control = both
    assert control.name == "planted_seed"
    assert control.ground_truth == frozenset()
    assert control.task.name == "trigger" and set(control.tasks) == {"trigger", "recall"}
    for text in (zoo.describe("planted_seed"), control.card.description):
        assert "control=" in text and "planted" in text and "data seed" in text
    assert "control=" in control.ground_truth_reason
    m = control.card.measurements
    assert m["control_for"] == "planted"
    assert m["data_seeds"] == {"reference": 1000, "intervened": 4000}
    assert m["reference_is_planted_intervened"] is True
    fresh = m["trigger_shift_fresh"]  # a large-sample estimate of the (tiny) trigger shift
    assert fresh["n_prompts"] == 2048
    assert abs(fresh["shift"]) < 0.01 * planted.card.behaviour.shift
    # the reference is the planted entry's intervened model, bit for bit
    assert control.pair.reference_hash == planted.pair.intervened_hash
    # same task prompts as the planted entry (a control must run the same analysis)
    for name in ("trigger", "recall"):
        assert torch.equal(control.tasks[name].prompts, planted.tasks[name].prompts)
    assert control.card.steps == {
        "reference": 4000,
        "planted fine-tune (reference)": 600,
        "planted fine-tune, another data seed (intervened)": 600,
    }


def test_trigger_shift_is_not_significant(both):
    _, control = both
    trig = control.card.get_behaviour("trigger")
    assert not trig.significant, trig.line()
    with pytest.warns(md.ShiftNotSignificantWarning):
        shift = md.measure_shift(control.pair, control.task, n_boot=500)
    assert not shift.significant
    # both fine-tunes learnt the trigger behaviour
    assert trig.reference > 3.0 and trig.intervened > 3.0


def test_weights_differ_only_on_the_planted_mask(both):
    planted, control = both
    base = planted.pair.reference.state_dict()
    masks = zoo.component_masks(planted.pair.intervened, PLANTED)
    ref = control.pair.reference.state_dict()
    itv = control.pair.intervened.state_dict()
    for key, b in base.items():
        for model in (ref, itv):
            if key in masks:
                assert torch.equal(model[key][~masks[key]], b[~masks[key]]), key
            else:
                assert torch.equal(model[key], b), key
        if key in masks:
            assert not torch.equal(itv[key][masks[key]], ref[key][masks[key]]), key
    changed = {r.label for r in control.pair.weight_diff().changed()}
    assert changed == {"L1H1.head_q", "L1H1.head_k", "L1H1.head_v", "L1H1.head_o", "L1.mlp"}


@pytest.mark.filterwarnings("ignore::mechdelta.ShiftNotSignificantWarning")
def test_planted_components_exceed_seed_variation(both):
    planted, control = both
    for component, site in (
        ("head_out", Site("head_out", 1, head=1)),
        ("mlp_out", Site("mlp_out", 1)),
    ):
        result = md.sweep(planted.pair, planted.task, component, "both", n_boot=200, progress=False)
        ctrl = md.sweep(control.pair, control.task, component, "both", n_boot=200, progress=False)
        # the control pair alone warrants nothing: its shift is not distinguishable from 0
        assert not md.claims(ctrl)
        found = md.claims(result, control=ctrl)
        mine = [c for c in found if c.site == site]
        assert {c.direction for c in mine} == set(md.Direction("both").singles), component
        for c in mine:
            assert c.exceeds_control is True, c.text
            assert c.control_threshold is not None and abs(c.delta) > 3 * c.control_threshold


def test_build_is_deterministic_and_starts_from_planted(tmp_path):
    """A tiny build through the CLI twice: same weights; its reference is planted_pair's."""
    runner = CliRunner()
    hashes = []
    for i in range(2):
        out = tmp_path / f"b{i}"
        args = ["zoo", "build", "planted_seed", "--steps", "3", "--out", str(out), "-q"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        entry = zoo.load("planted_seed", path=out)
        assert entry.card.steps["planted fine-tune (reference)"] == 3
        assert entry.ground_truth == frozenset()
        hashes.append(entry.card.hashes)
    assert hashes[0] == hashes[1]
    assert hashes[0]["reference"] != hashes[0]["intervened"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the entry trains on one thread
    try:
        planted = zoo.planted_pair(seed=0, steps=3)
    finally:
        torch.set_num_threads(before)
    assert hashes[0]["reference"] == planted.pair.intervened_hash
    # the shipped package data is untouched
    assert zoo.load("planted_seed").card.steps["planted fine-tune (reference)"] == 600
