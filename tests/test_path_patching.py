"""Exact path patching across two models, checked against independent computations: a native
model written out in plain torch (float64) and evaluated copy by copy on random treeified path
sets; naive hop-by-hop runs through the bridge's own modules (one full forward per node copy) on
an HF family and a zoo model; single-hop paths against ``patch_edges``."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import Tensor

import mechdelta as md
from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.errors import ConfigError, SiteError
from mechdelta.patching.edges import EdgePatcher
from mechdelta.patching.paths import Path, PathPatcher, as_paths, patch_paths, path_values
from mechdelta.patching.results import BothDirections, PatchResult
from tests import _builders
from tests import _reference as ref

N_BOOT = ref.N_BOOT
DIRECTIONS = (md.Direction.REFERENCE_TO_INTERVENED, md.Direction.INTERVENED_TO_REFERENCE)
ERRORS: dict[str, float] = {}  # measured max abs errors, printed at the end (pytest -s)


def _err(key: str, got: Tensor, want: Tensor, tol: float) -> None:
    err = float((got.double() - want.double()).abs().max())
    ERRORS[key] = max(err, ERRORS.get(key, 0.0))
    scale = max(1.0, float(want.abs().max()))
    assert err <= tol * scale, f"{key}: max abs error {err:.3g}"


@pytest.fixture(scope="module")
def native() -> md.ModelPair:
    """3 layers, 4 heads, MLPs; every 2-D weight differs."""
    pair = _builders.native_pair(lambda m: ref.perturb_matching(m, lambda k: True, scale=0.3))
    return md.ModelPair(*pair)


def _task(pair: md.ModelPair, batch: int = 6, seq: int = 8) -> md.Task:
    return ref.contrast_task(pair, ref.random_tokens(batch, seq, int(pair.cfg.d_vocab), seed=1))


def _metric(task: md.Task, logits_last: Tensor) -> Tensor:
    answers, wrong = task.answers, task.wrong
    assert isinstance(answers, Tensor) and isinstance(wrong, Tensor)
    return ref.logit_diff(logits_last, answers, wrong)


# --- reference 1: a native model in plain torch, node by node ------------------------------------


class _Hand:
    """A native bridge (LayerNorm, learned positions, GELU MLPs) written out in float64 torch from
    its state dict, with every receiver input explicit: :meth:`run` feeds each receiver input
    the live residual + Σ over carried ``(sender, write)`` of (write - live write of sender)."""

    def __init__(self, model: Any) -> None:
        self.sd = {k: v.detach().double() for k, v in model.state_dict().items()}
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head

    def ln(self, x: Tensor, name: str) -> Tensor:
        x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        return x * self.sd[f"{name}.weight"] + self.sd[f"{name}.bias"]

    def head(self, layer: int, h: int, xq: Tensor, xk: Tensor, xv: Tensor) -> Tensor:
        sd, p, cols = self.sd, f"blocks.{layer}", slice(h * self.d_head, (h + 1) * self.d_head)

        def proj(x: Tensor, which: str) -> Tensor:
            w, b = sd[f"{p}.attn.{which}.weight"], sd[f"{p}.attn.{which}.bias"]
            return self.ln(x, f"{p}.ln1") @ w[cols].T + b[cols]

        q, k, v = proj(xq, "q"), proj(xk, "k"), proj(xv, "v")
        scores = q @ k.transpose(-1, -2) / self.d_head**0.5
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        return (scores.softmax(-1) @ v) @ sd[f"{p}.attn.o.weight"][:, cols].T

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        sd, p = self.sd, f"blocks.{layer}.mlp"
        hidden = torch.nn.functional.gelu(self.ln(x, f"blocks.{layer}.ln2") @ sd[f"{p}.in.weight"].T + sd[f"{p}.in.bias"])  # fmt: skip
        return hidden @ sd[f"{p}.out.weight"].T + sd[f"{p}.out.bias"]

    def run(
        self, tokens: Tensor, carry: dict[str, list[tuple[Node, Tensor]]] | None = None
    ) -> tuple[dict[Node, Tensor], Tensor]:
        """Every node's write and the logits ``[batch, pos, vocab]``."""
        carry = carry or {}
        writes: dict[Node, Tensor] = {}

        def inp(name: str, resid: Tensor) -> Tensor:
            return resid + sum((w - writes[s] for s, w in carry.get(name, [])), torch.zeros(()))

        n_pos = tokens.shape[1]
        resid = self.sd["embed.weight"][tokens] + self.sd["pos_embed.weight"][:n_pos]
        writes[Node("embed")] = resid
        for layer in range(self.n_layers):
            attn = self.sd[f"blocks.{layer}.attn.o.bias"].expand_as(resid)
            for h in range(self.n_heads):
                xs = [inp(f"L{layer}H{h}.{x}", resid) for x in "qkv"]
                writes[Node("head", layer, h)] = self.head(layer, h, *xs)
                attn = attn + writes[Node("head", layer, h)]
            resid = resid + attn
            writes[Node("mlp", layer)] = self.mlp(layer, inp(f"MLP{layer}", resid))
            resid = resid + writes[Node("mlp", layer)]
        final = self.ln(inp("logits", resid), "ln_final")
        return writes, final @ self.sd["unembed.weight"].T + self.sd["unembed.bias"]


