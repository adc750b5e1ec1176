"""Exact edge patching (splice and ablate) across two models, checked against independent
computations: clean runs, the final residual through a model's own final norm and unembedding,
node-level patches, receiver inputs recomputed by hand, one attention layer written out in torch."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import Tensor

import mechdelta as md
from mechdelta.core.graph import Edge, Graph
from mechdelta.errors import ConfigError, SiteError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.edges import EdgePatcher, patch_edges
from mechdelta.patching.results import BothDirections, PatchResult
from tests import _builders
from tests import _reference as ref

N_BOOT = ref.N_BOOT
DIRECTIONS = (md.Direction.REFERENCE_TO_INTERVENED, md.Direction.INTERVENED_TO_REFERENCE)
FAMILIES = ("native", "gpt2", "neox", "llama")
ERRORS: dict[str, float] = {}  # measured max abs errors, printed at the end (pytest -s)


# --- pairs and independent helpers ---------------------------------------------------------------


def _native(perturb: Any, **kw: Any) -> md.ModelPair:
    return md.ModelPair(*_builders.native_pair(perturb, **kw))


@pytest.fixture(scope="module")
def native() -> md.ModelPair:
    """Every 2-D weight differs (embedding and unembedding included)."""
    return _native(lambda m: ref.perturb_matching(m, lambda k: True, scale=0.3))


def _pair(name: str, request: pytest.FixtureRequest) -> md.ModelPair:
    if name == "native":
        return request.getfixturevalue("native")
    return request.getfixturevalue("hf_pairs")[name]


def _task(pair: md.ModelPair, batch: int = 6, seq: int = 8) -> md.Task:
    return ref.contrast_task(pair, ref.random_tokens(batch, seq, int(pair.cfg.d_vocab), seed=1))


def _cache(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return dict(cache.items())


def _metric(engine: PatchEngine, logits: Tensor) -> Tensor:
    pos = engine.inputs.positions
    idx = pos[..., None].expand(-1, -1, logits.shape[-1])
    return engine.prepared.metric(logits.gather(1, idx), engine.inputs)


def _from_final(model: Any, engine: PatchEngine, resid: Tensor) -> Tensor:
    """The metric with the final residual ``resid`` through ``model``'s final norm and
    unembedding, called by hand."""
    with torch.no_grad():
        return _metric(engine, model.unembed(model.ln_final(resid)))


_STATE: dict[int, dict[str, Tensor]] = {}


def _state(model: Any) -> dict[str, Tensor]:
    """A model's state dict, read once (the bridge builds it slowly); tests never edit it."""
    if id(model) not in _STATE:
        _STATE[id(model)] = dict(model.state_dict())
    return _STATE[id(model)]


def _b_o(model: Any, layer: int) -> Tensor:
    return _state(model).get(f"blocks.{layer}.attn.o.bias", torch.zeros(()))


def _b_o_sum(model: Any, layers: int) -> Tensor:
    return sum((_b_o(model, layer) for layer in range(layers)), torch.zeros(()))


def _run_hooked(model: Any, engine: PatchEngine, hooks: list) -> Tensor:
    with torch.no_grad():
        return _metric(engine, model.run_with_hooks(engine.tokens, fwd_hooks=hooks))


def _err(key: str, got: Tensor, want: Tensor, tol: float) -> None:
    err = float((got.double() - want.double()).abs().max())
    ERRORS[key] = max(err, ERRORS.get(key, 0.0))
    scale = max(1.0, float(want.abs().max()))
    assert err <= tol * scale, f"{key}: max abs error {err:.3g}"


def _setup(pair: md.ModelPair, task: md.Task, **kw: Any) -> tuple[EdgePatcher, PatchEngine]:
    patcher = EdgePatcher(pair, task, **kw)
    return patcher, patcher.engine


