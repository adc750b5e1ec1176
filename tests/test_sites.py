from __future__ import annotations

import pytest
import torch

from mechdelta import Component, ModelShape, Site, SiteError
from tests._builders import FAMILIES

SHAPE = ModelShape(n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=128, n_ctx=16)

EXPECTED_HOOKS = {
    Component.EMBED: "hook_embed",
    Component.RESID_PRE: "blocks.2.hook_resid_pre",
    # written through the attention output (hook_resid_mid only feeds the MLP's norm in TL 4)
    Component.RESID_MID: "blocks.2.hook_attn_out",
    Component.RESID_POST: "blocks.2.hook_resid_post",
    Component.ATTN_OUT: "blocks.2.hook_attn_out",
    Component.MLP_OUT: "blocks.2.hook_mlp_out",
    Component.HEAD_Z: "blocks.2.attn.hook_z",
    Component.HEAD_OUT: "blocks.2.hook_attn_out",
    Component.HEAD_Q: "blocks.2.attn.hook_q",
    Component.HEAD_K: "blocks.2.attn.hook_k",
    Component.HEAD_V: "blocks.2.attn.hook_v",
    Component.HEAD_PATTERN: "blocks.2.attn.hook_pattern",
    Component.MLP_NEURON: "blocks.2.mlp.hook_post",
}


def _site(comp: Component, position: int | None = None) -> Site:
    layer = 0 if comp is Component.EMBED else 2
    head = 3 if comp.per_head else None
    neuron = 7 if comp is Component.MLP_NEURON else None
    return Site(comp, layer, head=head, position=position, neuron=neuron)


@pytest.mark.parametrize("comp", list(Component))
def test_hook_name_and_shorthand_round_trip(comp):
    for pos in (None, 5):
        site = _site(comp, pos)
        assert site.hook_name == EXPECTED_HOOKS[comp]
        assert Site.parse(str(site)) == site
    if comp is Component.RESID_MID:
        assert _site(comp).read_hook_name == "blocks.2.hook_resid_mid"
    assert Site(
        comp.value, _site(comp).layer, head=_site(comp).head, neuron=_site(comp).neuron
    ) == _site(comp)


def test_head_out_reads_z_and_writes_attn_out():
    s = Site.parse("L1H2")
    assert s.component is Component.HEAD_OUT
    assert s.read_hook_name == "blocks.1.attn.hook_z"
    assert s.hook_name == "blocks.1.hook_attn_out"


def test_gqa_kv_heads_map_to_their_group():
    # 4 query heads, 2 kv heads: heads 0,1 -> kv 0; heads 2,3 -> kv 1
    got = [Site("head_k", 0, head=h).activation_head(SHAPE) for h in range(4)]
    assert got == [0, 0, 1, 1]
    assert Site("head_v", 0, head=3).index(SHAPE) == (slice(None), slice(None), 1, slice(None))
    assert Site("head_q", 0, head=3).index(SHAPE) == (slice(None), slice(None), 3, slice(None))
    assert Site("head_pattern", 1, head=2, position=4).index(SHAPE) == (
        slice(None),
        2,
        4,
        slice(None),
    )
    assert Site("mlp_neuron", 1, neuron=9).index(SHAPE) == (slice(None), slice(None), 9)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_indexes_the_real_activation(family, hf_checkpoints):
    """Site -> hook name -> index works on real bridges, incl. GQA k/v on Llama."""
    from mechdelta.core._loading import Processing, load_bridge

    model = load_bridge(
        hf_checkpoints[family], device="cpu", dtype=torch.float32, processing=Processing.RAW
    )
    shape = ModelShape.from_cfg(model.cfg)
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3, 4, 5]]))
    for comp in Component:
        if comp is Component.RESID_MID and family == "neox":
            assert "blocks.1.hook_resid_mid" not in cache  # parallel attention+MLP
            continue
        site = Site(
            comp,
            0 if comp is Component.EMBED else 1,
            head=3 if comp.per_head else None,
            position=2,
            neuron=5 if comp is Component.MLP_NEURON else None,
        )
        act = cache[site.read_hook_name]
        picked = act[site.index(shape)]
        assert picked.shape[0] == 1
        if comp.is_kv and family == "llama":
            assert act.shape[2] == 2 and site.activation_head(shape) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(component="head_z", layer=0), "needs a head"),
        (dict(component="resid_pre", layer=0, head=1), "not per head"),
        (dict(component="mlp_neuron", layer=0), "needs neuron"),
        (dict(component="attn_out", layer=0, neuron=1), "only applies"),
        (dict(component="embed", layer=1), "not in a block"),
        (dict(component="bogus", layer=0), "unknown component"),
        (dict(component="resid_pre", layer=-1), ">= 0"),
    ],
)
def test_malformed_sites_raise(kwargs, match):
    with pytest.raises(SiteError, match=match):
        Site(**kwargs)


@pytest.mark.parametrize(
    "site, match",
    [
        (Site("resid_pre", 3), "layer 3 out of range"),
        (Site("head_z", 0, head=4), "head 4 out of range"),
        (Site("resid_pre", 0, position=16), "position 16 out of range"),
        (Site("mlp_neuron", 0, neuron=128), "neuron 128 out of range"),
    ],
)
def test_out_of_range_sites_raise(site, match):
    with pytest.raises(SiteError, match=match):
        site.validate(SHAPE)


def test_attn_only_models_have_no_mlp_sites():
    shape = ModelShape(n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=None, n_ctx=8)
    with pytest.raises(SiteError, match="attention-only"):
        Site("mlp_out", 0).validate(shape)


@pytest.mark.parametrize("text", ["", "H1", "L1", "Lx", "L1H2.nope"])
def test_bad_shorthand_raises(text):
    with pytest.raises(SiteError):
        Site.parse(text)


def test_sites_are_hashable_values():
    assert {Site.parse("L1H2"), Site("head_out", 1, head=2)} == {Site.parse("L1H2")}
    with pytest.raises(AttributeError):
        Site.parse("L1H2").layer = 3  # type: ignore[misc]


def test_repr_is_short_and_evaluable():
    from mechdelta.core.sites import Component  # noqa: F401  (eval namespace)

    for site in (Site("head_out", 1, head=2), Site("mlp_neuron", 0, neuron=3, position=4)):
        text = repr(site)
        assert text.startswith("Site('") and "None" not in text
        assert eval(text, {"Site": Site}) == site
