"""graft(): the target model run with chosen components' *parameters* from the source (issue 17,
node-level graft semantics), on native, GPT-2, NeoX and Llama-GQA pairs, both directions.

The independent reference is plain tensor indexing into a deep copy of the target, with each
family's weight layout written out here (GPT-2's W_O is Conv1D-shaped: a head owns *rows*)."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta import ConfigError, Direction, Site, SiteError
from mechdelta.core.provenance import weights_hash
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching._runner import ModelRunner
from mechdelta.patching.graft import _parts, _Weights, graft, graft_values, grafted
from tests import _builders
from tests._reference import N_BOOT, contrast_task, last_token_logit_diff, random_tokens

FAMILIES = ("native", *_builders.FAMILIES)
I2R, R2I = Direction.INTERVENED_TO_REFERENCE, Direction.REFERENCE_TO_INTERVENED
TOL = 1e-5
N_LAYERS = 3
CHANGED = ((0, 1), (2, 3))  # the heads the two-head pairs differ in


# --- pairs ---------------------------------------------------------------------------------------


def _clone(model: Any) -> Any:
    """``copy.deepcopy`` of a bridge, leaving out tensors TransformerLens caches from its last
    forward (HF attention bridges keep ``_pattern``; after a gradient pass of another test it is
    part of an autograd graph, which deepcopy refuses)."""
    memo: dict[int, Any] = {}

    def scan(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                memo[id(value)] = None
        elif depth and isinstance(value, dict):
            for v in value.values():
                scan(v, depth - 1)
        elif depth and isinstance(value, (list, tuple)):
            for v in value:
                scan(v, depth - 1)

    for module in model.modules():
        for value in vars(module).values():
            scan(value, 3)
    return copy.deepcopy(model, memo)


def _bridge(family: str, hf_pairs: dict[str, md.ModelPair]) -> Any:
    """A fresh model of the family (a copy of the shared conftest pair's reference)."""
    if family == "native":
        return _builders.native_bridge(0)
    return _clone(hf_pairs[family].reference)


def _noise(t: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(t.shape, generator=gen)


def _perturb_all(model: Any) -> None:
    """Every parameter (norms and biases too) moves, so a missed tensor shows."""
    with torch.no_grad():
        for i, (_, t) in enumerate(sorted(model.state_dict().items())):
            t += _noise(t, 100 + i, 0.05 if t.dim() == 1 else 0.3 * float(t.std()))


def _o_head_axis(family: str) -> int:
    """Which axis of the state dict's ``attn.o.weight`` indexes heads, per family (HF facts:
    GPT-2's c_proj is a Conv1D [in, out]; everything else is nn.Linear [out, in])."""
    return 0 if family == "gpt2" else 1


def _head_slices(model: Any, family: str, layer: int, head: int, projs: str = "qkvo"):
    """(key, index) of a head's slices by plain indexing (K/V: its GQA group's)."""
    cfg = model.cfg
    d = int(cfg.d_head)
    group = int(cfg.n_heads) // int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    sd = model.state_dict()
    out = []
    for p in projs:
        unit = head // group if p in "kv" else head
        rows = slice(unit * d, (unit + 1) * d)
        if p == "o":
            key = f"blocks.{layer}.attn.o.weight"
            out.append((key, (rows,) if _o_head_axis(family) == 0 else (slice(None), rows)))
            continue
        for what in ("weight", "bias"):
            key = f"blocks.{layer}.attn.{p}.{what}"
            if key in sd:
                out.append((key, (rows,)))
    return out


def _slices(model: Any, family: str, comp: str) -> list[tuple[str, Any]]:
    """The test's own reading of what a component shorthand grafts."""
    keys = list(model.state_dict())
    if comp == "embed":
        return [(k, ...) for k in keys if k.split(".")[0] in ("embed", "pos_embed")]
    if comp == "unembed":
        return [(k, ...) for k in keys if k.split(".")[0] in ("ln_final", "unembed")]
    site = Site.parse(comp)
    pre = f"blocks.{site.layer}."
    if site.kind is md.Component.MLP_OUT:
        return [(k, ...) for k in keys if k.startswith((pre + "mlp.", pre + "ln2."))]
    if site.kind is md.Component.ATTN_OUT:
        return [(k, ...) for k in keys if k.startswith((pre + "attn.", pre + "ln1."))]
    projs = {"head_out": "qkvo", "head_q": "q", "head_k": "k", "head_v": "v"}[site.kind.value]
    assert site.head is not None
    return _head_slices(model, family, site.layer, site.head, projs)


def _copy_in(target: Any, source: Any, slices: list[tuple[str, Any]]) -> None:
    t_sd, s_sd = target.state_dict(), source.state_dict()
    with torch.no_grad():
        for key, index in slices:
            t_sd[key][index] = s_sd[key][index]


@pytest.fixture(scope="module")
def setups(hf_pairs):
    """Per family: a pair whose every tensor differs, and a task with contrasting answers."""
    out = {}
    for family in FAMILIES:
        ref = _bridge(family, hf_pairs)
        itv = _clone(ref)
        _perturb_all(itv)
        pair = md.ModelPair(ref, itv)
        tokens = random_tokens(6, 6, int(pair.cfg.d_vocab), seed=5)
        out[family] = (pair, tokens, contrast_task(pair, tokens))
    return out


@pytest.fixture(scope="module")
def two_head(setups):
    """Per family: a pair that differs in exactly the heads L0H1 and L2H3 (Q/K/V/O slices; under
    GQA the K/V slices of their groups), strongly enough to move the answer, and a task. The
    reference is the (unperturbed) reference of :func:`setups`."""
    out = {}
    for family in FAMILIES:
        ref = setups[family][0].reference
        itv = _clone(ref)
        with torch.no_grad():
            sd = itv.state_dict()
            for i, (key, index) in enumerate(
                s for layer, head in CHANGED for s in _head_slices(itv, family, layer, head)
            ):
                sd[key][index] += _noise(sd[key][index], i, 2.0 * float(sd[key].std()) + 0.1)
        pair = md.ModelPair(ref, itv)
        tokens = random_tokens(6, 6, int(pair.cfg.d_vocab), seed=7)
        out[family] = (pair, tokens, contrast_task(pair, tokens))
    return out


def _source_metric(result: md.PatchResult) -> torch.Tensor:
    return result.shift.intervened if result.direction is I2R else result.shift.reference


def _target_metric(result: md.PatchResult) -> torch.Tensor:
    return result.shift.reference if result.direction is I2R else result.shift.intervened


def _hashes(pair: md.ModelPair) -> tuple[str, str]:
    return weights_hash(pair.reference.state_dict()), weights_hash(pair.intervened.state_dict())


def _all_components(n_layers: int) -> list[str]:
    layers = range(n_layers)
    return [
        "embed",
        *(f"L{layer}.attn_out" for layer in layers),
        *(f"L{layer}.mlp_out" for layer in layers),
        "unembed",
    ]


# --- invariants ----------------------------------------------------------------------------------


def test_an_empty_graft_is_a_site_error(setups):
    pair, _, task = setups["native"]
    with pytest.raises(SiteError, match="at least one component"):
        graft(pair, task, [])


@pytest.mark.parametrize("family", FAMILIES)
def test_grafting_every_component_reproduces_the_source(family, setups):
    pair, _, task = setups[family]
    comps = _all_components(N_LAYERS)
    # the components cover every tensor of the state dict, each whole
    plan = {key for key, _ in _Weights(pair).plan(_parts(comps, pair.shape))}
    assert plan == set(pair.reference.state_dict())
    before = _hashes(pair)
    both = graft(pair, task, comps, "both", n_boot=N_BOOT)
    for result in (both.reference_to_intervened, both.intervened_to_reference):
        assert (result.per_prompt - _source_metric(result)).abs().max() < TOL
        assert abs(result.score - 1.0) < 1e-4
        assert result.provenance["semantics"] == "graft"
        assert result.provenance["components"][-1] == "unembed"
        assert len(result.activation_delta) == len(comps)
        assert all(d > 0 for d in result.activation_delta)
    assert _hashes(pair) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_random_grafts_equal_a_copy_with_the_slices_indexed_in(family, setups):
    pair, tokens, task = setups[family]
    rng = random.Random(f"graft-{family}")
    heads = [f"L{layer}H{h}" for layer in range(N_LAYERS) for h in range(4)]
    pool = [
        *heads,
        *(f"{h}.head_{p}" for h in heads[:6] for p in "qkv"),
        *(f"L{layer}.mlp_out" for layer in range(N_LAYERS)),
        "L1.attn_out",
        "embed",
        "unembed",
    ]
    metric = last_token_logit_diff(task.answers, task.wrong)
    before = _hashes(pair)
    # a fixed set first: the unembedding with a late block (GPT-2 ties it to the embedding, so
    # the grafted run must start from the tokens), then random sets
    trials = [["L2.mlp_out", "unembed"], *(rng.sample(pool, rng.randint(1, 4)) for _ in range(3))]
    for trial, comps in enumerate(trials):
        direction = (I2R, R2I)[trial % 2]
        source, target = getattr(pair, direction.source), getattr(pair, direction.target)
        expected_model = _clone(target)
        _copy_in(expected_model, source, [s for c in comps for s in _slices(target, family, c)])
        with torch.no_grad():
            expected = metric(expected_model(tokens))
        got = graft(pair, task, comps, direction, n_boot=N_BOOT)
        assert (got.per_prompt - expected).abs().max() < TOL, comps
        assert (got.per_prompt - _target_metric(got)).abs().max() > 1e-4, comps  # it did act
        assert _hashes(pair) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_a_head_graft_changes_only_that_head_and_keeps_the_target_b_O(family, setups):
    """Layout-free check of the slices: at the grafted layer, q changes only at the head, k/v
    only at its key/value group, and the attention output is the other heads' target writes
    plus the head's write through the *source* W_O plus the *target* b_O."""
    pair, tokens, _ = setups[family]
    layer, head = 1, 2
    shape = pair.shape
    group = head // shape.group_size
    names = [f"blocks.{layer}.attn.hook_{x}" for x in "qkvz"] + [f"blocks.{layer}.hook_attn_out"]

    def run(model: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        return {n.split("_")[-1]: cache[n] for n in names}

    def w_o(model: Any) -> tuple[torch.Tensor, torch.Tensor]:  # per-head W_O, b_O off the module
        o = model.blocks[layer].attn.o
        width = shape.n_heads * int(model.cfg.d_head)
        with torch.no_grad():
            bias = o(torch.zeros(1, width))
            return (o(torch.eye(width)) - bias).reshape(shape.n_heads, -1, bias.shape[-1]), bias

    for direction in (I2R, R2I):
        target, source = getattr(pair, direction.target), getattr(pair, direction.source)
        clean = run(target)
        with grafted(pair, [f"L{layer}H{head}"], direction) as model:
            assert model is target
            new = run(model)
        for x, unit in (("q", head), ("k", group), ("v", group)):
            other = [i for i in range(new[x].shape[2]) if i != unit]
            assert torch.equal(new[x][:, :, other], clean[x][:, :, other]), x
            assert not torch.allclose(new[x][:, :, unit], clean[x][:, :, unit]), x
        w_t, b_t = w_o(target)
        w_s, _ = w_o(source)
        w = w_t.clone()
        w[head] = w_s[head]
        recon = torch.einsum("bphd,hdm->bpm", new["z"], w) + b_t
        assert (recon - new["out"]).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_two_changed_heads_together_reproduce_the_source_each_alone_does_not(family, two_head):
    pair, _, task = two_head[family]
    changed = [f"L{layer}H{h}" for layer, h in CHANGED]
    both = graft(pair, task, changed, "both", n_boot=N_BOOT)
    for result in (both.reference_to_intervened, both.intervened_to_reference):
        assert (result.per_prompt - _source_metric(result)).abs().max() < TOL
    for name in changed:
        alone = graft(pair, task, name, "both", n_boot=N_BOOT)
        for result in (alone.reference_to_intervened, alone.intervened_to_reference):
            assert (result.per_prompt - _source_metric(result)).abs().max() > 1e-2, name
            assert result.activation_delta[0] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_grafting_unchanged_weights_is_a_no_op(family, two_head):
    pair, _, task = two_head[family]
    unchanged = ["L1H0", "L1.mlp_out", "L1.attn_out", "unembed"]
    result = graft(pair, task, unchanged, "both", n_boot=N_BOOT)
    for r in (result.reference_to_intervened, result.intervened_to_reference):
        assert torch.equal(r.per_prompt, _target_metric(r))  # skipped: exactly the clean run
        assert r.activation_delta == (0.0,) * 4
    # forced through the grafted forward (no skipping), one variant per component
    engine, weights = PatchEngine(pair, task), _Weights(pair)
    for direction in (I2R, R2I):
        variants = [(p,) for p in _parts(unchanged, pair.shape)]
        values = graft_values(engine, weights, direction, variants, skip_identical=False)
        assert (values - engine.metric_of(direction.target)).abs().max() < 1e-6


# --- sweep ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "component", "grid"),
    [
        ("native", "head_out", {"layers": [0, 2], "heads": [1, 3]}),
        ("llama", "head_out", {"layers": [1], "heads": [0, 1, 3]}),
        ("native", "mlp_out", {}),
        ("gpt2", "head_k", {"layers": [2], "heads": [0, 2]}),
    ],
)
def test_graft_sweep_equals_a_loop_of_grafts(family, component, grid, setups):
    pair, _, task = setups[family]
    both = md.sweep(pair, task, component, "both", semantics="graft", n_boot=N_BOOT, **grid)
    loop = {site: graft(pair, task, site, "both", n_boot=N_BOOT) for site in both[I2R].sites}
    for result in both:
        assert result.provenance["semantics"] == "graft"
        assert result.component.value == component
        assert result.activation_delta is not None
        rows = result.per_prompt.reshape(len(result.sites), -1)
        deltas = result.activation_delta.reshape(-1)
        for site, row, delta in zip(result.sites, rows, deltas, strict=True):
            single = loop[site][result.direction]
            assert torch.equal(row, single.per_prompt), site
            assert float(delta) == pytest.approx(single.activation_delta[0], rel=1e-6)
            assert float(delta) > 0


def test_graft_sweep_skips_and_marks_unchanged_heads(two_head):
    pair, _, task = two_head["native"]
    result = md.sweep(
        pair, task, "head_out", "intervened->reference", semantics="graft", n_boot=N_BOOT
    )
    assert result.activation_delta is not None
    changed = result.activation_delta > 0
    assert changed.nonzero().tolist() == [list(c) for c in CHANGED]
    assert torch.equal(
        result.per_prompt[~changed], result.shift.reference.expand(int((~changed).sum()), -1)
    )


def test_sweep_default_semantics_is_unchanged(setups):
    pair, _, task = setups["native"]
    default = md.sweep(pair, task, "head_out", n_boot=N_BOOT)
    splice = md.sweep(pair, task, "head_out", n_boot=N_BOOT, semantics="splice")
    assert torch.equal(default.per_prompt, splice.per_prompt)
    assert "semantics" not in default.provenance


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"semantics": "ablate"}, "edge-level"),
        ({"semantics": "transplant"}, "'splice' or 'graft'"),
        ({"semantics": "graft", "per_position": True}, "whole components"),
        ({"semantics": "graft", "positions": [1]}, "whole components"),
        ({"semantics": "graft", "component": "head_z"}, "cannot sweep 'head_z'"),
    ],
)
def test_bad_sweep_semantics_are_config_errors(kwargs, match, setups):
    pair, _, task = setups["native"]
    kwargs = {"component": "head_out", **kwargs}
    with pytest.raises(ConfigError, match=match):
        md.sweep(pair, task, n_boot=N_BOOT, **kwargs)


