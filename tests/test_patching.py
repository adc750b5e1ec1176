"""Invariants of cross-model patching, on pairs whose difference is known by construction, and the
engine's own sanity checks (hooks that never fire, edits a bridge discards)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta import Component, Direction, PatchingError, ShiftNotSignificantWarning, Site
from mechdelta.patching._engine import PatchEngine
from tests import _builders
from tests._reference import (
    N_BOOT,
    contrast_task,
    perturb_head,
    perturb_matching,
    random_tokens,
)

TOL = 1e-5
R2I, I2R = Direction.REFERENCE_TO_INTERVENED, Direction.INTERVENED_TO_REFERENCE


@pytest.fixture(scope="module")
def twin():
    """Two native bridges of one config; tests load one's weights into the other and edit them."""
    return _builders.native_bridge(0), _builders.native_bridge(0)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(6, 6, 50, seed=5)


def make_pair(twin: Any, edit: Any) -> md.ModelPair:
    ref, itv = twin
    itv.load_state_dict(ref.state_dict())
    with torch.no_grad():
        edit(itv)
    return md.ModelPair(ref, itv)


def _sweep(pair, task, component, **kwargs):
    return md.sweep(pair, task, component, n_boot=N_BOOT, **kwargs)


# Every component, layer 0 (so every site sits before block 1), all and single positions.
LAYER0_SITES = [
    Site("embed", 0),
    Site("resid_pre", 0),
    Site("resid_pre", 1, position=3),
    Site("resid_mid", 0),
    Site("resid_post", 0, position=5),
    Site("attn_out", 0),
    Site("mlp_out", 0, position=2),
    Site("head_z", 0, head=1),
    Site("head_out", 0, head=3),
    Site("head_out", 0, head=0, position=5),
    Site("head_q", 0, head=2),
    Site("head_k", 0, head=0, position=4),
    Site("head_v", 0, head=1),
    Site("head_pattern", 0, head=3, position=5),
    Site("mlp_neuron", 0, neuron=11),
]


# --- self-patching --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::mechdelta.ShiftNotSignificantWarning")
def test_self_patch_changes_nothing(twin, tokens):
    model = twin[0]
    with pytest.warns(UserWarning, match="identical weights"):
        pair = md.ModelPair(model, model, allow_identical=True)
    task = md.Task(tokens, answers=tokens[:, 0], wrong=tokens[:, 1])
    clean = md.measure_shift(pair, task, n_boot=N_BOOT, warn=False)
    assert torch.equal(clean.reference, clean.intervened)
    for component, kwargs in (("head_out", {"per_position": True}), ("resid_post", {})):
        for result in _sweep(pair, task, component, direction="both", **kwargs):
            assert torch.equal(result.per_prompt, clean.reference.expand_as(result.per_prompt))
            assert result.scores.isnan().all()  # no shift: every fraction is undefined
            assert result.activation_delta is not None and not result.activation_delta.any()
    # The engine's no-op skip is not what makes this hold: with it off, every site is really
    # spliced (a bitwise copy of the target's own activation), each in its own patched run.
    engine = PatchEngine(pair, task, sites=LAYER0_SITES, skip_identical=False, batch_budget=12)
    for direction in (R2I, I2R):
        got = engine.run(direction, [[s] for s in LAYER0_SITES])
        assert engine.last_run_variants == len(LAYER0_SITES)
        assert (got - clean.reference).abs().max().item() < 1e-6
    joint = engine.run(R2I, [LAYER0_SITES])
    assert (joint - clean.reference).abs().max().item() < 1e-6


def test_self_patch_warns_that_the_shift_is_null(twin, tokens):
    model = twin[0]
    with pytest.warns(UserWarning, match="identical weights"):
        pair = md.ModelPair(model, model, allow_identical=True)
    task = md.Task(tokens, answers=tokens[:, 0], wrong=tokens[:, 1])
    with pytest.warns(ShiftNotSignificantWarning, match="not distinguishable from zero"):
        result = md.patch(pair, task, "L1H0", n_boot=N_BOOT)
    assert result.shift.shift == 0.0 and result.shift.ci == (0.0, 0.0)
    assert not result.shift.significant
    assert result.patched == result.shift.reference_mean


# --- a pair that differs in one component ---------------------------------------------------------

HEAD_LAYER, HEAD = 1, 2
PROJECTION_SITE = {"q": "head_q", "k": "head_k", "v": "head_v"}


