"""measure_shift and factorial: the metric on both models, the shift with its interval, the null-
shift warning, and the 2x2 model x input design."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mechdelta as md
from mechdelta import ShiftNotSignificantWarning, Task, TaskError
from tests import _builders
from tests._reference import N_BOOT, contrast_answers, last_logits, logit_diff, perturb_matching


@pytest.fixture(scope="module")
def pair():
    ref, itv = _builders.native_pair(lambda m: perturb_matching(m, lambda k: True))
    return md.ModelPair(ref, itv, names=("ref-net", "itv-net"))


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(4)
    return torch.randint(1, 50, (8, 7), generator=gen)


def test_measure_shift_reports_both_models_and_the_shift_with_its_ci(pair, tokens):
    answers, wrong = contrast_answers(pair, tokens)
    task = Task(tokens, answers=answers, wrong=wrong, name="contrast")
    result = md.measure_shift(pair, task, n_boot=500, alpha=0.1, seed=3)
    for key in ("reference", "intervened"):
        want = logit_diff(last_logits(pair.model(key), tokens), answers, wrong)
        assert (getattr(result, key) - want).abs().max().item() < 1e-5
    assert result.metric == "logit_diff" and result.task == "contrast"
    assert result.n_boot == 500 and result.alpha == 0.1
    assert abs(result.shift - (result.intervened_mean - result.reference_mean)) < 1e-9
    assert torch.equal(result.per_prompt_shift, result.intervened - result.reference)
    lo, hi = result.ci
    assert 0 < lo <= result.shift <= hi  # every prompt moved up: an interval above zero
    assert result.significant
    assert "shift +" in str(result) and "90% CI" in str(result)
    assert "not distinguishable" not in str(result)
    assert result.to_dataframe().columns.tolist() == ["prompt", "reference", "intervened", "shift"]
    prov = result.provenance
    assert prov["models"]["reference"]["name"] == "ref-net"
    assert prov["models"]["intervened"]["weights_hash"] == pair.intervened_hash
    assert prov["task"]["n_prompts"] == 8 and prov["task"]["metric"] == "logit_diff"
    # the interval is seeded
    again = md.measure_shift(pair, task, n_boot=500, alpha=0.1, seed=3)
    assert again.ci == result.ci
    assert md.measure_shift(pair, task, n_boot=500, alpha=0.1, seed=4).ci != result.ci


def test_a_null_shift_warns(pair, tokens):
    """Each prompt twice, once with answer and wrong swapped: per-prompt shifts cancel exactly."""
    answers, wrong = contrast_answers(pair, tokens[:4])
    doubled = Task(
        torch.cat([tokens[:4], tokens[:4]]),
        answers=torch.cat([answers, wrong]),
        wrong=torch.cat([wrong, answers]),
    )
    with pytest.warns(ShiftNotSignificantWarning, match="not distinguishable from zero"):
        result = md.measure_shift(pair, doubled, n_boot=N_BOOT)
    assert not result.significant
    lo, hi = result.ci
    assert lo < 0 < hi and abs(result.shift) < 1e-5
    assert "(not distinguishable from 0)" in str(result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        md.measure_shift(pair, doubled, n_boot=N_BOOT, warn=False)
    # sweeps and patches warn too: their scores are fractions of that shift
    with pytest.warns(ShiftNotSignificantWarning):
        md.sweep(pair, doubled, "resid_pre", n_boot=N_BOOT)


# --- factorial ------------------------------------------------------------------------------------


def test_factorial_cells_equal_measure_shift_on_each_input(pair, tokens):
    gen = torch.Generator().manual_seed(9)
    corrupted = tokens.clone()
    corrupted[:, -3:] = torch.randint(1, 50, (8, 3), generator=gen)
    answers, wrong = contrast_answers(pair, tokens)
    task = Task(tokens, answers=answers, wrong=wrong, corrupted=corrupted)
    result = md.factorial(pair, task, n_boot=N_BOOT)
    clean = md.measure_shift(pair, task, n_boot=N_BOOT)
    dirty = md.measure_shift(
        pair, Task(corrupted, answers=answers, wrong=wrong), n_boot=N_BOOT, warn=False
    )
    assert set(result.cells) == {
        "reference/clean",
        "intervened/clean",
        "reference/corrupted",
        "intervened/corrupted",
    }
    assert torch.equal(result.cells["reference/clean"], clean.reference)
    assert torch.equal(result.cells["intervened/clean"], clean.intervened)
    assert torch.equal(result.cells["reference/corrupted"], dirty.reference)
    assert torch.equal(result.cells["intervened/corrupted"], dirty.intervened)
    interaction = (clean.intervened_mean - dirty.intervened_mean) - (
        clean.reference_mean - dirty.reference_mean
    )
    assert abs(result.interaction - interaction) < 1e-9
    assert abs(result.model_effect - clean.shift) < 1e-9
    assert abs(result.input_effect - (clean.reference_mean - dirty.reference_mean)) < 1e-9
    lo, hi = result.interaction_ci
    assert lo <= result.interaction <= hi
    table = result.table()
    assert table.shape == (2, 2) and table.loc["intervened", "corrupted"] == pytest.approx(
        dirty.intervened_mean
    )
    df = result.to_dataframe()
    assert len(df) == 4 * 8 and set(df.columns) == {"model", "inputs", "prompt", "metric"}
    assert "interaction" in str(result)


def test_factorial_needs_aligned_corrupted_prompts(pair, tokens):
    answers, wrong = contrast_answers(pair, tokens)
    with pytest.raises(TaskError, match="factorial needs Task\\(corrupted="):
        md.factorial(pair, Task(tokens, answers=answers, wrong=wrong))
    rows = tokens.tolist()
    shorter = [r[:-1] for r in rows]
    task = Task(rows, answers=answers, wrong=wrong, corrupted=shorter)
    with pytest.raises(TaskError, match="corrupted prompt 0 has 6 tokens, its prompt 7"):
        md.factorial(pair, task)
    with pytest.raises(TaskError, match="corrupted inputs must align"):
        md.measure_shift(pair, task)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_too_few_prompts_warn_and_are_never_significant(pair, tokens, n):
    """One prompt used to give a zero-width interval and ``significant == True``."""
    answers, wrong = contrast_answers(pair, tokens[:n])
    task = Task(tokens[:n], answers=answers, wrong=wrong)
    with pytest.warns(md.TooFewPromptsWarning, match="too few for a bootstrap interval"):
        result = md.measure_shift(pair, task, n_boot=N_BOOT)
    assert not result.significant
    assert all(math.isnan(x) for x in result.ci)
    assert "too few prompts for an interval" in str(result)
    # site intervals too: NaN, not zero-width
    with pytest.warns(md.TooFewPromptsWarning):
        patched = md.patch(pair, task, "L1H0", n_boot=N_BOOT)
    assert all(math.isnan(x) for x in patched.ci)
    # a filter on ShiftNotSignificantWarning also covers it
    assert issubclass(md.TooFewPromptsWarning, ShiftNotSignificantWarning)


def test_min_prompts_follows_alpha():
    from mechdelta.stats.bootstrap import min_prompts

    assert min_prompts(0.05) == 4 and min_prompts(0.001) == 5 and min_prompts(0.5) == 3


def test_a_half_precision_pair_with_a_small_shift_warns():
    """bf16 logits carry ~3 significant digits: a shift near their rounding is flagged; the same
    shift in float32, and a large bf16 shift, are not."""

    def small(m):
        m.blocks[1].attn.o.weight.mul_(1.002)

    def large(m):
        perturb_matching(m, lambda k: True)

    rows = torch.randint(1, 50, (8, 7), generator=torch.Generator().manual_seed(4))
    for dtype, edit, warns in (
        (torch.bfloat16, small, True),
        (torch.float32, small, False),
        (torch.bfloat16, large, False),
    ):
        ref, itv = _builders.native_pair(edit)
        pair = md.ModelPair(ref.to(dtype), itv.to(dtype))
        answers, wrong = contrast_answers(pair, rows)
        task = Task(rows, answers=answers, wrong=wrong)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            md.measure_shift(pair, task, n_boot=N_BOOT)
        got = [w for w in caught if issubclass(w.category, md.PrecisionWarning)]
        assert bool(got) == warns, (dtype, edit.__name__, [str(w.message) for w in caught])
