"""sweep(): equality with TransformerLens's patching functions and with a naive one-site-per-forward
loop, on a native pair and on tiny GPT-2 / NeoX / Llama-GQA pairs; batching, prefix reuse, ragged
prompts, grouped-query attention, and bad input."""

from __future__ import annotations

import pytest
import torch

import mechdelta as md
from mechdelta import Component, ConfigError, Site, SiteError, TaskError
from mechdelta.patching._engine import PatchEngine
from tests import _builders
from tests._reference import (
    N_BOOT,
    contrast_answers,
    contrast_task,
    last_token_logit_diff,
    naive_patch,
    pad,
    perturb_matching,
    random_tokens,
    tl_metric,
)

FAMILIES = ("native", *_builders.FAMILIES)
TOL = 1e-5


@pytest.fixture(scope="module")
def native_pair():
    ref, itv = _builders.native_pair(lambda m: perturb_matching(m, lambda k: True))
    return md.ModelPair(ref, itv, names=("native-ref", "native-itv"))


@pytest.fixture(scope="module")
def setups(native_pair, hf_pairs):
    """Per family: (pair, tokens [4, 5], task with contrasting answers, reference cache)."""
    out = {}
    for family in FAMILIES:
        pair = native_pair if family == "native" else hf_pairs[family]
        tokens = random_tokens(4, 5, int(pair.cfg.d_vocab), seed=11)
        task = contrast_task(pair, tokens)
        with torch.no_grad():
            _, cache = pair.reference.run_with_cache(tokens)
        out[family] = (pair, tokens, task, cache)
    return out


def _sweep(pair, task, component, **kwargs):
    return md.sweep(pair, task, component, n_boot=N_BOOT, **kwargs)


# --- equal to TransformerLens ---------------------------------------------------------------------

