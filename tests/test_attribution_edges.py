"""Edge attribution (EAP, EAP-IG) across two models, checked against independent autograd
gradients, exact hand-computed splices along ``X -> logits`` edges, and exact zeros."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import mechdelta as md
from mechdelta.attribution._grads import grad_pass
from mechdelta.attribution.edges import EdgeAttribution, _layer_grads, _Layout, attribute_edges
from mechdelta.attribution.edges import _weights as read_weights
from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.errors import ConfigError, MechDeltaError
from mechdelta.patching._engine import PatchEngine
from mechdelta.patching.results import BothDirections
from tests import _builders
from tests import _reference as ref

N_BOOT = ref.N_BOOT
DIRECTIONS = ("reference->intervened", "intervened->reference")


# --- pairs ---------------------------------------------------------------------------------------


def _native(perturb: Any) -> md.ModelPair:
    return md.ModelPair(*_builders.native_pair(perturb))


@pytest.fixture(scope="module")
def native() -> md.ModelPair:
    return _native(lambda m: ref.perturb_matching(m, lambda k: True, scale=0.3))


@pytest.fixture(scope="module")
def compat(tokenizer) -> md.ModelPair:
    """GPT-2 seeds 0 and 1 with TransformerLens's compatibility processing (folded norms)."""
    a, b = (_builders.hf_model("gpt2", len(tokenizer), seed) for seed in (0, 1))
    return md.ModelPair.from_hf(a, b, tokenizer=tokenizer, processing="compat")


def _pair(name: str, request: pytest.FixtureRequest) -> md.ModelPair:
    if name == "native":
        return request.getfixturevalue("native")
    if name == "gpt2-compat":
        return request.getfixturevalue("compat")
    return request.getfixturevalue("hf_pairs")[name]


def _task(pair: md.ModelPair, batch: int = 6, seq: int = 8) -> md.Task:
    vocab = int(pair.cfg.d_vocab)
    return ref.contrast_task(pair, ref.random_tokens(batch, seq, vocab, seed=1))


# --- independent helpers -------------------------------------------------------------------------


