"""Half precision: a bfloat16 pair ranks heads like its float32 original on the zoo (issue 14).

For the zoo pairs ``planted`` and ``induction``, a head_out sweep (reference->intervened) of the
shipped float32 pair is compared with the same sweep of the pair converted to bfloat16: the
Spearman correlation of the per-head scores (printed), the top-k heads (k = the ground truth's
head count) and the largest score difference.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mechdelta as md
from mechdelta.core.pair import ModelPair
from mechdelta.core.sites import Component
from mechdelta.patching.results import SweepResult
from mechdelta.patching.shift import PrecisionWarning
from mechdelta.stats.reliability import _spearman
from tests._reference import N_BOOT

# Measured (CPU, torch 2.13): Spearman 1.0 on both pairs; largest |score difference| 1.5e-4
# (planted) and 4.3e-4 (induction), where induction's 5th and 6th heads are 2.3e-3 apart.
MIN_SPEARMAN = 0.95  # one swap of neighbours among 8 heads gives 0.976
MAX_SCORE_DIFF = 5e-3


def _bfloat16(pair: ModelPair) -> ModelPair:
    """The pair in bfloat16 (converts the models in place: use the float32 pair first)."""
    return ModelPair(
        pair.reference.to(torch.bfloat16), pair.intervened.to(torch.bfloat16), names=pair.names
    )


def _top(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


@pytest.mark.parametrize("name", ["planted", "induction"])
def test_bfloat16_pair_ranks_heads_like_float32(name, capsys):
    entry = md.zoo.load(name)
    assert entry.pair.dtype == torch.float32 and entry.ground_truth is not None
    heads = [s for s in entry.ground_truth if s.kind is Component.HEAD_OUT]
    k = len(heads) or 3

    f32 = md.sweep(entry.pair, entry.task, "head_out", n_boot=N_BOOT, progress=False)
    half = _bfloat16(entry.pair)
    assert half.dtype == torch.bfloat16
    # Half precision may raise PrecisionWarning by design, when the shift is within ten rounding
    # scales of the logits. These shifts (|shift| 15 and 5 nats) are far above that, so nothing
    # may warn: the warnings are recorded and checked rather than turned into errors or ignored.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b16 = md.sweep(half, entry.task, "head_out", n_boot=N_BOOT, progress=False)
    assert not [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert not caught, [str(w.message) for w in caught]

    assert isinstance(f32, SweepResult) and isinstance(b16, SweepResult)
    a, b = f32.scores.flatten().double(), b16.scores.flatten().double()
    rho = _spearman(a, b)
    diff = float((a - b).abs().max())
    with capsys.disabled():
        print(f"\n{name}: bf16 vs float32 head_out Spearman {rho:.4f}, max |Δscore| {diff:.2e}")
    assert rho >= MIN_SPEARMAN
    assert _top(a, k) == _top(b, k)
    assert diff <= MAX_SCORE_DIFF
    assert float(a.abs().max()) > 0.1  # the sweep finds a shift-carrying head: not vacuous
