"""The engine on the shipped zoo pairs: the planted ground truth restores the behaviour exactly in
both directions and ranks first; the null pair's shift is flagged as not distinguishable from 0;
the induction pair's head sweep puts the ground-truth heads on top."""

from __future__ import annotations

import pytest

import mechdelta as md


@pytest.fixture(scope="module")
def planted():
    return md.zoo.load("planted")


def test_planted_ground_truth_restores_exactly_in_both_directions(planted):
    result = md.patch(planted.pair, planted.task, sorted(planted.ground_truth), "both", n_boot=200)
    for r in result:
        assert abs(r.score - 1.0) < 1e-5, (r.direction, r.score)
        target = r.shift.reference if r.direction.toward_reference else r.shift.intervened
        assert (r.per_prompt - target).abs().max().item() < 1e-4


def test_planted_components_rank_first_in_their_sweeps(planted):
    (head,) = [s for s in planted.ground_truth if s.kind is md.Component.HEAD_OUT]
    heads = md.sweep(planted.pair, planted.task, "head_out", "intervened->reference", n_boot=200)
    assert heads.top(1)[0].site == head
    # heads that were not trained and sit before the planted layer have exactly no effect
    assert heads.scores[: head.layer].abs().max().item() == 0.0


def test_null_pair_shift_is_not_significant():
    entry = md.zoo.load("null")
    with pytest.warns(md.ShiftNotSignificantWarning):
        shift = md.measure_shift(entry.pair, entry.task, n_boot=500)
    assert not shift.significant


def test_induction_sweep_puts_ground_truth_heads_on_top():
    entry = md.zoo.load("induction")
    sweep = md.sweep(entry.pair, entry.task, "head_out", "both", n_boot=200)
    assert entry.ground_truth is not None
    # restoring the reference's previous-token head undoes most of the shift ...
    best = sweep.reference_to_intervened.top(1)[0]
    assert best.site in entry.ground_truth and best.score > 0.5
    # ... and each layer-1 induction head alone carries a clear share into the reference
    top4 = {s.site for s in sweep.intervened_to_reference.top(4)}
    assert top4 <= entry.ground_truth
