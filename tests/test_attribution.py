"""Node-level attribution against exact patching: first-order accuracy, exactness where the
metric is linear in the site, IG convergence, planted ground truth, verification, storage and
bad input."""

from __future__ import annotations

import pytest
import torch

import mechdelta as md
from mechdelta import AttributionError, ConfigError
from tests import _builders
from tests._reference import N_BOOT, contrast_task, perturb_matching, random_tokens

R2I, I2R = "reference->intervened", "intervened->reference"


def _pair(scale: float, seed: int = 3, **overrides):
    ref, itv = _builders.native_pair(
        lambda m: perturb_matching(m, lambda k: True, seed=seed, scale=scale), **overrides
    )
    return md.ModelPair(ref, itv)


def _errors(pair, task, component, method="atp", steps=16, **kw):
    est = md.attribute(pair, task, component, "both", method, n_boot=N_BOOT, steps=steps, **kw)
    exact = md.sweep(pair, task, component, "both", n_boot=N_BOOT, **kw)
    return [
        (a.per_prompt - e.per_prompt).abs().max().item() for a, e in zip(est, exact, strict=True)
    ]


@pytest.mark.parametrize("component", ["head_out", "resid_pre", "mlp_out", "head_k"])
def test_atp_error_shrinks_quadratically_with_the_perturbation(component):
    """On pairs that differ by eps x noise, AtP = exact patching + O(eps^2): halving eps quarters
    the largest error (ratio well above the 2 of a first-order error)."""
    tokens = random_tokens(6, 6, 50, seed=2)
    errs = []
    for scale in (0.02, 0.01):
        pair = _pair(scale)
        task = contrast_task(pair, tokens)
        errs.append(max(_errors(pair, task, component, per_position=True)))
    assert errs[1] < errs[0] / 3, errs


def test_atp_is_exact_where_the_metric_is_linear_in_the_site():
    """Attention-only, no norms: the logit difference is linear in the last layer's attention
    output, its heads' writes and z, and (patterns fixed) its values."""
    pair = _pair(0.5, attn_only=True, normalization_type=None)
    task = contrast_task(pair, random_tokens(6, 6, 50, seed=4))
    for component in ("attn_out", "head_out", "head_z", "head_v"):
        for err in _errors(pair, task, component, layers=[2], per_position=True):
            assert err < 1e-4, (component, err)


def test_ig_converges_to_the_exact_effect_on_a_one_layer_model():
    pair = _pair(0.5, n_layers=1)
    task = contrast_task(pair, random_tokens(6, 6, 50, seed=5))
    atp = max(_errors(pair, task, "attn_out"))
    coarse = max(_errors(pair, task, "attn_out", "ig", steps=2))
    fine = max(_errors(pair, task, "attn_out", "ig", steps=64))
    assert fine < coarse < atp
    assert fine < 0.02 * atp + 1e-4, (atp, coarse, fine)


def test_atp_star_fixes_saturated_keys():
    """With query weights scaled up (saturated attention), the QK fix tracks exact key patches
    far better than plain AtP (measured here: Pearson 0.83 against 0.28)."""

    def saturate(m):
        for layer in range(3):
            m.blocks[layer].attn.q.weight.mul_(12.0)

    ref, itv = _builders.native_pair(saturate)
    with torch.no_grad():
        saturate_k = itv.blocks[1].attn.k.weight
        saturate_k[16:32] += 0.5 * torch.randn(
            16, saturate_k.shape[1], generator=torch.Generator().manual_seed(1)
        )
    pair = md.ModelPair(ref, itv)
    task = contrast_task(pair, random_tokens(16, 8, 50, seed=6))
    exact = md.sweep(pair, task, "head_k", R2I, per_position=True, n_boot=N_BOOT)
    corr = {}
    for method in ("atp", "atp*"):
        est = md.attribute(pair, task, "head_k", R2I, method, per_position=True, n_boot=N_BOOT)
        stack = torch.stack([est.scores.flatten(), exact.scores.flatten()])
        corr[method] = torch.corrcoef(stack)[0, 1].item()
    assert corr["atp*"] > 0.7 and corr["atp*"] > corr["atp"] + 0.3, corr


@pytest.mark.parametrize("family", _builders.FAMILIES)
def test_attribution_tracks_exact_patching_on_hf_families(family, hf_pairs):
    pair = hf_pairs[family]
    task = contrast_task(pair, random_tokens(6, 6, int(pair.cfg.d_vocab), seed=7))
    for component, method in (("head_out", "atp"), ("head_k", "atp*"), ("mlp_out", "ig")):
        est = md.attribute(pair, task, component, R2I, method, n_boot=N_BOOT, steps=8)
        exact = md.sweep(pair, task, component, R2I, n_boot=N_BOOT)
        stack = torch.stack([est.scores.flatten(), exact.scores.flatten()])
        # two independently initialised models: far from first order, yet well correlated
        assert torch.corrcoef(stack)[0, 1].item() > 0.8, (family, component, method)