TL_CASES = [
    ("head_z", False, "get_act_patch_attn_head_out_all_pos"),
    ("head_z", True, "get_act_patch_attn_head_out_by_pos"),
    ("resid_pre", True, "get_act_patch_resid_pre"),
    ("attn_out", True, "get_act_patch_attn_out"),
    ("mlp_out", True, "get_act_patch_mlp_out"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("component", "per_position", "tl_name"), TL_CASES)
def test_patched_metric_equals_transformer_lens(setups, family, component, per_position, tl_name):
    from transformer_lens import patching

    pair, tokens, task, cache = setups[family]
    answers, wrong = contrast_answers(pair, tokens)
    want = getattr(patching, tl_name)(pair.intervened, tokens, cache, tl_metric(answers, wrong))
    got = _sweep(pair, task, component, per_position=per_position)
    assert got.direction is md.Direction.REFERENCE_TO_INTERVENED
    if component == "head_z":
        expected_dims = ("layer", "position", "head") if per_position else ("layer", "head")
    else:
        expected_dims = ("layer", "position")
    assert got.dims == expected_dims
    # TL's by-position head output is [layer, pos, head]: the same layout as mechdelta's dims
    assert tuple(got.patched.shape) == tuple(want.shape)
    assert (got.patched - want).abs().max().item() < TOL
    # the sweep really moved something (else equality would be vacuous)
    assert (got.patched - got.shift.intervened_mean).abs().max().item() > 1e-3


# --- a naive loop, batching and prefix reuse ------------------------------------------------------

# Every component, all positions and single positions, in layers 0..2 (prompts of 5 tokens).
NAIVE_SITES = [
    Site("embed", 0),
    Site("resid_pre", 0, position=0),
    Site("resid_pre", 2, position=4),
    Site("resid_mid", 1),
    Site("resid_post", 0, position=2),
    Site("attn_out", 1),
    Site("attn_out", 2, position=3),
    Site("mlp_out", 0),
    Site("mlp_out", 1, position=4),
    Site("head_z", 0, head=1),
    Site("head_z", 2, head=3, position=4),
    Site("head_out", 1, head=2),
    Site("head_out", 2, head=0, position=1),
    Site("head_out", 0, head=3, position=4),
    Site("head_q", 2, head=1, position=4),
    Site("head_k", 1, head=3),
    Site("head_v", 0, head=2, position=3),
    Site("head_pattern", 1, head=0, position=4),
    Site("head_pattern", 2, head=2),
    Site("mlp_neuron", 0, neuron=7),
    Site("mlp_neuron", 2, neuron=100, position=4),
]
DIRECTIONS = (md.Direction.REFERENCE_TO_INTERVENED, md.Direction.INTERVENED_TO_REFERENCE)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_naive_loop_batched_or_not(setups, family):
    """One site per variant, every component: the engine's batched runs (prompts split across
    passes, several variants stacked per pass, with and without prefix reuse) equal a naive loop
    of one full forward per site."""
    pair, tokens, task, _ = setups[family]
    sites = [s for s in NAIVE_SITES if not (family == "neox" and s.kind is Component.RESID_MID)]
    answers, wrong = contrast_answers(pair, tokens)
    metric = last_token_logit_diff(answers, wrong)
    engines = {
        # 4 prompts: budget 3 splits the prompts (rows 0-2, then 3), one variant per pass
        "budget=3": PatchEngine(pair, task, sites=sites, batch_budget=3),
        # budget 9: all 4 prompts, two variants stacked per pass, every pass from the embedding
        "budget=9, no prefix reuse": PatchEngine(
            pair, task, sites=sites, batch_budget=9, prefix_reuse=False
        ),
    }
    for direction in DIRECTIONS:
        source = pair.model(direction.source)
        target = pair.model(direction.target)
        want = torch.stack([naive_patch(source, target, tokens, s, metric) for s in sites])
        for label, engine in engines.items():
            got = engine.run(direction, [[s] for s in sites])
            err = (got - want).abs().amax(1)
            assert err.max().item() < TOL, (label, direction, sites[int(err.argmax())])
        # almost every site moves the metric (so the comparison is not vacuous)
        clean = engines["budget=3"].metric_of(direction.target)
        moved = (want - clean).abs().amax(1) > 1e-4
        assert moved.sum().item() >= len(sites) - 2


def test_sweep_batching_and_prefix_reuse_do_not_change_numbers(setups):
    pair, _, task, _ = setups["native"]
    kwargs = {"positions": [0, 4], "direction": "both"}
    base = _sweep(pair, task, "head_out", **kwargs)
    assert base.reference_to_intervened.dims == ("layer", "position", "head")
    variants = {
        "budget=3": _sweep(pair, task, "head_out", batch_budget=3, **kwargs),
        "budget=9, no prefix reuse": _sweep(
            pair, task, "head_out", batch_budget=9, prefix_reuse=False, **kwargs
        ),
    }
    for label, other in variants.items():
        for a, b in zip(base, other, strict=True):
            diff = (a.per_prompt - b.per_prompt).abs().max().item()
            assert diff < TOL, (label, a.direction, diff)
            assert torch.equal(a.ci.isnan(), b.ci.isnan())


@pytest.mark.parametrize("family", _builders.FAMILIES)
@pytest.mark.parametrize("component", ["head_out", "head_pattern", "head_k", "resid_pre"])
def test_position_reuse_on_hf_models_changes_no_numbers(setups, family, component):
    """By-position sweeps on HF models start each patched pass at the patched position from the
    model's clean KV cache; the numbers equal the plain full-sequence path."""
    pair, _, task, _ = setups[family]
    fast = _sweep(pair, task, component, per_position=True, batch_budget=8)
    plain = _sweep(pair, task, component, per_position=True, batch_budget=8, prefix_reuse=False)
    assert fast.provenance["engine"]["position_reuse"] == {"intervened": True}
    assert plain.provenance["engine"]["position_reuse"] == {}  # never tried without reuse
    diff = (fast.per_prompt - plain.per_prompt).abs().max().item()
    assert diff < TOL, diff
    # positions after the first carry real effects (the comparison is not vacuous)
    assert (fast.per_prompt[:, 1:] - fast.shift.intervened).abs().max().item() > 1e-4


def test_native_models_reuse_positions_from_their_recorded_keys_and_values(setups):
    """TL-native bridges keep no KV cache of their own: the runner records keys/values in a
    clean forward (tests/test_position_reuse.py checks the numbers against full forwards)."""
    pair, _, task, _ = setups["native"]
    result = _sweep(pair, task, "head_z", per_position=True)
    assert result.provenance["engine"]["position_reuse"] == {"intervened": True}


# --- ragged prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["native", "llama"])
def test_ragged_task_equals_each_prompt_alone(setups, family):
    """Right-padded ragged prompts: each prompt's clean and patched metrics equal naive runs of
    that prompt alone (no padding), read at its own last token."""
    pair = setups[family][0]
    vocab = int(pair.cfg.d_vocab)
    rows = [random_tokens(1, n, vocab, seed=n)[0].tolist() for n in (6, 3, 5, 4)]
    task = contrast_task(pair, rows)
    tokens, lengths = pad(rows)
    answers, wrong = contrast_answers(pair, tokens, lengths)
    both = _sweep(pair, task, "head_out", layers=[0, 2], direction="both")
    for b, row in enumerate(rows):
        alone = torch.tensor([row])
        metric = last_token_logit_diff(answers[b : b + 1], wrong[b : b + 1])
        with torch.no_grad():
            clean = {k: metric(pair.model(k)(alone)).item() for k in ("reference", "intervened")}
        assert abs(both.shift.reference[b].item() - clean["reference"]) < TOL
        assert abs(both.shift.intervened[b].item() - clean["intervened"]) < TOL
        for result in both:
            src = pair.model(result.direction.source)
            tgt = pair.model(result.direction.target)
            flat = result.per_prompt.reshape(-1, len(rows))
            for i in (0, 3, 6):
                want = naive_patch(src, tgt, alone, result.sites[i], metric).item()
                assert abs(flat[i, b].item() - want) < TOL, (b, result.sites[i])


# --- grouped-query attention ----------------------------------------------------------------------


def test_gqa_kv_sites_name_the_shared_kv_head(setups):
    pair, tokens, task, _ = setups["llama"]
    assert pair.shape.n_kv_heads == 2 and pair.shape.group_size == 2
    for component in ("head_k", "head_v"):
        both = _sweep(pair, task, component, direction="both")
        for result in both:
            p = result.per_prompt
            # query heads 0 and 1 read kv head 0, heads 2 and 3 kv head 1: the same patch
            assert torch.equal(p[:, 0], p[:, 1]) and torch.equal(p[:, 2], p[:, 3])
            assert not torch.equal(p[:, 0], p[:, 2])
            assert result.activation_delta is not None
            assert torch.equal(result.activation_delta[:, 0], result.activation_delta[:, 1])
    site = Site("head_k", 1, head=3)
    res = md.patch(pair, task, site, n_boot=N_BOOT)
    answers, wrong = contrast_answers(pair, tokens)
    kv = pair.intervened.run_with_cache(tokens)[1]["blocks.1.attn.hook_k"]
    assert kv.shape[2] == 2  # the activation has kv heads, not query heads
    want = naive_patch(
        pair.reference, pair.intervened, tokens, site, last_token_logit_diff(answers, wrong)
    )
    assert (res.per_prompt - want).abs().max().item() < TOL


# --- bad input ------------------------------------------------------------------------------------


def test_bad_sweep_arguments_raise_typed_errors(setups):
    pair, _, task, _ = setups["native"]
    with pytest.raises(SiteError, match="unknown component 'head_zz'"):
        _sweep(pair, task, "head_zz")
    with pytest.raises(SiteError, match=r"layers \[3\] out of range \[0, 3\)"):
        _sweep(pair, task, "resid_pre", layers=[0, 3])
    with pytest.raises(SiteError, match=r"heads \[4\] out of range \[0, 4\)"):
        _sweep(pair, task, "head_out", heads=[4])
    with pytest.raises(SiteError, match=r"positions \[5\] out of range \[0, 5\)"):
        _sweep(pair, task, "resid_pre", positions=[5])
    with pytest.raises(SiteError, match=r"neurons \[256\] out of range \[0, 256\)"):
        _sweep(pair, task, "mlp_neuron", neurons=[256])
    with pytest.raises(ConfigError, match="unknown direction 'sideways'"):
        _sweep(pair, task, "head_out", direction="sideways")
    with pytest.raises(ConfigError, match="batch_budget must be a positive int"):
        _sweep(pair, task, "head_out", batch_budget=0)
    with pytest.raises(ConfigError, match="heads= applies to per-head components"):
        _sweep(pair, task, "resid_pre", heads=[0])
    with pytest.raises(ConfigError, match="duplicates"):
        _sweep(pair, task, "resid_pre", layers=[1, 1])
    with pytest.raises(ConfigError, match="empty"):
        _sweep(pair, task, "resid_pre", layers=[])


def test_by_position_sweep_on_ragged_prompts_raises(setups):
    pair = setups["native"][0]
    rows = [[1, 2, 3, 4], [5, 6, 7]]
    task = md.Task(rows, answers=[1, 2], wrong=[3, 4])
    with pytest.raises(
        TaskError, match=r"one token length \(got lengths \[3, 4\]\).*align='right'"
    ):
        _sweep(pair, task, "head_out", per_position=True)
    with pytest.raises(TaskError, match="one token length"):
        _sweep(pair, task, "resid_pre", positions=[0])


def test_resid_mid_on_parallel_attention_raises(setups):
    pair, _, task, _ = setups["neox"]
    with pytest.raises(SiteError, match="resid_mid"):
        _sweep(pair, task, "resid_mid")
    with pytest.raises(SiteError, match="resid_mid"):
        md.patch(pair, task, Site(Component.RESID_MID, 0), n_boot=N_BOOT)


def test_prompts_longer_than_n_ctx_raise(setups):
    pair = setups["native"][0]
    n_ctx = int(pair.cfg.n_ctx)
    task = md.Task([list(range(1, n_ctx + 2))], answers=[1], wrong=[2])
    with pytest.raises(TaskError, match=f"more than the model's n_ctx={n_ctx}"):
        _sweep(pair, task, "head_out")


def test_out_of_range_sites_in_a_patch_raise(setups):
    pair, _, task, _ = setups["native"]
    bad = {
        "layer 3 out of range \\(model has 3 layers\\)": Site("resid_pre", 3),
        "head 4 out of range \\(model has 4 heads\\)": Site("head_out", 1, head=4),
        "position 5 out of range \\(prompt length is 5\\)": Site("attn_out", 0, position=5),
        "neuron 256 out of range \\(d_mlp is 256\\)": Site("mlp_neuron", 2, neuron=256),
    }
    for message, site in bad.items():
        with pytest.raises(SiteError, match=message):
            md.patch(pair, task, site, n_boot=N_BOOT)
    with pytest.raises(SiteError, match="cannot parse site 'L1X2'"):
        md.patch(pair, task, "L1X2", n_boot=N_BOOT)
    attn_only = md.ModelPair(
        *_builders.native_pair(
            lambda m: perturb_matching(m, lambda k: True), n_layers=1, attn_only=True
        )
    )
    only_task = contrast_task(attn_only, random_tokens(2, 4, 50))
    with pytest.raises(SiteError, match="attention-only"):
        _sweep(attn_only, only_task, "mlp_out")
    with pytest.raises(SiteError, match="attention-only"):
        md.patch(attn_only, only_task, "L0N3", n_boot=N_BOOT)


@pytest.mark.parametrize("family", ["native", "llama"])
def test_right_aligned_positions_on_ragged_prompts_equal_each_prompt_alone(setups, family):
    """``align="right"``: frame position a is token ``len_i - k + a`` of prompt i (k = the
    shortest length); each prompt's patched metric equals a naive patch of that prompt alone at
    its own real position."""
    pair = setups[family][0]
    vocab = int(pair.cfg.d_vocab)
    rows = [random_tokens(1, n, vocab, seed=n)[0].tolist() for n in (6, 3, 5, 4)]
    tokens, lengths = pad(rows)
    answers, wrong = contrast_answers(pair, tokens, lengths)
    task = md.Task(rows, answers=answers, wrong=wrong, align="right")
    both = _sweep(pair, task, "head_out", per_position=True, layers=[0, 2], direction="both")
    assert both.reference_to_intervened.coords["position"] == (0, 1, 2)
    for result in both:
        src = pair.model(result.direction.source)
        tgt = pair.model(result.direction.target)
        flat = result.per_prompt.reshape(-1, len(rows))
        for i in (0, 5, 13, 22):
            site = result.sites[i]
            assert site.position is not None
            for b, row in enumerate(rows):
                metric = last_token_logit_diff(answers[b : b + 1], wrong[b : b + 1])
                real = site.with_position(len(row) - 3 + site.position)
                want = naive_patch(src, tgt, torch.tensor([row]), real, metric).item()
                assert abs(flat[i, b].item() - want) < TOL, (b, str(site))
    # a joint patch at one frame position of several components
    joint = md.patch(pair, task, ["L1P2.resid_pre", "L0H1P1"], n_boot=N_BOOT)
    assert joint.per_prompt.shape == (4,)


def test_right_alignment_labels_only_shared_tokens():
    rows = [[9, 4, 5, 6], [7, 5, 6], [1, 2, 3, 5, 6]]
    prepared = md.Task(rows, answers=[1, 2, 3], wrong=[4, 5, 6], align="right").prepare(
        None, n_ctx=16, d_vocab=20
    )
    assert prepared.frame_len == 3
    assert prepared.frame_offsets.tolist() == [1, 0, 2]
    assert prepared.position_tokens() == [None, "5", "6"]
    left = md.Task(rows, answers=[1, 2, 3], wrong=[4, 5, 6]).prepare(None, n_ctx=16, d_vocab=20)
    assert left.frame_offsets is None and left.position_tokens()[0] is None
    with pytest.raises(TaskError, match="align must be 'left' or 'right'"):
        md.Task(rows, answers=[1, 2, 3], wrong=[4, 5, 6], align="middle")