@pytest.mark.parametrize(
    ("components", "match"),
    [
        (["L1H2P3"], "drop the position"),
        (["L0.resid_pre"], "cannot graft 'resid_pre'"),
        (["L7H0"], "out of range"),
    ],
)
def test_bad_components_are_site_errors(components, match, setups):
    pair, _, task = setups["native"]
    with pytest.raises(SiteError, match=match):
        graft(pair, task, components, n_boot=N_BOOT)


def test_nodes_and_shorthands_name_the_same_graft(setups):
    pair, _, task = setups["native"]
    a = graft(
        pair, task, [md.Node("head", 1, 2), md.Node("mlp", 0), md.Node("logits")], n_boot=N_BOOT
    )
    b = graft(pair, task, ["L1H2", "MLP0", "unembed"], n_boot=N_BOOT)
    assert torch.equal(a.per_prompt, b.per_prompt)
    assert a.sites == (Site("head_out", 1, head=2), Site("mlp_out", 0))
    assert a.provenance["components"] == ["L1H2", "L0.mlp_out", "unembed"]


# --- restoring the target ------------------------------------------------------------------------


def test_the_swap_is_restored_after_an_exception(setups, monkeypatch):
    pair, _, task = setups["gpt2"]  # fused c_attn: the q/k/v slices are views into one weight
    before = _hashes(pair)
    with (
        pytest.raises(RuntimeError, match="inside"),
        grafted(pair, ["L1H2", "embed", "L0.mlp_out"]),
    ):
        assert _hashes(pair) != before
        raise RuntimeError("inside")
    assert _hashes(pair) == before

    clean_q = pair.reference.state_dict()["blocks.1.attn.q.weight"].clone()
    logits_at = ModelRunner.logits_at

    def fail_when_grafted(self: ModelRunner, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.equal(pair.reference.state_dict()["blocks.1.attn.q.weight"], clean_q):
            raise RuntimeError("forward failed while grafted")
        return logits_at(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "logits_at", fail_when_grafted)
    with pytest.raises(RuntimeError, match="while grafted"):
        graft(pair, task, ["L1H2", "L2.mlp_out"], "intervened->reference", n_boot=N_BOOT)
    assert _hashes(pair) == before