@pytest.mark.parametrize("which", ["q", "k", "v", "o"])
def test_one_head_change_is_restored_exactly_by_its_head_out(twin, tokens, which):
    d_head = int(twin[0].cfg.d_head)
    pair = make_pair(twin, lambda m: perturb_head(m, HEAD_LAYER, HEAD, which, d_head))
    changed = [r.label for r in pair.weight_diff().changed()]
    assert len(changed) == 1 and which.upper() in changed[0].upper(), changed
    task = contrast_task(pair, tokens)
    target = Site("head_out", HEAD_LAYER, head=HEAD)
    both = _sweep(pair, task, "head_out", direction="both")
    assert both.shift.significant
    for result in both:
        score = result.scores[HEAD_LAYER, HEAD].item()
        assert abs(score - 1) < TOL, (result.direction, score)
        assert result.top(1)[0].site == target
        # every other head of layers 0-1 has the same weights and the same inputs in both
        # models, so the same write: no effect (layer-2 heads see a changed input and may move)
        others = result.scores.clone()
        others[HEAD_LAYER, HEAD] = 0
        assert others[: HEAD_LAYER + 1].abs().max().item() == 0.0
    z = _sweep(pair, task, "head_z", layers=[HEAD_LAYER], direction="both")
    for result in z:
        z_score = result.scores[0, HEAD].item()
        if which == "o":
            # hook_z is computed before W_O: both models hold the same z, so splicing it
            # carries nothing of a W_O change (TL's "head out" patch misses it entirely)
            assert result.activation_delta is not None
            assert result.activation_delta[0, HEAD].item() == 0.0
            assert z_score == 0.0
        else:
            # W_O is shared, so restoring z restores the head's write
            assert abs(z_score - 1) < TOL
    if which != "o":
        proj = _sweep(pair, task, PROJECTION_SITE[which], layers=[HEAD_LAYER])
        assert abs(proj.scores[0, HEAD].item() - 1) < TOL
        assert proj.top(1)[0].site == Site(PROJECTION_SITE[which], HEAD_LAYER, head=HEAD)


@pytest.mark.parametrize("layer", [0, 2])
def test_one_mlp_change_is_restored_exactly_by_its_mlp_out(twin, tokens, layer):
    pair = make_pair(
        twin, lambda m: perturb_matching(m, lambda k: k.startswith(f"blocks.{layer}.mlp."))
    )
    task = contrast_task(pair, tokens)
    for result in _sweep(pair, task, "mlp_out", direction="both"):
        assert abs(result.scores[layer].item() - 1) < TOL, result.direction
        assert result.top(1)[0].site == Site("mlp_out", layer)
        # upstream of the MLP nothing differs: those sites' patched runs are the clean run
        clean = getattr(result.shift, result.direction.target)
        assert torch.equal(result.per_prompt[:layer], clean.expand_as(result.per_prompt[:layer]))


def test_joint_head_outs_of_a_layer_equal_its_attn_out(twin, tokens):
    """Without a change to the shared bias b_O, the heads' writes sum to the attention output."""
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: k.startswith("blocks.1.attn")))
    task = contrast_task(pair, tokens)
    heads = [Site("head_out", 1, head=h) for h in range(4)]
    joint = md.patch(pair, task, heads, direction="both", n_boot=N_BOOT)
    whole = md.patch(pair, task, "L1.attn_out", direction="both", n_boot=N_BOOT)
    for a, b in zip(joint, whole, strict=True):
        assert a.sites == tuple(heads) and len(a.activation_delta) == 4
        assert (a.per_prompt - b.per_prompt).abs().max().item() < TOL
        assert abs(b.score - 1) < TOL


# --- splicing the last residual, and differences confined to one block ---------------------------


@pytest.fixture(scope="module")
def shared_unembed_pairs(hf_checkpoints, hf_checkpoints_seed1):
    """Seed-0 / seed-1 HF pairs whose final norm and unembedding are made the reference's."""
    out = {}
    for family in _builders.FAMILIES:
        loaded = md.ModelPair.load(hf_checkpoints[family], hf_checkpoints_seed1[family])
        ref_sd, itv_sd = loaded.reference.state_dict(), loaded.intervened.state_dict()
        with torch.no_grad():
            for key in itv_sd:
                if key.startswith(("ln_final.", "unembed.")):
                    itv_sd[key].copy_(ref_sd[key])
        out[family] = md.ModelPair(loaded.reference, loaded.intervened)
    return out


@pytest.mark.parametrize("family", ["native", *_builders.FAMILIES])
def test_last_resid_post_reproduces_the_source_model(twin, tokens, shared_unembed_pairs, family):
    """The final residual is all the unembedding reads: splicing it at every position gives the
    source model's metric (the two models share ln_final and W_U, so the readout is the same)."""
    if family == "native":
        pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: k.startswith("blocks.")))
        toks = tokens
    else:
        pair = shared_unembed_pairs[family]
        toks = random_tokens(4, 6, int(pair.cfg.d_vocab), seed=2)
    task = contrast_task(pair, toks)
    last = Site("resid_post", pair.shape.n_layers - 1)
    both = md.patch(pair, task, last, direction="both", n_boot=N_BOOT)
    r2i, i2r = both
    assert (r2i.per_prompt - both.shift.reference).abs().max().item() < TOL
    assert (i2r.per_prompt - both.shift.intervened).abs().max().item() < TOL
    assert abs(r2i.score - 1) < TOL and abs(i2r.score - 1) < TOL


