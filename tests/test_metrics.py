"""Metrics: each built-in against a hand computation on known logits, and end to end against the
models' full logits; custom callables; NaN / shape errors."""

from __future__ import annotations

import math

import pytest
import torch

import mechdelta as md
from mechdelta import Metric, MetricError, MetricInputs, Task
from mechdelta.core.metrics import resolve_metric
from tests import _builders
from tests._reference import N_BOOT, contrast_answers, pad, perturb_matching

LOGITS = torch.tensor([[[1.0, 2.0, 3.0, 0.0]], [[0.0, -1.0, 5.0, 2.0]]])  # [batch 2, k 1, vocab 4]
ANSWERS = torch.tensor([2, 0])
WRONG = torch.tensor([1, 3])


def _inputs(**kwargs) -> MetricInputs:
    base = {
        "positions": torch.zeros(2, 1, dtype=torch.long),
        "valid": torch.ones(2, 1, dtype=torch.bool),
        "answers": ANSWERS,
        "wrong": WRONG,
    }
    return MetricInputs(**{**base, **kwargs})


def _logprob(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(x) for x in row))


def test_logit_diff_logprob_prob_by_hand():
    rows = LOGITS[:, 0].tolist()
    got = resolve_metric("logit_diff")(LOGITS, _inputs())
    assert got.tolist() == [3.0 - 2.0, 0.0 - 2.0]
    lp = resolve_metric("logprob")(LOGITS, _inputs())
    want = [_logprob(rows[0], 2), _logprob(rows[1], 0)]
    assert torch.allclose(lp, torch.tensor(want), atol=1e-6)
    p = resolve_metric("prob")(LOGITS, _inputs())
    assert torch.allclose(p, torch.tensor([math.exp(w) for w in want]), atol=1e-6)