# --- empty and full circuits ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_empty_and_full_circuits(name, request) -> None:
    """splice: empty = T's clean run, full = S's final residual (with T's b_O) through T's final
    norm + unembedding; ablate: full = S's clean run, empty = T's final residual (with S's b_O)
    through S's final norm + unembedding. Both directions."""
    pair = _pair(name, request)
    patcher, engine = _setup(pair, _task(pair))
    every = list(patcher.graph.edges)
    n_layers = pair.shape.n_layers
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    for d in DIRECTIONS:
        src, tgt = pair.model(d.source), pair.model(d.target)
        c_s, c_t = _cache(src, engine.tokens), _cache(tgt, engine.tokens)
        b_s, b_t = _b_o_sum(src, n_layers), _b_o_sum(tgt, n_layers)
        splice = patcher.run(d, [[], every], semantics="splice")
        ablate = patcher.run(d, [every, []], semantics="ablate")
        _err("splice empty = T", splice[0], engine.metric_of(d.target), 1e-6)
        want = _from_final(tgt, engine, c_s[final] - b_s + b_t)
        _err("splice full = T's unembed of S's final resid", splice[1], want, 1e-5)
        _err("ablate full = S", ablate[0], engine.metric_of(d.source), 1e-6)
        want = _from_final(src, engine, c_t[final] - b_t + b_s)
        _err("ablate empty = S's unembed of T's final resid", ablate[1], want, 1e-5)
        # the splice ceiling: fraction of the shift the full circuit moves (1 if unembed shared)
        shift = engine.metric_of(d.source).double().mean() - engine.metric_of(d.target).mean()
        moved = splice[1].double().mean() - engine.metric_of(d.target).mean()
        ERRORS[f"splice full ceiling {name} {d.value}"] = float(moved / shift)


def test_full_splice_is_the_source_run_when_only_blocks_differ() -> None:
    """With embedding-free differences only in the blocks (final norm, unembedding and b_O
    shared), the full splice circuit reproduces the source run itself."""
    pair = _native(lambda m: ref.perturb_matching(m, lambda k: k.startswith("blocks."), scale=0.3))
    patcher, engine = _setup(pair, _task(pair))
    d = DIRECTIONS[0]
    got = patcher.run(d, [list(patcher.graph.edges)])[0]
    _err("splice full = S (blocks-only pair)", got, engine.metric_of(d.source), 1e-5)


def test_attention_output_bias_stays_with_the_live_run() -> None:
    """A pair whose b_O differs: the full splice keeps T's b_O, the full-complement ablate S's."""

    def perturb(m: Any) -> None:
        ref.perturb_matching(m, lambda k: k.startswith("blocks."), scale=0.3)
        for layer in range(3):
            gen = torch.Generator().manual_seed(layer)
            m.state_dict()[f"blocks.{layer}.attn.o.bias"] += 0.5 * torch.randn(64, generator=gen)

    pair = _native(perturb)
    patcher, engine = _setup(pair, _task(pair))
    final = "blocks.2.hook_resid_post"
    d = DIRECTIONS[1]
    src, tgt = pair.model(d.source), pair.model(d.target)
    b_s, b_t = _b_o_sum(src, 3), _b_o_sum(tgt, 3)
    assert float((b_s - b_t).abs().max()) > 0.1
    c_s, c_t = _cache(src, engine.tokens), _cache(tgt, engine.tokens)
    every = list(patcher.graph.edges)
    got = patcher.run(d, [every])[0]
    _err("splice full, b_O differs", got, _from_final(tgt, engine, c_s[final] - b_s + b_t), 1e-5)
    assert float((got - engine.metric_of(d.source)).abs().max()) > 1e-3
    got = patcher.run(d, [[]], semantics="ablate")[0]
    _err("ablate empty, b_O differs", got, _from_final(src, engine, c_t[final] - b_t + b_s), 1e-5)


# --- node-level equivalences ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_edges_match_node_patches(name, request) -> None:
    """Every edge into logits = patching the last resid_post; every edge from layers < 1 into
    layers >= 1 and logits = patching resid_pre of layer 1 (b_O is equal in these pairs)."""
    pair = _pair(name, request)
    task = _task(pair)
    patcher, _ = _setup(pair, task)
    n_layers = pair.shape.n_layers
    for layer in range(n_layers):
        assert torch.equal(_b_o(pair.reference, layer), _b_o(pair.intervened, layer))
    graph = patcher.graph
    into_logits = graph.incoming("logits")
    cut = [e for e in graph.edges
           if (e.sender.kind == "embed" or (e.sender.layer or 0) < 1)
           and (e.receiver.kind == "logits" or (e.receiver.layer or 0) >= 1)]  # fmt: skip
    got = {d: patcher.run(d, [into_logits, cut]) for d in DIRECTIONS}
    for i, site in enumerate((md.Site("resid_post", n_layers - 1), md.Site("resid_pre", 1))):
        both = md.patch(pair, task, site, "both", n_boot=N_BOOT)
        assert isinstance(both, BothDirections)
        for node in both:
            _err(f"edges = node patch {site}", got[node.direction][i], node.per_prompt, 1e-5)