def _hand_paths(hand_t: _Hand, src: dict[Node, Tensor], tokens: Tensor, paths: Any) -> Tensor:
    """Treeified path patching by recursion over node copies, one full run per copy."""
    full = {p.edges for p in paths}

    def value(suffix: tuple[Edge, ...]) -> Tensor:
        if suffix in full:
            return src[suffix[0].sender]
        into = {p.edges[i - 1] for p in paths for i in range(1, len(p.edges))
                if p.edges[i:] == suffix}  # fmt: skip
        carry: dict[str, list[tuple[Node, Tensor]]] = {}
        for e in into:
            carry.setdefault(e.receiver_input, []).append((e.sender, value((e, *suffix))))
        return hand_t.run(tokens, carry)[0][suffix[0].sender]

    carry: dict[str, list[tuple[Node, Tensor]]] = {}
    for e in {p.edges[-1] for p in paths}:
        carry.setdefault(e.receiver_input, []).append((e.sender, value((e,))))
    return hand_t.run(tokens, carry)[1][:, -1]


def _hand_dag(hand_t: _Hand, src: dict[Node, Tensor], tokens: Tensor, paths: Any) -> Tensor:
    """The union of the paths' edges evaluated as one DAG: each node once, on T-clean inputs +
    the changes of all its incoming union edges; first senders carry S's write."""
    edges = {e for p in paths for e in p.edges}
    roots = {p.sender for p in paths}

    def value(node: Node) -> Tensor:
        if node in roots:
            return src[node]
        carry: dict[str, list[tuple[Node, Tensor]]] = {}
        for e in edges:
            if e.receiver == node:
                carry.setdefault(e.receiver_input, []).append((e.sender, value(e.sender)))
        return hand_t.run(tokens, carry)[0][node]

    carry = {"logits": [(e.sender, value(e.sender)) for e in edges if e.receiver.kind == "logits"]}
    return hand_t.run(tokens, carry)[1][:, -1]


def _outgoing(graph: Graph) -> dict[Node, list[Edge]]:
    edges = graph.edges  # built anew on each access: read once
    return {s: [e for e in edges if e.sender == s] for s in graph.senders}


def _random_path(out: dict[Node, list[Edge]], rng: random.Random) -> Path:
    node = rng.choice(sorted(out, key=lambda n: n.rank)[:-1])
    hops: list[Edge] = []
    while True:
        choices = out[node]
        to_logits = [e for e in choices if e.receiver.kind == "logits"]
        e = to_logits[0] if rng.random() < 0.3 or len(choices) == 1 else rng.choice(choices)
        hops.append(e)
        if e.receiver.kind == "logits" or rng.random() < 0.1:  # sometimes end at a receiver
            return Path(tuple(hops))
        node = e.receiver


