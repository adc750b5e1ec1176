"""The graph vocabulary: nodes, edges, parsing, upstream rules, GQA convention."""

from __future__ import annotations

import pytest

from mechdelta.core.graph import Edge, Graph, Node, feeds, graph_edges, graph_nodes, is_parallel
from mechdelta.core.sites import ModelShape
from mechdelta.errors import MechDeltaError, SiteError

SHAPE = ModelShape(n_layers=3, n_heads=4, n_kv_heads=4, d_mlp=16, n_ctx=8)
GQA = ModelShape(n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=16, n_ctx=8)
ATTN_ONLY = ModelShape(n_layers=2, n_heads=2, n_kv_heads=2, d_mlp=None, n_ctx=8)


@pytest.mark.parametrize("text", ["L0H3 -> L1H1.k", "MLP0 -> L2H0.v", "L1H2 -> logits",
                                  "embed -> L0H1.q", "L1H0 -> MLP1", "embed -> logits"])  # fmt: skip
def test_edge_str_parse_round_trip(text: str) -> None:
    edge = Edge.parse(text)
    assert str(edge) == text
    assert Edge.parse(str(edge)) == edge
    assert hash(edge) == hash(Edge.parse(text))


@pytest.mark.parametrize("text", ["embed", "L1H2", "MLP0", "logits"])
def test_node_str_parse_round_trip(text: str) -> None:
    assert str(Node.parse(text)) == text


def test_edge_fields_and_receiver_input() -> None:
    edge = Edge.parse("L0H3 -> L1H1.k")
    assert edge.sender == Node("head", 0, 3)
    assert edge.receiver == Node("head", 1, 1)
    assert edge.input == "k"
    assert edge.receiver_input == "L1H1.k"
    with pytest.raises(AttributeError):
        edge.input = "q"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "L1H0 -> L0H1.q",  # receiver before sender
        "L1H0 -> L1H1.q",  # same layer head -> head
        "MLP1 -> L1H0.q",  # an MLP does not feed its own layer's heads
        "MLP1 -> MLP1",
        "logits -> L1H0.q",
        "L0H0 -> embed",
        "L0H0 -> L1H1",  # a head receiver needs q/k/v
        "L0H0 -> MLP1.q",  # an MLP has one input
        "L0H0 -> L1H1.x",
        "L0X0 -> logits",
        "L0H0 logits",
    ],
)
def test_bad_edges_raise_site_error(text: str) -> None:
    with pytest.raises(SiteError) as info:
        Edge.parse(text)
    assert isinstance(info.value, MechDeltaError)
    assert str(info.value)


def test_node_validation() -> None:
    with pytest.raises(SiteError, match="unknown node"):
        Node.parse("attn3")
    with pytest.raises(SiteError):
        Node("head", 1)
    with pytest.raises(SiteError):
        Node("mlp", 1, 2)
    with pytest.raises(SiteError):
        Node("tokens")
    with pytest.raises(SiteError, match="n_layers"):
        Node.parse("L3H0").validate(SHAPE)
    with pytest.raises(SiteError, match="attention-only"):
        Node.parse("MLP0").validate(ATTN_ONLY)


def test_upstream_rules_sequential_and_parallel() -> None:
    h, mlp = Node.parse("L1H0"), Node.parse("MLP1")
    assert feeds(h, mlp, parallel=False)
    assert not feeds(h, mlp, parallel=True)
    assert feeds(Node.parse("L0H0"), mlp, parallel=True)
    edge = Edge(h, mlp)
    edge.validate(SHAPE, parallel=False)
    with pytest.raises(SiteError, match="parallel"):
        edge.validate(SHAPE, parallel=True)


def test_gqa_convention() -> None:
    Edge.parse("L0H1 -> L1H2.k").validate(GQA)
    Edge.parse("L0H1 -> L1H3.q").validate(GQA)
    with pytest.raises(SiteError, match="L1H2.v"):
        Edge.parse("L0H1 -> L1H3.v").validate(GQA)
    edges = {str(e) for e in graph_edges(GQA)}
    assert "embed -> L1H2.k" in edges and "embed -> L1H3.k" not in edges
    assert "embed -> L1H3.q" in edges


def _count(shape: ModelShape, parallel: bool) -> int:
    n_heads, n_kv, n_layers = shape.n_heads, shape.n_kv_heads, shape.n_layers
    mlp = shape.d_mlp is not None
    per_layer = n_heads + mlp
    total = 0
    for layer in range(n_layers):
        upstream = 1 + layer * per_layer
        total += upstream * (n_heads + 2 * n_kv)
        if mlp:
            total += upstream + (0 if parallel else n_heads)
    return total + 1 + n_layers * per_layer  # + logits


@pytest.mark.parametrize("shape", [SHAPE, GQA, ATTN_ONLY])
@pytest.mark.parametrize("parallel", [False, True])
def test_graph_edges_complete_and_valid(shape: ModelShape, parallel: bool) -> None:
    edges = graph_edges(shape, parallel=parallel)
    assert len(edges) == len(set(edges)) == _count(shape, parallel)
    order = {n: i for i, n in enumerate(graph_nodes(shape))}
    for e in edges:
        e.validate(shape, parallel=parallel)
        assert order[e.sender] < order[e.receiver]
        assert Edge.parse(str(e)) == e
    graph = Graph(shape, parallel)
    assert graph.edges == edges and len(graph) == len(edges)
    assert sum(len(graph.incoming(r)) for r in graph.receiver_inputs) == len(edges)
    assert graph.receiver_inputs[-1] == "logits"
    with pytest.raises(SiteError):
        graph.incoming("L9H0.q")


def test_graph_nodes_order() -> None:
    names = [str(n) for n in graph_nodes(SHAPE)]
    assert names[:6] == ["embed", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0"]
    assert names[-1] == "logits"
    assert [str(n) for n in graph_nodes(ATTN_ONLY)] == [
        "embed", "L0H0", "L0H1", "L1H0", "L1H1", "logits",
    ]  # fmt: skip


def test_is_parallel_reads_cfg(hf_pairs) -> None:
    assert is_parallel(hf_pairs["neox"].reference)
    assert not is_parallel(hf_pairs["gpt2"].reference)
    assert not is_parallel(hf_pairs["llama"])
    graph = Graph.from_model(hf_pairs["llama"])
    assert graph.shape.group_size == 2 and not graph.parallel