def test_difference_in_block_k_has_no_effect_before_block_k(twin, tokens):
    k = 1
    pair = make_pair(
        twin, lambda m: perturb_matching(m, lambda key: key.startswith(f"blocks.{k}."))
    )
    task = contrast_task(pair, tokens)
    shift = md.measure_shift(pair, task, n_boot=N_BOOT)
    # forced to really splice every site (no skipping of identical activations)
    engine = PatchEngine(pair, task, sites=LAYER0_SITES, skip_identical=False)
    for direction in (R2I, I2R):
        target_clean = getattr(shift, direction.target)
        got = engine.run(direction, [[s] for s in LAYER0_SITES])
        assert engine.last_run_variants == len(LAYER0_SITES)
        assert (got - target_clean).abs().max().item() < 1e-6
        for site in LAYER0_SITES:
            assert engine.site_delta(direction, site) == 0.0, site
    # the public sweep: every site before block k is exactly the target's clean metric
    for component in ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out", "head_z"):
        for result in _sweep(pair, task, component, direction="both"):
            before = result.per_prompt[: k + 1 if component == "resid_pre" else k]
            target_clean = getattr(shift, result.direction.target)
            assert torch.equal(before, target_clean.expand_as(before)), (
                component,
                result.direction,
            )
            assert result.activation_delta is not None
            assert not result.activation_delta[: before.shape[0]].any()
            # and block k itself does carry the change
            assert result.activation_delta[before.shape[0]].abs().sum().item() > 0
            if component in ("resid_post", "attn_out"):
                assert (result.per_prompt[k] - target_clean).abs().max().item() > 1e-3


# --- a model whose heads add linearly into the logits ---------------------------------------------


def test_directions_agree_on_an_additive_model():
    """One attention-only layer without layer norm: logits are linear in each head's write and the
    heads do not interact, so head h explains the same fraction in both directions and the
    fractions sum to 1 (the shared bias b_O is left unchanged)."""
    kwargs = {"n_layers": 1, "attn_only": True, "normalization_type": None}

    def edit(m: Any) -> None:
        perturb_matching(m, lambda key: key.startswith("blocks.0.attn."), seed=9)

    ref, itv = _builders.native_pair(edit, **kwargs)
    pair = md.ModelPair(ref, itv)
    assert pair.shape.d_mlp is None
    task = contrast_task(pair, random_tokens(6, 6, 50, seed=8))
    both = _sweep(pair, task, "head_out", direction="both")
    r2i, i2r = both[R2I].scores[0], both[I2R].scores[0]
    assert (r2i - i2r).abs().max().item() < TOL
    assert abs(r2i.sum().item() - 1) < TOL and abs(i2r.sum().item() - 1) < TOL
    assert (r2i.abs() > 0.05).sum().item() >= 2  # the shift is spread over several heads
    # per prompt too: each prompt's patched shifts add up to its own shift
    for result, clean in ((both[R2I], both.shift.intervened), (both[I2R], both.shift.reference)):
        moved = (result.per_prompt[0] - clean).sum(0)
        total = both.shift.intervened - both.shift.reference
        sign = -1 if result.direction is R2I else 1
        assert (sign * moved - total).abs().max().item() < 1e-4


# --- sanity checks --------------------------------------------------------------------------------


def _filtering(model: Any, monkeypatch: Any, drop: Any) -> None:
    """Make ``model.run_with_hooks`` ignore the hooks for which ``drop(name)`` is true, as a bridge
    whose hook point is never called would."""
    original = model.run_with_hooks

    def run_with_hooks(*args: Any, fwd_hooks: Any = (), **kwargs: Any) -> Any:
        kept = [(name, fn) for name, fn in fwd_hooks if not drop(name)]
        return original(*args, fwd_hooks=kept, **kwargs)

    monkeypatch.setitem(model.__dict__, "run_with_hooks", run_with_hooks)