HAND_SETS = [
    ["L0H1 -> L1H2.q -> logits", "MLP0 -> L1H2.q -> logits"],  # two hops into one input
    ["L0H1 -> L1H2.q -> logits", "L0H3 -> L1H2.k -> L2H0.v -> logits"],  # treeified, not union
    [
        "L0H1 -> L1H2.q -> logits",
        "L0H3 -> L1H2.k -> L2H0.v -> logits",
        "L0H1 -> L1H2.q -> L2H0.v -> logits",
        "L0H3 -> L1H2.k -> logits",
    ],  # closed: = union DAG
    ["L1H2 -> logits", "L0H1 -> L1H2.q -> logits"],  # the shorter path subsumes the longer
    ["L0H1 -> L1H2.q -> L2H3.k -> logits", "L0H1 -> L1H2.q -> logits"],  # shared first hop
    ["embed -> MLP0 -> L1H0.v -> MLP2 -> logits", "embed -> L0H2.k -> MLP1 -> logits"],
    ["L0H1 -> L1H2.q -> L2H0.k", "L0H0 -> MLP1 -> logits"],  # a chain ending at a receiver
    ["L0H1 -> MLP0 -> L2H0.q", "L1H3 -> L2H0.q", "MLP1 -> logits"],
]


def test_hand_written_model_agrees(native) -> None:
    """The plain-torch model reproduces the bridge's logits (so it can serve as a reference)."""
    tokens = ref.random_tokens(6, 8, 50, seed=1)
    for model in (native.reference, native.intervened):
        with torch.no_grad():
            want = model(tokens)
        _err("hand model = bridge", _Hand(model).run(tokens)[1], want, 1e-5)


def test_paths_match_plain_torch_reference(native) -> None:
    """Hand-picked and random path sets (chains, shared hops, subsumption, receivers as ends),
    both directions, in one stacked call: equal to the copy-by-copy plain-torch evaluation."""
    task = _task(native)
    graph = Graph.from_model(native)
    rng = random.Random(0)
    sets = [as_paths(s, graph) for s in HAND_SETS]
    out = _outgoing(graph)
    sets += [frozenset(_random_path(out, rng) for _ in range(rng.randint(1, 4))) for _ in range(8)]  # fmt: skip
    assert any(len(p.edges) >= 3 for s in sets for p in s)
    patcher = PathPatcher(native, task, batch_budget=32)
    tokens = task.prompts
    assert isinstance(tokens, Tensor)
    for d in DIRECTIONS:
        hand_t = _Hand(native.model(d.target))
        src = _Hand(native.model(d.source)).run(tokens)[0]
        got = patcher.run(d, sets)
        want = torch.stack([_metric(task, _hand_paths(hand_t, src, tokens, s)) for s in sets])
        _err("paths = plain torch", got, want, 1e-5)
        clean = patcher.engine.metric_of(d.target)
        moved = (got - clean).abs().amax(-1)
        assert bool((moved > 1e-4).all()), "every set should move the metric"
        # treeified, not the union of edges: set 1's union adds two routes, set 2 is closed
        dag = _metric(task, _hand_dag(hand_t, src, tokens, sets[1]))
        _err("closed set = union DAG", got[2], dag, 1e-5)
        assert float((got[1] - dag).abs().max()) > 1e-4


# --- reference 2: naive hop-by-hop runs through the bridge's own modules -------------------------