def test_ragged_prompts_match_node_patch(native) -> None:
    """Prompts of different lengths (padded): all edges into logits = patching the last
    resid_post, read at each prompt's own last token."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 50, (n,), generator=gen).tolist() for n in (5, 8, 6, 7, 4, 8)]
    task = ref.contrast_task(native, prompts)
    patcher, _ = _setup(native, task)
    into_logits = patcher.graph.incoming("logits")
    both = md.patch(native, task, md.Site("resid_post", 2), "both", n_boot=N_BOOT)
    assert isinstance(both, BothDirections)
    for node in both:
        got = patcher.run(node.direction, [into_logits])[0]
        _err("ragged: edges into logits = resid_post patch", got, node.per_prompt, 1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_edges_into_one_receiver(name, request) -> None:
    """All edges into L1H0.q/k/v = T with head 0's q, k, v (key/value head 0 under GQA) computed
    by T's own modules from S's residual (T's b_O); all edges into MLP1 likewise at mlp.hook_in."""
    pair = _pair(name, request)
    patcher, engine = _setup(pair, _task(pair))
    graph = patcher.graph
    d_head = int(pair.cfg.d_head)
    for d in DIRECTIONS:
        src, tgt = pair.model(d.source), pair.model(d.target)
        c_s = _cache(src, engine.tokens)
        resid = c_s["blocks.1.ln1.hook_in"] - _b_o(src, 0) + _b_o(tgt, 0)
        mid = c_s["blocks.1.ln2.hook_in"]
        if not graph.parallel:
            mid = mid - _b_o(src, 1) + _b_o(tgt, 1)
        mid = mid - _b_o(src, 0) + _b_o(tgt, 0)
        block = tgt.blocks[1]
        with torch.no_grad():
            new = {x: getattr(block.attn, x)(block.ln1(resid)) for x in "qkv"}
            mlp_in = block.ln2(mid)

        heads = [e for r in ("L1H0.q", "L1H0.k", "L1H0.v") for e in graph.incoming(r)]
        got = patcher.run(d, [heads, graph.incoming("MLP1")])
        hooks = [
            (f"blocks.1.attn.hook_{x}", _put_head(new[x].unflatten(-1, (-1, d_head))[:, :, 0], 0))
            for x in "qkv"
        ]
        _err("all edges into L1H0.q/k/v", got[0], _run_hooked(tgt, engine, hooks), 1e-5)
        hooks = [("blocks.1.mlp.hook_in", _put_all(mlp_in))]
        _err("all edges into MLP1", got[1], _run_hooked(tgt, engine, hooks), 1e-5)


def _put_head(value: Tensor, head: int) -> Any:
    """A hook setting one head's slice of a [batch, pos, head, d_head] activation."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[:, :, head] = value
        return act

    return hook


def _put_all(value: Tensor) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return value

    return hook


def _hand_z(sd: dict[str, Tensor], emb_q: Tensor, emb_kv: Tensor, h: int, d_head: int) -> Tensor:
    """Layer 0's head ``h`` of a native model by hand: LayerNorm (eps 1e-5), q from ``emb_q``,
    k and v from ``emb_kv``, causal softmax attention with scale sqrt(d_head)."""
    cols = slice(h * d_head, (h + 1) * d_head)

    def proj(x: Tensor, which: str) -> Tensor:
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        x = x * sd["blocks.0.ln1.weight"] + sd["blocks.0.ln1.bias"]
        w, b = sd[f"blocks.0.attn.{which}.weight"], sd[f"blocks.0.attn.{which}.bias"]
        return x @ w[cols].T + b[cols]

    q, k, v = proj(emb_q, "q"), proj(emb_kv, "k"), proj(emb_kv, "v")
    scores = q @ k.transpose(-1, -2) / d_head**0.5
    n = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    return scores.softmax(-1) @ v


def test_single_embed_edge_matches_hand_written_attention(native) -> None:
    """``embed -> L0H1.q`` on a native model: layer 0's head 1 written out in torch from the state
    dict (LayerNorm, causal softmax attention) with the source embedding for q only."""
    pair = native
    patcher, engine = _setup(pair, _task(pair))
    h, d_head = 1, 16
    for d in DIRECTIONS:
        src, tgt = pair.model(d.source), pair.model(d.target)
        c_s, c_t = _cache(src, engine.tokens), _cache(tgt, engine.tokens)
        emb_s = c_s["hook_embed"] + c_s["hook_pos_embed"]
        emb_t = c_t["hook_embed"] + c_t["hook_pos_embed"]
        sd = _state(tgt)
        clean = _hand_z(sd, emb_t, emb_t, h, d_head)
        torch.testing.assert_close(clean, c_t["blocks.0.attn.hook_z"][:, :, h])
        put = _put_head(_hand_z(sd, emb_s, emb_t, h, d_head), h)
        want = _run_hooked(tgt, engine, [("blocks.0.attn.hook_z", put)])
        got = patcher.run(d, [["embed -> L0H1.q"]])[0]
        _err("embed -> L0H1.q by hand", got, want, 1e-5)
        assert float((got - engine.metric_of(d.target)).abs().max()) > 1e-4


# --- batching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "combos"),
    [
        ("native", [("splice", DIRECTIONS[0]), ("ablate", DIRECTIONS[1])]),
        ("llama", [("ablate", DIRECTIONS[0]), ("splice", DIRECTIONS[1])]),
    ],
)
def test_batched_circuits_equal_separate_calls(name, combos, request) -> None:
    """Several circuits stacked in one forward = one circuit per forward = patch_edges."""
    pair = _pair(name, request)
    task = _task(pair)
    every = list(Graph.from_model(pair).edges)
    rng = random.Random(0)
    circuits = [rng.sample(every, k) for k in (1, 5, 40, len(every) // 2)] + [[]]
    patcher, _ = _setup(pair, task, batch_budget=8)  # 6 prompts: one circuit per forward
    stacked, _ = _setup(pair, task, batch_budget=64)  # several circuits per forward
    for semantics, d in combos:
        a = patcher.run(d, circuits, semantics=semantics)
        b = stacked.run(d, circuits, semantics=semantics)
        _err("stacked = one per forward", b, a, 1e-6)
        one = patch_edges(pair, task, circuits[2], d, semantics=semantics, n_boot=N_BOOT)
        assert isinstance(one, PatchResult)
        _err("run = patch_edges", b[2], one.per_prompt, 1e-6)


# --- the result ----------------------------------------------------------------------------------


def test_result_fields(native) -> None:
    task = _task(native)
    edges: list[Edge | str] = ["L1H2 -> logits", Edge.parse("embed -> L0H1.q"), "MLP0 -> L2H3.k"]
    both = patch_edges(native, task, edges, "both", semantics="ablate", n_boot=N_BOOT)
    assert isinstance(both, BothDirections)
    for result, d in zip(both, DIRECTIONS, strict=True):
        assert result.direction is d and result.sites == ()
        assert result.provenance["semantics"] == "ablate"
        assert result.provenance["edges"] == ["embed -> L0H1.q", "MLP0 -> L2H3.k", "L1H2 -> logits"]
        assert result.per_prompt.shape == (6,)
    full = patch_edges(native, task, Graph.from_model(native).edges, semantics="ablate",
                       n_boot=N_BOOT)  # fmt: skip
    assert isinstance(full, PatchResult)
    assert abs(full.score - 1.0) < 1e-5
    empty = patch_edges(native, task, [], "intervened->reference", n_boot=N_BOOT)
    assert isinstance(empty, PatchResult) and abs(empty.score) < 1e-6


def test_bad_input_raises_typed_errors(native, request) -> None:
    task = _task(native)
    for bad in ("L9H0 -> logits", "L0H7 -> logits", "foo -> logits", "L0H0 -> L1H0",
                "L0H0 -> L1H0.x", "L0H0 logits", "L1H0 -> L0H1.q", "L1H0 -> L1H2.q",
                "MLP1 -> MLP1", "logits -> MLP0"):  # fmt: skip
        with pytest.raises(SiteError):
            patch_edges(native, task, [bad], n_boot=N_BOOT)
    with pytest.raises((SiteError, TypeError)):  # TypeError: the test suite's runtime type checks
        patch_edges(native, task, [3], n_boot=N_BOOT)  # type: ignore[list-item]
    for semantics in ("splce", "", "graf"):
        with pytest.raises(ConfigError, match="semantics"):
            patch_edges(native, task, ["L0H0 -> logits"], semantics=semantics, n_boot=N_BOOT)
    with pytest.raises(ConfigError):
        patch_edges(native, task, ["L0H0 -> logits"], direction="sideways", n_boot=N_BOOT)
    with pytest.raises(ConfigError):
        EdgePatcher(native, task).run("both", [["L0H0 -> logits"]])
    pairs = request.getfixturevalue("hf_pairs")
    llama_task = _task(pairs["llama"])
    with pytest.raises(SiteError, match="first"):
        patch_edges(pairs["llama"], llama_task, ["L0H0 -> L1H1.k"], n_boot=N_BOOT)
    with pytest.raises(SiteError, match="parallel"):
        patch_edges(pairs["neox"], _task(pairs["neox"]), ["L0H0 -> MLP0"], n_boot=N_BOOT)


def test_report_errors() -> None:
    """Runs last (file order): prints what the invariants measured (visible with ``-s``)."""
    for key, value in sorted(ERRORS.items()):
        print(f"{key}: {value:.3g}")