def _cache(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {k: v for k, v in cache.items()}


def _metric_from_final(model: Any, engine: PatchEngine, resid: Tensor) -> Tensor:
    """The metric per prompt with the final residual set to ``resid`` (final norm + unembed of
    ``model``, called by hand: no hooks)."""
    with torch.no_grad():
        logits = model.unembed(model.ln_final(resid))
    pos = engine.inputs.positions
    idx = pos[..., None].expand(-1, -1, logits.shape[-1])
    return engine.prepared.metric(logits.gather(1, idx), engine.inputs)


def _write(model: Any, cache: dict[str, Tensor], node: Node) -> Tensor:
    """A sender's write from a run_with_cache cache, with W_O from the state dict."""
    if node.kind == "embed":
        out = cache["hook_embed"]
        if model.cfg.positional_embedding_type == "standard":
            out = out + cache["hook_pos_embed"]
        return out
    if node.kind == "mlp":
        return cache[f"blocks.{node.layer}.hook_mlp_out"]
    assert node.head is not None
    d_head = int(model.cfg.d_head)
    w = model.state_dict()[f"blocks.{node.layer}.attn.o.weight"]
    cols = slice(node.head * d_head, (node.head + 1) * d_head)
    return cache[f"blocks.{node.layer}.attn.hook_z"][:, :, node.head] @ w[:, cols].T


def _direct_input_grad(model: Any, engine: PatchEngine, receiver: str, resid: Tensor) -> Tensor:
    """∂(sum of the metric)/∂(one receiver's pre-norm residual input) by plain autograd: the
    receiver's own input (one head's q/k/v, an MLP's input, the final residual) is recomputed
    from a leaf ``x`` outside the forward and written into the run at its hook."""
    x = resid.detach().clone().requires_grad_(True)
    parsed = Edge.parse(f"embed -> {receiver}").receiver
    inp = receiver.partition(".")[2]
    with torch.enable_grad():
        if parsed.kind == "logits":
            hook, value, head = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", x, None
        elif parsed.kind == "mlp":
            block = model.blocks[parsed.layer]
            hook, value, head = f"blocks.{parsed.layer}.mlp.hook_in", block.ln2(x), None
        else:
            assert parsed.head is not None
            attn = model.blocks[parsed.layer].attn
            y = getattr(attn, inp)(model.blocks[parsed.layer].ln1(x))
            group = int(model.cfg.n_heads) // engine.shape.n_kv_heads if inp != "q" else 1
            head = parsed.head // group
            value = y.reshape(*y.shape[:2], -1, int(model.cfg.d_head))[:, :, head]
            hook = f"blocks.{parsed.layer}.attn.hook_{inp}"

        def put(act: Tensor, hook: Any) -> Tensor:
            if head is None:
                return value
            act = act.clone()
            act[:, :, head] = value
            return act

        logits = model.run_with_hooks(engine.tokens, fwd_hooks=[(hook, put)])
        pos = engine.inputs.positions
        idx = pos[..., None].expand(-1, -1, logits.shape[-1])
        engine.prepared.metric(logits.gather(1, idx), engine.inputs).sum().backward()
    assert x.grad is not None
    return x.grad


def _input_resid(receiver: str, cache: dict[str, Tensor], n_layers: int, parallel: bool) -> Tensor:
    parsed = Edge.parse(f"embed -> {receiver}").receiver
    if parsed.kind == "logits":
        return cache[f"blocks.{n_layers - 1}.hook_resid_post"]
    if parsed.kind == "mlp" and not parallel:
        return cache[f"blocks.{parsed.layer}.hook_resid_mid"]
    return cache[f"blocks.{parsed.layer}.hook_resid_pre"]


# --- the pulled-back gradients -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["native", "gpt2", "neox", "llama", "gpt2-compat"])
def test_pulled_back_gradients_match_norm_input_gradients(name, request) -> None:
    """Per layer, against probes on the norms' inputs: the MLP's pulled-back gradient is the
    gradient at ``ln2.hook_in``; the sum over the layer's head inputs (q, k, v of every head)
    is the gradient at ``ln1.hook_in``; with the residual path they make ``resid_pre``'s.
    (In TL 4, ``hook_resid_mid`` is an alias of ``ln2.hook_in``: its probe sees the MLP only.)"""
    pair = _pair(name, request)
    engine = PatchEngine(pair, _task(pair))
    engine.clean_run()
    graph = Graph.from_model(pair)
    layout = _Layout(graph, pair.cfg.positional_embedding_type == "standard")
    model = pair.intervened
    w = read_weights(engine, "intervened")
    names = layout.grads() + layout.values()
    for layer in range(graph.shape.n_layers):
        names += [f"blocks.{layer}.{n}" for n in ("ln1.hook_in", "ln2.hook_in", "hook_resid_post")]
    _, grads, vals = grad_pass(
        model, engine.tokens, engine.inputs.positions, engine.inputs, engine.prepared.metric,
        list(dict.fromkeys(names)), values=True,
    )  # fmt: skip
    for layer in range(graph.shape.n_layers):
        heads, mlp = _layer_grads(model, w, layout, grads, vals, layer)
        assert heads.shape[0] == graph.shape.n_heads + 2 * graph.shape.n_kv_heads
        assert mlp is not None
        at = {n: grads[f"blocks.{layer}.{n}"] for n in ("ln1.hook_in", "ln2.hook_in")}
        post = grads[f"blocks.{layer}.hook_resid_post"]
        pre = grads[f"blocks.{layer}.hook_resid_pre"]
        scale = float(pre.abs().max())
        tol = 1e-5 * scale
        torch.testing.assert_close(mlp, at["ln2.hook_in"], rtol=1e-4, atol=tol)
        torch.testing.assert_close(heads.sum(0), at["ln1.hook_in"], rtol=1e-4, atol=tol)
        torch.testing.assert_close(pre, post + mlp + heads.sum(0), rtol=1e-4, atol=tol)


# --- the consistency identity --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["native", "gpt2", "neox", "llama", "gpt2-compat"])
def test_incoming_edges_plus_bias_equal_node_attribution(name, request) -> None:
    """Σ incoming edge scores + bias term = Δ(receiver's residual input) · ∂m/∂(that input),
    with the gradient from plain autograd through the receiver's own input (every receiver)."""
    pair = _pair(name, request)
    task = _task(pair)
    both = attribute_edges(pair, task, "both", n_boot=N_BOOT)
    assert isinstance(both, BothDirections)
    engine = PatchEngine(pair, task)
    engine.clean_run()
    caches = {k: _cache(pair.model(k), engine.tokens) for k in ("reference", "intervened")}
    graph = Graph.from_model(pair)
    for result in both:
        d = result.direction
        target = pair.model(d.target)
        totals = result.receiver_totals
        for r, receiver in enumerate(result.receivers):
            args = (graph.shape.n_layers, graph.parallel)
            resid_t = _input_resid(receiver, caches[d.target], *args)
            resid_s = _input_resid(receiver, caches[d.source], *args)
            grad = _direct_input_grad(target, engine, receiver, resid_t)
            want = ((resid_s - resid_t).double() * grad.double()).sum((1, 2))
            scale = float(want.abs().max()) + 1e-8
            torch.testing.assert_close(
                totals[r], want, rtol=1e-4, atol=1e-4 * scale, msg=f"{name} {d} {receiver}"
            )


# --- exact zeros ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_unchanged_senders_score_exactly_zero(method) -> None:
    pair = _native(lambda m: ref.perturb_head(m, 1, 2, "v", d_head=16))
    both = attribute_edges(pair, _task(pair), "both", method, steps=3, n_boot=N_BOOT)
    assert isinstance(both, BothDirections)
    same = {"embed", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0", "L1H0", "L1H1", "L1H3"}
    for result in both:
        for e, row in zip(result.edges, result.per_prompt, strict=True):
            if str(e.sender) in same:
                assert bool((row == 0).all()), e
        changed = [i for i, e in enumerate(result.edges) if str(e.sender) == "L1H2"]
        assert result.per_prompt[changed].abs().sum() > 0
        assert bool((result.bias == 0).all())


# --- first order: EAP against exact splices along X -> logits edges -----------------------------


def _tiny_pair(eps: float) -> md.ModelPair:
    return _native(lambda m: ref.perturb_matching(m, lambda k: True, seed=5, scale=eps))


def _exact_logit_edges(pair: md.ModelPair, task: md.Task, direction: md.Direction):
    """Exact metric change per ``X -> logits`` edge: the target's final residual plus (source
    write - target write) of X, through the target's final norm and unembedding (by hand)."""
    engine = PatchEngine(pair, task)
    engine.clean_run()
    src, tgt = pair.model(direction.source), pair.model(direction.target)
    c_s, c_t = _cache(src, engine.tokens), _cache(tgt, engine.tokens)
    final = f"blocks.{pair.shape.n_layers - 1}.hook_resid_post"
    base = _metric_from_final(tgt, engine, c_t[final])
    out = {}
    for node in Graph.from_model(pair).senders:
        delta = _write(src, c_s, node) - _write(tgt, c_t, node)
        patched = _metric_from_final(tgt, engine, c_t[final] + delta)
        out[str(node)] = float((patched - base).double().mean())
    return out


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_eap_matches_exact_logit_edges_to_first_order(direction) -> None:
    d = md.Direction(direction)
    task = _task(_tiny_pair(0.04), batch=8)
    errors = []
    for eps in (0.04, 0.02):
        pair = _tiny_pair(eps)
        result = attribute_edges(pair, task, d, n_boot=N_BOOT)
        assert isinstance(result, EdgeAttribution)
        exact = _exact_logit_edges(pair, task, d)
        est = {str(e.sender): float(s) for e, s in zip(result.edges, result.scores, strict=True)
               if e.receiver.kind == "logits"}  # fmt: skip
        assert set(est) == set(exact)
        size = sum(abs(v) for v in exact.values())
        err = sum(abs(est[k] - exact[k]) for k in exact)
        assert err < 0.05 * size
        errors.append(err)
    assert errors[0] / errors[1] > 3.0, errors


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_eap_ig_agrees_with_eap_on_logit_edges(direction) -> None:
    pair = _tiny_pair(0.02)
    task = _task(pair, batch=8)
    eap = attribute_edges(pair, task, direction, n_boot=N_BOOT)
    ig = attribute_edges(pair, task, direction, "eap-ig", steps=12, n_boot=N_BOOT)
    assert isinstance(eap, EdgeAttribution) and isinstance(ig, EdgeAttribution)
    assert ig.steps == 12 and eap.steps is None
    rows = [i for i, e in enumerate(eap.edges) if e.receiver.kind == "logits"]
    a, b = eap.scores[rows], ig.scores[rows]
    assert float((a - b).abs().sum()) < 0.02 * float(a.abs().sum())


@pytest.mark.parametrize("name", ["native", "llama"])
def test_eap_ig_logits_receiver_is_complete(name, request) -> None:
    """IG along the straight path of the final residual: the logits receiver's total (incoming
    edges + bias) is the exact change f_T(resid_S) - f_T(resid_T) up to the midpoint rule."""
    pair = _pair(name, request)
    task = _task(pair)
    d = md.Direction.REFERENCE_TO_INTERVENED
    ig = attribute_edges(pair, task, d, "eap-ig", steps=24, n_boot=N_BOOT)
    assert isinstance(ig, EdgeAttribution)
    engine = PatchEngine(pair, task)
    engine.clean_run()
    final = f"blocks.{pair.shape.n_layers - 1}.hook_resid_post"
    tgt = pair.model(d.target)
    r_s = _cache(pair.model(d.source), engine.tokens)[final]
    r_t = _cache(tgt, engine.tokens)[final]
    want = (_metric_from_final(tgt, engine, r_s) - _metric_from_final(tgt, engine, r_t)).double()
    got = ig.receiver_totals[ig.receivers.index("logits")]
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


# --- the result object ---------------------------------------------------------------------------


def test_result_api_and_round_trip(native, tmp_path) -> None:
    task = _task(native)
    result = attribute_edges(native, task, "intervened->reference", batch_budget=4, n_boot=N_BOOT)
    assert isinstance(result, EdgeAttribution)
    full = attribute_edges(native, task, "intervened->reference", n_boot=N_BOOT)
    assert isinstance(full, EdgeAttribution)
    torch.testing.assert_close(result.per_prompt, full.per_prompt, rtol=1e-6, atol=1e-9)
    assert result.per_prompt.shape == (len(result.edges), 6)
    shift = result.shift.shift
    torch.testing.assert_close(result.fractions, result.scores / shift)
    top = result.top(5)
    assert len(top) == 5
    assert [abs(t.score) for t in top] == sorted((abs(t.score) for t in top), reverse=True)
    assert abs(top[0].score) == float(result.scores.abs().max())
    assert result.score(str(top[0].edge)) == top[0].score
    df = result.to_dataframe()
    assert list(df.columns) == ["edge", "sender", "receiver", "input", "score", "fraction"]
    assert len(df) == len(result.edges)
    fig = result.figure()
    assert fig.data[0].type == "heatmap"
    assert "edge attribution" in str(result)
    result.save(tmp_path / "edges")
    back = EdgeAttribution.load(tmp_path / "edges")
    assert back.edges == result.edges and back.receivers == result.receivers
    assert torch.equal(back.per_prompt, result.per_prompt) and torch.equal(back.bias, result.bias)
    assert back.direction is result.direction and back.method == "eap"
    assert back.shift.shift == result.shift.shift
    with pytest.raises(md.ResultFormatError):
        md.ShiftResult.load(tmp_path / "edges")


def test_fraction_sign_toward_reference(native) -> None:
    result = attribute_edges(native, _task(native), "reference->intervened", n_boot=N_BOOT)
    assert isinstance(result, EdgeAttribution)
    torch.testing.assert_close(result.fractions, -result.scores / result.shift.shift)


def test_bad_arguments_raise_typed_errors(native) -> None:
    task = _task(native)
    with pytest.raises(ConfigError, match="method"):
        attribute_edges(native, task, method="atp-edges")
    for steps in (0, -1, True):
        with pytest.raises(ConfigError, match="steps"):
            attribute_edges(native, task, method="eap-ig", steps=steps)  # type: ignore[arg-type]
    with pytest.raises(MechDeltaError):
        attribute_edges(native, task, direction="sideways")
    with pytest.raises(ConfigError):
        attribute_edges(native, task, batch_budget=0)