def _cache(model: Any, tokens: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return dict(cache.items())


def _head_write(model: Any, layer: int, head: int, z: Tensor) -> Tensor:
    """``z_h @ W_O[h]`` through the model's own output projection (its bias subtracted): layout-
    agnostic (GPT-2's Conv1D stores the transpose of nn.Linear)."""
    d_head = z.shape[-1]
    full = z.new_zeros(*z.shape[:-1], int(model.cfg.n_heads) * d_head)
    full[..., head * d_head : (head + 1) * d_head] = z
    o = model.blocks[layer].attn.o
    with torch.no_grad():
        return o(full) - o(torch.zeros_like(full))


def _write(model: Any, cache: dict[str, Tensor], node: Node) -> Tensor:
    if node.kind == "embed":
        return cache["hook_embed"] + cache.get("hook_pos_embed", torch.zeros(()))
    if node.kind == "mlp":
        return cache[f"blocks.{node.layer}.hook_mlp_out"]
    assert node.layer is not None and node.head is not None
    return _head_write(
        model, node.layer, node.head, cache[f"blocks.{node.layer}.attn.hook_z"][:, :, node.head]
    )


def _naive_paths(pair: md.ModelPair, d: md.Direction, tokens: Tensor, paths: Any) -> Tensor:
    """Logits at the last position: every node copy computed by a full forward of T whose hooks
    *replace* the copy's q/k/v slice (or MLP input) with T's own modules applied to the clean
    residual + the carried changes; paths end at ``logits``."""
    tgt, src = pair.model(d.target), pair.model(d.source)
    d_head, group = int(tgt.cfg.d_head), pair.shape.group_size
    c_t, c_s = _cache(tgt, tokens), _cache(src, tokens)
    full = {p.edges for p in paths}

    def value(suffix: tuple[Edge, ...]) -> Tensor:
        node = suffix[0].sender
        if suffix in full:
            return _write(src, c_s, node)
        into = {p.edges[i - 1] for p in paths for i in range(1, len(p.edges))
                if p.edges[i:] == suffix}  # fmt: skip
        delta: dict[str | None, Tensor] = {}
        for e in into:
            change = value((e, *suffix)) - _write(tgt, c_t, e.sender)
            delta[e.input] = delta.get(e.input, torch.zeros(())) + change
        block = tgt.blocks[node.layer]
        hooks = []
        with torch.no_grad():
            if node.kind == "mlp":
                x = c_t[f"blocks.{node.layer}.ln2.hook_in"] + delta[None]
                hooks.append((f"blocks.{node.layer}.mlp.hook_in", _put(block.ln2(x), None)))
            else:
                assert node.head is not None
                for inp, dx in delta.items():
                    assert inp is not None
                    x = c_t[f"blocks.{node.layer}.ln1.hook_in"] + dx
                    new = getattr(block.attn, inp)(block.ln1(x)).unflatten(-1, (-1, d_head))
                    h = node.head // (1 if inp == "q" else group)
                    hooks.append((f"blocks.{node.layer}.attn.hook_{inp}", _put(new[:, :, h], h)))
            seen: dict[str, Tensor] = {}
            names = [f"blocks.{node.layer}.attn.hook_z", f"blocks.{node.layer}.hook_mlp_out"]
            hooks += [(n, _grab(seen, n)) for n in names]
            tgt.run_with_hooks(tokens, fwd_hooks=hooks)
        return _write(tgt, seen, node)

    final = c_t[f"blocks.{pair.shape.n_layers - 1}.hook_resid_post"].clone()
    for e in {p.edges[-1] for p in paths}:
        assert e.receiver.kind == "logits"
        final = final + value((e,)) - _write(tgt, c_t, e.sender)
    with torch.no_grad():
        return tgt.unembed(tgt.ln_final(final[:, -1:]))[:, 0]


def _put(value: Tensor, head: int | None) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        if head is None:
            return value
        act = act.clone()
        act[:, :, head] = value
        return act

    return hook


def _grab(store: dict[str, Tensor], name: str) -> Any:
    def hook(act: Tensor, hook: Any) -> None:
        store[name] = act

    return hook


def _planted() -> tuple[md.ModelPair, md.Task]:
    entry = md.zoo.load("planted")
    t = entry.task
    assert isinstance(t.prompts, Tensor) and t.answers is not None and t.wrong is not None
    return entry.pair, md.Task(t.prompts[:8], answers=t.answers[:8], wrong=t.wrong[:8])


NAIVE_SETS = {
    "gpt2": [
        ["L0H1 -> L1H2.q -> logits"],
        ["L0H3 -> L1H0.k -> L2H1.v -> logits", "MLP0 -> L1H0.k -> logits", "L2H2 -> logits"],
        ["embed -> MLP0 -> L2H3.q -> logits", "L0H0 -> MLP1 -> logits"],
    ],
    "llama": [["L0H1 -> L1H2.k -> L2H3.q -> logits", "L0H0 -> L1H2.v -> logits"]],
    "neox": [["L0H1 -> MLP1 -> L2H0.k -> logits", "embed -> L1H2.q -> logits"]],
    # only L1H1 and MLP1 differ in the planted pair: changes start there
    "planted": [
        ["L1H1 -> MLP1 -> logits"],
        ["L1H1 -> MLP1 -> logits", "L1H1 -> logits", "embed -> L0H2.v -> MLP0 -> L1H3.k -> logits"],
    ],
}


@pytest.mark.parametrize("name", sorted(NAIVE_SETS))
def test_paths_match_naive_hop_by_hop_runs(name, request) -> None:
    """HF GPT-2, Llama (GQA, rotary), GPT-NeoX (parallel blocks) and the zoo's planted (native)
    pair, both directions: equal
    to naive runs, one full forward per node copy, with the copy's inputs set by T's modules."""
    if name == "planted":
        pair, task = _planted()
    else:
        pair = request.getfixturevalue("hf_pairs")[name]
        task = _task(pair)
    tokens = task.prompts
    assert isinstance(tokens, Tensor)
    graph = Graph.from_model(pair)
    sets = [as_paths(s, graph) for s in NAIVE_SETS[name]]
    patcher = PathPatcher(pair, task)
    for d in DIRECTIONS:
        got = patcher.run(d, sets)
        want = torch.stack([_metric(task, _naive_paths(pair, d, tokens, s)) for s in sets])
        _err(f"paths = naive hop by hop ({name})", got, want, 1e-5)
        moved = (got - patcher.engine.metric_of(d.target)).abs().amax(-1)
        assert bool((moved > 1e-5).all()), "every set should move the metric"


# --- relations to edge patching, batching, the result --------------------------------------------


def test_unchanged_first_sender_is_the_target_run() -> None:
    """In the planted pair only L1H1 and MLP1 differ: paths whose first senders are unchanged
    carry no change at all (T's clean run), whatever they pass through."""
    pair, task = _planted()
    patcher = PathPatcher(pair, task)
    sets = [["L0H1 -> L1H1.q -> MLP1 -> logits", "embed -> MLP0 -> L1H1.k -> logits"]]
    for d in DIRECTIONS:
        _err(
            "unchanged senders = T",
            patcher.run(d, sets)[0],
            patcher.engine.metric_of(d.target),
            1e-6,
        )


def test_single_hops_equal_patch_edges(native, request) -> None:
    """Sets of one-hop paths (into logits and into receivers) = patch_edges of those edges, in
    a native model and HF GPT-2, both directions."""
    for pair, sets in (
        (
            native,
            [
                ["L1H2 -> logits"],
                ["L0H1 -> L1H2.q"],
                ["MLP0 -> L2H1.v", "L1H0 -> logits", "embed -> L0H0.k"],
            ],
        ),
        (request.getfixturevalue("hf_pairs")["gpt2"], [["MLP1 -> logits", "L0H2 -> L2H0.k"]]),
    ):
        task = _task(pair)
        edges = EdgePatcher(pair, task)
        patcher = PathPatcher(pair, task, edges=edges)
        for d in DIRECTIONS:
            got = patcher.run(d, sets)
            want = edges.run(d, sets)
            _err("one-hop paths = patch_edges", got, want, 1e-6)
            assert float((got - edges.engine.metric_of(d.target)).abs().max()) > 1e-4


def test_stacked_equals_one_call_per_set(native) -> None:
    """Many sets stacked in one forward per depth (``path_values``) = one call per set with one
    set per forward (6 prompts, batch budget 6)."""
    task = _task(native)
    sets: list[list[str]] = [*HAND_SETS, []]
    d = DIRECTIONS[1]
    stacked = path_values(native, task, sets, d, batch_budget=64)
    assert stacked.shape == (len(sets), 6)
    single = PathPatcher(native, task, batch_budget=6)
    for i, s in enumerate(sets):
        _err("stacked = one call per set", stacked[i], single.run(d, [s])[0], 1e-6)
    _err("empty set = T", stacked[-1], single.engine.metric_of(d.target), 0)


def test_result_fields_both_directions(native) -> None:
    task = _task(native)
    paths = ["L1H2 -> logits", Path.parse("L0H1 -> L1H2.q -> logits"),
             (Edge.parse("embed -> MLP0"), Edge.parse("MLP0 -> logits"))]  # fmt: skip
    both = patch_paths(native, task, paths, "both", n_boot=N_BOOT)
    assert isinstance(both, BothDirections)
    patcher = PathPatcher(native, task)
    for result, d in zip(both, DIRECTIONS, strict=True):
        assert result.direction is d and result.sites == ()
        assert result.provenance["semantics"] == "path"
        assert result.provenance["paths"] == [
            "embed -> MLP0 -> logits",
            "L0H1 -> L1H2.q -> logits",
            "L1H2 -> logits",
        ]
        _err("patch_paths = run", result.per_prompt, patcher.run(d, [paths])[0], 1e-6)
        lo, hi = result.ci
        assert lo <= result.score <= hi
    empty = patch_paths(native, task, [], "intervened->reference", n_boot=N_BOOT)
    assert isinstance(empty, PatchResult) and abs(empty.score) < 1e-6


def test_patch_edges_paths_is_path_patching(native) -> None:
    task = _task(native)
    paths = ["L1H2 -> logits", "L0H1 -> L1H2.q -> logits"]
    via_edges = md.patch_edges(native, task, paths=paths, n_boot=N_BOOT)
    direct = patch_paths(native, task, paths, n_boot=N_BOOT)
    assert isinstance(via_edges, PatchResult) and isinstance(direct, PatchResult)
    assert torch.equal(via_edges.per_prompt, direct.per_prompt)
    assert via_edges.provenance["semantics"] == "path"
    with pytest.raises(ConfigError, match="not both"):
        md.patch_edges(native, task, ["L1H2 -> logits"], paths=paths)
    with pytest.raises(ConfigError, match="splice-style only"):
        md.patch_edges(native, task, paths=paths, semantics="graft")


def test_path_strings_round_trip() -> None:
    for text in ("L0H3 -> L1H1.k -> logits", "embed -> MLP0 -> L2H0.v", "MLP1 -> logits"):
        p = Path.parse(text)
        assert str(p) == text and Path.parse(str(p)) == p and Path.coerce(p) is p
    p = Path.parse("L0H3 -> L1H1.k -> logits")
    assert p.sender == Node("head", 0, 3) and p.end == "logits"
    assert Path.coerce(["L0H3 -> L1H1.k", "L1H1 -> logits"]) == p
    assert Path.coerce(Edge.parse("MLP1 -> logits")) == Path.parse("MLP1 -> logits")


def test_bad_input_raises_typed_errors(native, request) -> None:
    task = _task(native)
    for bad in ("L9H0 -> logits", "foo -> logits", "L0H0 -> L1H0 -> logits",
                "L0H0 -> L1H0.x -> logits", "L1H0 -> L0H1.q -> logits", "L0H0.q -> logits",
                "L0H0 -> logits -> MLP1", "L0H0 ->", "L0H0", "L1H0 -> MLP0 -> logits",
                "L0H0 -> L1H0.q -> L1H1.k -> logits"):  # fmt: skip
        with pytest.raises(SiteError):
            patch_paths(native, task, [bad], n_boot=N_BOOT)
    with pytest.raises(SiteError, match="not connected"):
        Path((Edge.parse("L0H0 -> L1H0.q"), Edge.parse("L0H1 -> logits")))
    with pytest.raises(SiteError):
        Path(())
    with pytest.raises(SiteError):
        patch_paths(native, task, [3], n_boot=N_BOOT)
    with pytest.raises(ConfigError):
        patch_paths(native, task, ["L0H0 -> logits"], direction="sideways", n_boot=N_BOOT)
    patcher = PathPatcher(native, task)
    with pytest.raises(ConfigError):
        patcher.run("both", [["L0H0 -> logits"]])
    with pytest.raises(SiteError, match="sets"):
        patcher.run(DIRECTIONS[0], "L0H0 -> logits")  # type: ignore[arg-type]
    llama = request.getfixturevalue("hf_pairs")["llama"]
    with pytest.raises(SiteError, match="first"):
        patch_paths(llama, _task(llama), ["L0H0 -> L1H1.k -> logits"], n_boot=N_BOOT)


def test_report_errors() -> None:
    """Runs last (file order): prints what the comparisons measured (visible with ``-s``)."""
    for key, value in sorted(ERRORS.items()):
        print(f"{key}: {value:.3g}")
