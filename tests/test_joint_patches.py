"""Joint patches splice the *union* of their sites' activations (issue 9): a site contained in
another adds nothing, overlapping sites never count a change twice, and order never matters.
Checked against an independent mask-based implementation on native, GPT-2, NeoX and Llama-GQA
pairs."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta import Direction, Site
from mechdelta.core.sites import union
from mechdelta.patching._engine import PatchEngine
from tests import _builders
from tests._reference import (
    contrast_task,
    last_token_logit_diff,
    naive_union_patch,
    perturb_head,
    random_tokens,
)

TOL = 1e-4
R2I, I2R = Direction.REFERENCE_TO_INTERVENED, Direction.INTERVENED_TO_REFERENCE
SEQ = 6


def _pool(family: str) -> list[Site]:
    """Sites that overlap in every way a joint patch can: the same head at all and one position,
    head writes inside their layer's attention output, z before W_O, projections, neurons inside
    the MLP output, residual points around them."""
    sites = [
        Site("head_out", 1, head=2),
        Site("head_out", 1, head=2, position=4),
        Site("head_out", 1, head=2, position=5),
        Site("head_out", 1, head=0, position=5),
        Site("head_out", 0, head=1),
        Site("attn_out", 1),
        Site("attn_out", 1, position=5),
        Site("attn_out", 1, position=3),
        Site("head_z", 1, head=2),
        Site("head_z", 1, head=2, position=5),
        Site("head_q", 1, head=1, position=5),
        Site("head_k", 1, head=3),
        Site("head_v", 1, head=2, position=2),
        Site("head_pattern", 1, head=0, position=5),
        Site("mlp_out", 1, position=5),
        Site("mlp_neuron", 1, neuron=3, position=5),
        Site("mlp_neuron", 1, neuron=3),
        Site("resid_pre", 1, position=4),
        Site("resid_post", 0, position=5),
        Site("resid_pre", 2, position=1),
    ]
    if family != "neox":  # parallel attention/MLP: no resid_mid
        sites.append(Site("resid_mid", 1, position=5))
    return sites


@pytest.fixture(scope="module")
def native_pair():
    ref = _builders.native_bridge(0)
    itv = _builders.native_bridge(1)
    return md.ModelPair(ref, itv)


def _pairs(family: str, native_pair: Any, hf_pairs: Any) -> md.ModelPair:
    return native_pair if family == "native" else hf_pairs[family]


@pytest.mark.parametrize("family", ["native", *_builders.FAMILIES])
def test_random_joint_patches_equal_a_mask_based_union(family, native_pair, hf_pairs):
    pair = _pairs(family, native_pair, hf_pairs)
    vocab = int(pair.cfg.d_vocab)
    tokens = random_tokens(4, SEQ, vocab, seed=11)
    task = contrast_task(pair, tokens)
    answers, wrong = task.answers, task.wrong
    metric = last_token_logit_diff(torch.as_tensor(answers), torch.as_tensor(wrong))
    pool = _pool(family)
    rng = random.Random(family)
    variants = [rng.sample(pool, rng.randint(2, 5)) for _ in range(10)]
    # the issue's reported cases, and a site together with what contains it
    variants += [
        [Site("attn_out", 1), Site("head_out", 1, head=2)],
        [Site("head_out", 1, head=2), Site("head_out", 1, head=2, position=5)],
        [Site("attn_out", 1, position=5), Site("head_out", 1, head=2, position=5)],
        [Site("head_out", 1, head=2), Site("attn_out", 1, position=5)],
        [Site("head_z", 1, head=2), Site("head_out", 1, head=2, position=5)],
    ]
    engine = PatchEngine(pair, task, batch_budget=16)
    for d in (R2I, I2R):
        src = getattr(pair, d.source)
        tgt = getattr(pair, d.target)
        got = engine.run(d, variants)
        for v, variant in enumerate(variants):
            want = naive_union_patch(src, tgt, tokens, variant, metric)
            err = (got[v] - want).abs().max().item()
            assert err < TOL, f"{family} {d.value} {[str(s) for s in variant]}: |Δ| {err:.3g}"
            shuffled = list(reversed(variant))
            again = engine.run(d, [shuffled])[0]
            assert torch.allclose(again, got[v], atol=TOL), "the order of the sites mattered"


@pytest.mark.parametrize("family", ["native", "gpt2", "llama"])
def test_adding_contained_sites_changes_nothing(family, native_pair, hf_pairs):
    pair = _pairs(family, native_pair, hf_pairs)
    tokens = random_tokens(4, SEQ, int(pair.cfg.d_vocab), seed=12)
    task = contrast_task(pair, tokens)
    engine = PatchEngine(pair, task)
    cases = [
        ([Site("head_out", 1, head=2)], [Site("head_out", 1, head=2, position=p) for p in (3, 5)]),
        ([Site("attn_out", 1)], [Site("head_out", 1, head=h) for h in range(4)]),
        ([Site("attn_out", 1, position=5)], [Site("head_out", 1, head=1, position=5)]),
        ([Site("head_k", 1, head=3)], [Site("head_k", 1, head=3, position=2)]),
        ([Site("resid_pre", 1)], [Site("resid_pre", 1, position=4)]),
    ]
    for d in (R2I, I2R):
        for a, b in cases:
            alone, joint = engine.run(d, [a, [*a, *b]])
            assert torch.allclose(alone, joint, atol=TOL), f"{a} ∪ {b} != {a} ({d.value})"


def test_the_issue_cases_on_a_w_o_only_pair():
    """A pair differing only in L1H2's W_O: attn_out, the head, and both together all restore
    the shift exactly once (before the fix the joint patches scored 0.37 and -5.0)."""
    ref = _builders.native_bridge(0)
    itv = _builders.native_bridge(0)
    with torch.no_grad():
        perturb_head(itv, 1, 2, "o", d_head=16)
    pair = md.ModelPair(ref, itv)
    task = contrast_task(pair, random_tokens(6, SEQ, 50, seed=5))
    cases = [
        ["L1.attn_out"],
        ["L1H2"],
        ["L1.attn_out", "L1H2"],
        ["L1H2", "L1H2P5"],
        ["L1P5.attn_out", "L1H2P5"],
        ["L1P5.attn_out"],
    ]
    for d in ("reference->intervened", "intervened->reference"):
        r = {tuple(c): md.patch(pair, task, c, d, n_boot=100) for c in cases}
        full = r[("L1H2",)].per_prompt
        assert r[("L1.attn_out",)].score == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(r[("L1.attn_out", "L1H2")].per_prompt, full, atol=TOL)
        assert torch.allclose(r[("L1H2", "L1H2P5")].per_prompt, full, atol=TOL)
        pos5 = r[("L1P5.attn_out",)].per_prompt
        assert torch.allclose(r[("L1P5.attn_out", "L1H2P5")].per_prompt, pos5, atol=TOL)


def test_union_drops_covered_sites_and_keeps_order():
    a, b = Site("head_out", 1, head=2), Site("head_out", 1, head=2, position=5)
    out = Site("attn_out", 1, position=5)
    assert union([b, a, b]) == (a,)
    assert union([b, out]) == (out,)
    assert union([a, out]) == (a, out)  # the head at other positions is not inside out
    assert Site("attn_out", 1).covers(Site("head_out", 1, head=0, position=3))
    assert not Site("attn_out", 0).covers(Site("head_out", 1, head=0))
    assert not Site("head_z", 1, head=2).covers(Site("head_out", 1, head=2))


@pytest.mark.parametrize("family", ["native", "gpt2", "llama"])
def test_resid_mid_splices_the_residual_stream(family, native_pair, hf_pairs):
    """The residual after attention is resid_pre + attn_out: splicing it equals splicing both at
    every position, or at the last position (no later query reads the new resid_pre there). In
    TL 4 bridges hook_resid_mid is only the MLP norm's input; writing there left the residual
    stream unchanged."""
    pair = _pairs(family, native_pair, hf_pairs)
    task = contrast_task(pair, random_tokens(4, SEQ, int(pair.cfg.d_vocab), seed=13))
    engine = PatchEngine(pair, task)
    for d in (R2I, I2R):
        for pos in (None, SEQ - 1):
            mid = [Site("resid_mid", 1, position=pos)]
            both = [Site("resid_pre", 1, position=pos), Site("attn_out", 1, position=pos)]
            got, want = engine.run(d, [mid, both])
            assert torch.allclose(got, want, atol=TOL), (family, d.value, pos)