def test_planted_components_top_the_attribution_in_both_directions():
    entry = md.zoo.load("planted")
    for component, planted in (
        ("head_out", md.Site("head_out", 1, head=1)),
        ("mlp_out", md.Site("mlp_out", 1)),
    ):
        both = md.attribute(entry.pair, entry.task, component, "both", n_boot=N_BOOT)
        for result in both:
            assert result.top(1)[0].site == planted, (component, result.direction)


def test_verify_runs_exact_patches_and_round_trips(tmp_path):
    pair = _pair(0.3)
    task = contrast_task(pair, random_tokens(8, 6, 50, seed=8))
    result = md.attribute(pair, task, "head_out", I2R, per_position=True, n_boot=N_BOOT, verify=4)
    v = result.verification
    assert v is not None and len(v.sites) == 8 and v.selected.count("top") == 4
    exact = md.sweep(pair, task, "head_out", I2R, per_position=True, n_boot=N_BOOT)
    by_site = dict(zip(exact.sites, exact.scores.flatten().tolist(), strict=True))
    for site, score in zip(v.sites, v.exact_scores.tolist(), strict=True):
        assert abs(by_site[site] - score) < 1e-5
    assert v.pearson > 0.9 and 0 <= v.recall(3) <= 1
    ranked = v.top(3)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), key=abs, reverse=True)
    assert "Pearson" in str(v) and not v.to_dataframe().empty
    v.figure()
    result.save(tmp_path / "att")
    loaded = md.AttributionResult.load(tmp_path / "att")
    assert loaded.method == "atp" and torch.equal(loaded.per_prompt, result.per_prompt)
    with pytest.raises(AttributionError, match="needs the pair and task"):
        loaded.verify(2)
    again = loaded.verify(2, random=0, pair=pair, task=task)
    assert again.sites == v.sites[:2]
    v.save(tmp_path / "ver")
    assert md.Verification.load(tmp_path / "ver").sites == v.sites


def test_bad_attribution_input_is_a_typed_error():
    pair = _pair(0.3)
    task = contrast_task(pair, random_tokens(6, 6, 50, seed=9))
    with pytest.raises(ConfigError, match="unknown attribution method"):
        md.attribute(pair, task, "head_out", method="shap")
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        md.attribute(pair, task, "head_out", method="ig", steps=0)
    with torch.inference_mode(), pytest.raises(AttributionError, match="inference_mode"):
        md.attribute(pair, task, "head_out", n_boot=N_BOOT)


def test_graddrop_magnitudes_rank_verification():
    """GradDrop cuts the backward pass at each layer in turn: for a last-layer key site, cutting
    its own layer's output zeroes its estimate and the other L-1 cuts leave it unchanged, so the
    magnitude is exactly |its mean estimate|; the magnitudes order what verify() checks first."""
    pair = _pair(0.3)
    task = contrast_task(pair, random_tokens(8, 6, 50, seed=10))
    result = md.attribute(pair, task, "head_k", I2R, "atp*", graddrop=True, n_boot=N_BOOT)
    assert result.graddrop is not None and (result.graddrop >= 0).all()
    target = result.shift.reference_mean
    last = (result.per_prompt[2].double().mean(-1) - target).abs()
    assert torch.allclose(result.graddrop[2].double(), last, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(
        result.graddrop[0].double(), (result.per_prompt[0].double().mean(-1) - target).abs()
    )
    v = result.verify(3, random=0)
    top = torch.argsort(result.graddrop.flatten(), descending=True)[:3].tolist()
    assert list(v.sites) == [result.sites[i] for i in top]
    with pytest.raises(ConfigError, match="graddrop=True belongs to method='atp\\*'"):
        md.attribute(pair, task, "head_k", I2R, "atp", graddrop=True)


def test_activation_deltas_equal_the_sweeps():
    pair = _pair(0.3)
    task = contrast_task(pair, random_tokens(6, 6, 50, seed=11))
    for component, kw in (("head_out", {}), ("head_k", {}), ("mlp_neuron", {"neurons": [1, 5]})):
        est = md.attribute(pair, task, component, R2I, per_position=True, n_boot=N_BOOT, **kw)
        exact = md.sweep(pair, task, component, R2I, per_position=True, n_boot=N_BOOT, **kw)
        assert torch.allclose(est.activation_delta, exact.activation_delta, rtol=1e-5, atol=1e-6)


def test_atp_star_without_attention_scores_is_a_typed_error(monkeypatch):
    """Where neither q·k nor the bridge's scores hook reproduces the pattern, atp* on key/query
    sites refuses (plain atp still runs)."""
    from mechdelta.attribution import _qk

    pair = _pair(0.3)
    task = contrast_task(pair, random_tokens(6, 6, 50, seed=12))
    monkeypatch.setattr(_qk, "_reproduces", lambda *args: False)
    with pytest.raises(AttributionError, match="method 'atp\\*' needs this model's attention"):
        md.attribute(pair, task, "head_k", method="atp*", n_boot=N_BOOT)
    md.attribute(pair, task, "head_k", method="atp", n_boot=N_BOOT)