def test_loss_by_hand_averages_only_valid_targets():
    logits = torch.tensor(
        [
            [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]],
            [[1.0, 1.0, 0.0], [5.0, 5.0, 5.0], [7.0, 0.0, 0.0]],
        ]
    )
    targets = torch.tensor([[2, 1, 0], [0, 0, 0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    inputs = MetricInputs(torch.zeros(2, 3, dtype=torch.long), valid, targets=targets)
    got = resolve_metric("loss")(logits, inputs)
    rows = logits.tolist()
    want0 = -(_logprob(rows[0][0], 2) + _logprob(rows[0][1], 1)) / 2
    want1 = -_logprob(rows[1][0], 0)
    assert torch.allclose(got, torch.tensor([want0, want1]), atol=1e-6)
    assert resolve_metric("loss").higher_is == "worse"


def test_kl_to_reference_by_hand():
    ref_logits = torch.tensor([[[0.0, 1.0, 0.0, 1.0]], [[2.0, 0.0, 0.0, 0.0]]])
    ref_lp = ref_logits.log_softmax(-1)
    got = resolve_metric("kl_to_reference")(LOGITS, _inputs(reference_logprobs=ref_lp))
    want = []
    for b in range(2):
        p = ref_lp[b, 0].exp().tolist()
        r = ref_logits[b, 0].tolist()
        m = LOGITS[b, 0].tolist()
        want.append(sum(p[i] * (_logprob(r, i) - _logprob(m, i)) for i in range(4)))
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    same = resolve_metric("kl_to_reference")(ref_logits, _inputs(reference_logprobs=ref_lp))
    assert same.abs().max().item() < 1e-6


def test_missing_inputs_and_unknown_metrics_raise():
    with pytest.raises(MetricError, match="needs Task\\(answers=...\\)"):
        resolve_metric("logprob")(LOGITS, _inputs(answers=None))
    with pytest.raises(MetricError, match="reference run's log-probabilities"):
        resolve_metric("kl_to_reference")(LOGITS, _inputs())
    with pytest.raises(MetricError, match="next-token targets"):
        resolve_metric("loss")(LOGITS, _inputs())
    with pytest.raises(MetricError, match="unknown metric 'acc'; use one of logit_diff, logprob"):
        resolve_metric("acc")


def test_callable_metrics_get_last_token_logits_and_are_checked():
    def second(logits, inputs):
        return logits[:, 1]

    metric = resolve_metric(second)
    assert metric.name == "second"
    assert metric(LOGITS, _inputs()).tolist() == [2.0, -1.0]
    assert resolve_metric(metric) is metric
    with pytest.raises(
        MetricError, match=r"returned \(2, 4\); it must return one value per prompt"
    ):
        resolve_metric(lambda logits, inputs: logits)(LOGITS, _inputs())
    with pytest.raises(MetricError, match="returned 1 non-finite value"):
        resolve_metric(lambda logits, inputs: logits[:, 0].log() - 1.0)(LOGITS, _inputs())
    with pytest.raises(MetricError, match="returned 2 non-finite value"):
        resolve_metric(lambda logits, inputs: logits[:, 0] / 0.0 + 1)(LOGITS, _inputs())
    custom = Metric("mine", lambda logits, inputs: logits[:, 0, 2], higher_is="worse")
    assert custom(LOGITS, _inputs()).tolist() == [3.0, 5.0]


# --- end to end, against the models' own full logits ------------------------------------------------


@pytest.fixture(scope="module")
def ragged():
    # blocks only: the two models share the final norm and unembedding
    ref, itv = _builders.native_pair(
        lambda m: perturb_matching(m, lambda k: k.startswith("blocks."), scale=1.0)
    )
    pair = md.ModelPair(ref, itv)
    rows = [[3, 9, 4, 1, 7, 2], [12, 30, 5], [8, 8, 2, 40], [1, 2, 3, 4, 5]]
    tokens, lengths = pad(rows)
    with torch.no_grad():
        full = {k: pair.model(k)(tokens) for k in ("reference", "intervened")}
    return pair, rows, tokens, lengths, full


def _last(full, lengths):
    return full[torch.arange(len(lengths)), lengths - 1]


def test_builtin_metrics_read_each_prompt_at_its_own_last_token(ragged):
    pair, rows, tokens, lengths, full = ragged
    answers, wrong = contrast_answers(pair, tokens, lengths)
    ar = torch.arange(len(rows))
    for name in ("logit_diff", "logprob", "prob"):
        task = Task(
            rows, answers=answers, wrong=wrong if name == "logit_diff" else None, metric=name
        )
        shift = md.measure_shift(pair, task, n_boot=N_BOOT, warn=False)
        for key in ("reference", "intervened"):
            last = _last(full[key], lengths)
            if name == "logit_diff":
                want = last[ar, answers] - last[ar, wrong]
            else:
                want = last.log_softmax(-1)[ar, answers]
                want = want.exp() if name == "prob" else want
            got = getattr(shift, key)
            assert (got - want).abs().max().item() < 1e-5, (name, key)


def test_loss_metric_with_and_without_a_mask(ragged):
    pair, rows, tokens, lengths, full = ragged

    def by_hand(logits, mask):
        lp = logits.log_softmax(-1)
        out = []
        for b in range(len(rows)):
            ts = [t for t in range(1, int(lengths[b])) if mask[b, t]]
            out.append(-sum(lp[b, t - 1, tokens[b, t]].item() for t in ts) / len(ts))
        return torch.tensor(out)

    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    mask = real.clone()
    mask[:, 0] = False
    custom = mask.clone()
    custom[:, 1] = False  # score only from the third token on (every prompt has >= 3)
    for loss_mask, scored in ((None, mask), (custom, custom)):
        shift = md.measure_shift(
            pair, Task(rows, metric="loss", loss_mask=loss_mask), n_boot=N_BOOT, warn=False
        )
        for key in ("reference", "intervened"):
            want = by_hand(full[key], scored)
            assert (getattr(shift, key) - want).abs().max().item() < 1e-5, (loss_mask, key)


def test_kl_to_reference_is_zero_for_the_reference(ragged):
    pair, rows, _, lengths, full = ragged
    shift = md.measure_shift(pair, Task(rows, metric="kl_to_reference"), n_boot=N_BOOT)
    assert not shift.reference.any()
    ref = _last(full["reference"], lengths).log_softmax(-1)
    itv = _last(full["intervened"], lengths).log_softmax(-1)
    want = (ref.exp() * (ref - itv)).sum(-1)
    assert (shift.intervened - want).abs().max().item() < 1e-5
    assert shift.significant and shift.shift > 0
    # restoring the whole final residual makes the intervened model the reference: KL 0
    restored = md.patch(pair, Task(rows, metric="kl_to_reference"), "L2.resid_post", n_boot=N_BOOT)
    assert restored.per_prompt.abs().max().item() < 1e-5


def test_bad_custom_metrics_raise_through_the_engine(ragged):
    pair, rows, *_ = ragged
    with pytest.raises(MetricError, match="non-finite"):
        md.measure_shift(
            pair, Task(rows, metric=lambda logits, inputs: logits[:, 0] * float("nan"))
        )
    with pytest.raises(MetricError, match="non-finite"):
        md.sweep(
            pair,
            Task(rows, metric=lambda logits, inputs: torch.full_like(logits[:, 0], float("inf"))),
            "resid_pre",
        )
    with pytest.raises(MetricError, match=r"returned \(4, 1\)"):
        md.measure_shift(pair, Task(rows, metric=lambda logits, inputs: logits[:, :1]))
    with pytest.raises(MetricError, match=r"returned \(\)"):
        md.measure_shift(pair, Task(rows, metric=lambda logits, inputs: logits.sum()))