def test_a_hook_that_never_fires_is_an_error(twin, tokens, monkeypatch):
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    task = contrast_task(pair, tokens)
    site = Site("head_z", 0, head=1)
    # while caching the clean runs
    with monkeypatch.context() as mp:
        _filtering(pair.intervened, mp, lambda name: name == "blocks.0.attn.hook_z")
        with pytest.raises(
            PatchingError, match=r"never fired while caching: \['blocks.0.attn.hook_z'\]"
        ):
            _sweep(pair, task, "head_z")
    # in a patched run, after clean runs (and the engine's edit probe) that did fire
    engine = PatchEngine(pair, task, sites=[site])
    engine.run(R2I, [[site]])
    with monkeypatch.context() as mp:
        _filtering(pair.intervened, mp, lambda name: name == "blocks.0.attn.hook_z")
        with pytest.raises(
            PatchingError, match="never fired in the intervened model's patched run"
        ):
            engine.run(R2I, [[site]])
    assert engine.run(R2I, [[site]]).shape == (1, len(tokens))  # fine again once restored


@pytest.mark.filterwarnings("ignore::mechdelta.TooFewPromptsWarning")
@pytest.mark.parametrize("n_prompts", [1, 6])
def test_a_bridge_that_discards_edits_is_an_error(twin, tokens, monkeypatch, n_prompts):
    """A bridge whose hooks fire but whose edits are dropped must be caught, whatever the batch
    size (the engine probes one prompt and compares it with the clean run)."""
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    task = contrast_task(pair, tokens[:n_prompts])
    original = pair.intervened.run_with_hooks

    def discarding(*args: Any, fwd_hooks: Any = (), **kwargs: Any) -> Any:
        def ignore_result(fn: Any) -> Any:
            def hook(x: torch.Tensor, hook: Any) -> None:
                fn(x, hook=hook)

            return hook

        kept = [(name, ignore_result(fn)) for name, fn in fwd_hooks]
        return original(*args, fwd_hooks=kept, **kwargs)

    monkeypatch.setitem(pair.intervened.__dict__, "run_with_hooks", discarding)
    with pytest.raises(PatchingError, match="discards edits to 'mlp_out'"):
        _sweep(pair, task, Component.MLP_OUT)


def test_edits_discarded_at_one_layer_only_are_caught_at_that_layer(twin, tokens, monkeypatch):
    """The probe runs at every layer a patch touches (it used to probe the last layer only)."""
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    task = contrast_task(pair, tokens)
    original = pair.intervened.run_with_hooks

    def discarding(*args: Any, fwd_hooks: Any = (), **kwargs: Any) -> Any:
        def ignore_result(fn: Any) -> Any:
            def hook(x: torch.Tensor, hook: Any) -> None:
                fn(x, hook=hook)

            return hook

        kept = [
            (name, ignore_result(fn) if name == "blocks.0.hook_mlp_out" else fn)
            for name, fn in fwd_hooks
        ]
        return original(*args, fwd_hooks=kept, **kwargs)

    monkeypatch.setitem(pair.intervened.__dict__, "run_with_hooks", discarding)
    md.patch(pair, task, "L2.mlp_out", n_boot=N_BOOT)  # the last layer takes edits
    with pytest.raises(PatchingError, match=r"blocks\.0\.hook_mlp_out does not change"):
        md.patch(pair, task, "L0.mlp_out", n_boot=N_BOOT)


def test_an_empty_site_set_is_an_error(twin, tokens):
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    task = contrast_task(pair, tokens)
    with pytest.raises(md.SiteError, match="at least one site"):
        md.patch(pair, task, [], n_boot=N_BOOT)


@pytest.mark.filterwarnings("ignore::mechdelta.TooFewPromptsWarning")
def test_a_fixed_position_patch_on_ragged_prompts_is_refused(twin):
    """Position p is a different token in prompts of different lengths (or padding): refuse."""
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    task = contrast_task(pair, [[1, 2, 3, 4, 5, 6], [7, 8, 9]])
    with pytest.raises(md.TaskError, match="a patch at a fixed position"):
        md.patch(pair, task, "L1H0P4", n_boot=N_BOOT)
    md.patch(pair, task, "L1H0", n_boot=N_BOOT)  # all positions: fine on ragged prompts


def test_patching_leaves_the_global_torch_rng_alone(twin, tokens):
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    task = contrast_task(pair, tokens)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    md.patch(pair, task, ["L1H0", "L0.mlp_out"], n_boot=N_BOOT)
    assert torch.equal(torch.rand(3), want)


def test_prefix_reuse_restores_a_blocks_own_instance_forward(twin, tokens):
    pair = make_pair(twin, lambda m: perturb_matching(m, lambda k: True))
    block = pair.intervened.blocks[0]
    marker = block.forward  # a bound method, stored as an instance attribute like accelerate does
    block.__dict__["forward"] = marker
    try:
        md.patch(pair, contrast_task(pair, tokens), "L2H1", n_boot=N_BOOT)
        assert block.__dict__.get("forward") is marker
    finally:
        block.__dict__.pop("forward", None)
