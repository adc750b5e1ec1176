"""compare_circuits (issue 17): overlap of two circuits, checked against hand-computed values on
hand-built Circuit objects (no model runs)."""

from __future__ import annotations

import math

import pytest
import torch

from mechdelta import ConfigError, Direction
from mechdelta.circuits import (
    Circuit,
    CircuitComparison,
    CircuitComparisonWarning,
    circuit_membership,
    compare_circuits,
)
from mechdelta.circuits.compare import spearman
from mechdelta.core.graph import Edge, Node
from mechdelta.patching.shift import ShiftResult
from mechdelta.plotting import comparison_figure, membership_figure

I2R = Direction.INTERVENED_TO_REFERENCE
SHIFT = ShiftResult(
    "loss", torch.tensor([2.0, 2.2, 1.8]), torch.tensor([1.0, 1.1, 0.9]), (-1.2, -0.8)
)


def node_circuit(
    names: list[str], minimality: list[float], *, semantics: str = "graft", direction=I2R
) -> Circuit:
    nodes = tuple(Node("logits") if n == "unembed" else Node.parse(n) for n in names)
    return Circuit(
        nodes=nodes,
        edges=(),
        level="node",
        semantics=semantics,
        direction=direction,
        method="greedy",
        target=0.9,
        per_prompt=torch.tensor([1.9, 2.1, 1.7]),
        shift=SHIFT,
        curve=((0, 0.0), (len(nodes), 0.95)),
        minimality=tuple(minimality),
        reached=True,
    )


def edge_circuit(edges: list[str], minimality: list[float]) -> Circuit:
    es = tuple(Edge.parse(e) for e in edges)
    nodes: dict[Node, None] = {}
    for e in es:
        nodes[e.sender] = nodes[e.receiver] = None
    return Circuit(
        nodes=tuple(nodes), edges=es, level="edge", semantics="splice", direction=I2R,
        method="acdc", target=0.9, per_prompt=torch.tensor([1.9, 2.1, 1.7]), shift=SHIFT,
        curve=((len(es), 0.95),), minimality=tuple(minimality), reached=True,
    )  # fmt: skip


A = node_circuit(["L0H1", "L0H3", "L1H0", "L1H2"], [0.4, 0.3, 0.2, 0.1])
B = node_circuit(["L0H3", "L1H0", "L1H2", "L1H3", "unembed"], [0.1, 0.5, 0.2, 0.1, 0.1])


def test_node_level_values_equal_hand_computed():
    c = compare_circuits(A, B, labels=("step 400", "step 1500"))
    assert isinstance(c, CircuitComparison)
    # shared {L0H3, L1H0, L1H2} = 3, union 6
    assert c.node_jaccard == pytest.approx(3 / 6)
    assert math.isnan(c.edge_jaccard)
    assert c.shared == ("L0H3", "L1H0", "L1H2")
    assert c.lost == ("L0H1",)
    assert c.gained == ("L1H3", "unembed")
    # shares: A = minimality / 1.0; B = minimality / 1.0 -> sum of min over shared members
    assert c.weighted_by == ("minimality", "minimality")
    assert c.weighted_overlap == pytest.approx(min(0.3, 0.1) + min(0.2, 0.5) + min(0.1, 0.2))
    # Spearman of (0.3, 0.2, 0.1) vs (0.1, 0.5, 0.2): ranks (3, 2, 1) vs (1, 3, 2) -> rho = -0.5
    assert c.rank_correlation == pytest.approx(-0.5)
    df = c.to_dataframe()
    assert df["member"].tolist() == ["L0H3", "L1H0", "L1H2", "L0H1", "L1H3", "unembed"]
    assert df["status"].tolist() == ["both", "both", "both", "lost", "gained", "gained"]
    assert df["share_a"].sum() == pytest.approx(1.0) and df["share_b"].sum() == pytest.approx(1.0)
    text = str(c)
    assert "node Jaccard 0.500" in text and "gained, only in step 1500 (2): L1H3, unembed" in text


def test_identical_circuits_overlap_fully_and_disjoint_ones_not_at_all():
    same = compare_circuits(A, A)
    assert same.node_jaccard == 1.0 and same.weighted_overlap == pytest.approx(1.0)
    assert same.rank_correlation == pytest.approx(1.0) and not same.gained and not same.lost
    other = node_circuit(["MLP0", "L1H1"], [0.5, 0.5])
    apart = compare_circuits(A, other)
    assert apart.node_jaccard == 0.0 and apart.weighted_overlap == 0.0
    assert math.isnan(apart.rank_correlation)  # no shared members


def test_not_finite_minimality_falls_back_to_uniform_shares():
    unreached = node_circuit(["L0H3", "L1H0"], [math.nan, math.nan])
    c = compare_circuits(A, unreached)
    assert c.weighted_by == ("minimality", "uniform")
    assert c.weighted_overlap == pytest.approx(min(0.3, 0.5) + min(0.2, 0.5))
    assert math.isnan(c.rank_correlation)


def test_edge_level_values_equal_hand_computed():
    a = edge_circuit(["L0H3->L1H0.k", "L1H0->logits", "L1H2->logits"], [0.5, 0.3, 0.2])
    b = edge_circuit(["L0H3->L1H0.k", "L0H3->L1H1.k", "L1H0->logits"], [0.2, 0.2, 0.6])
    c = compare_circuits(a, b)
    assert c.edge_jaccard == pytest.approx(2 / 4)
    # nodes a {L0H3, L1H0, logits, L1H2}, b {L0H3, L1H0, L1H1, logits}: 3 shared of 5
    assert c.node_jaccard == pytest.approx(3 / 5)
    assert c.weighted_overlap == pytest.approx(0.2 + 0.3)
    assert c.rank_correlation == pytest.approx(-1.0)
    assert c.gained == ("L0H3 -> L1H1.k",) and c.lost == ("L1H2 -> logits",)


def test_spearman_handles_ties_like_average_ranks():
    # ranks x (1, 2.5, 2.5, 4), y (1, 2, 3, 4): pearson of the ranks
    x, y = [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    rx, ry = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 2, 3, 4])
    expected = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert spearman(x, y) == pytest.approx(expected)
    assert math.isnan(spearman([1.0], [2.0])) and math.isnan(spearman([1.0, 1.0], [1.0, 2.0]))


def test_different_levels_raise_and_different_semantics_warn():
    e = edge_circuit(["L1H0->logits"], [1.0])
    with pytest.raises(ConfigError, match="node-level circuit with a edge-level"):
        compare_circuits(A, e)
    spliced = node_circuit(["L0H3"], [1.0], semantics="splice")
    with pytest.warns(CircuitComparisonWarning, match="graft .* splice"):
        c = compare_circuits(A, spliced)
    assert c.node_jaccard == pytest.approx(1 / 4)
    other_way = node_circuit(["L0H3"], [1.0], direction=Direction.REFERENCE_TO_INTERVENED)
    with pytest.warns(CircuitComparisonWarning):
        compare_circuits(A, other_way)


def test_membership_table_and_figures_are_deterministic():
    table = circuit_membership({400: A, 1500: B})
    assert list(table.columns) == [400, 1500]
    assert list(table.index) == ["L0H1", "L0H3", "L1H0", "L1H2", "L1H3", "unembed"]
    assert table[400].tolist() == [1, 1, 1, 1, 0, 0] and table[1500].tolist() == [0, 1, 1, 1, 1, 1]
    mini = circuit_membership({400: A, 1500: B}, "minimality")
    assert mini.loc["L1H0", 1500] == 0.5 and math.isnan(mini.loc["L0H1", 1500])
    f1, f2 = membership_figure({400: A, 1500: B}), membership_figure({400: A, 1500: B})
    assert f1.to_json() == f2.to_json()
    assert [list(r) for r in f1.data[0].z] == [[1, 0], [1, 1], [1, 1], [1, 1], [0, 1], [0, 1]]
    c = compare_circuits(A, B)
    g1, g2 = c.figure(), comparison_figure(compare_circuits(A, B))
    assert g1.to_json() == g2.to_json()
    assert [t.name for t in g1.data] == ["a", "b"]
    assert list(g1.data[0].y) == pytest.approx([0.3, 0.2, 0.1, 0.4, 0.0, 0.0])
    with pytest.raises(ConfigError, match="different levels"):
        circuit_membership({1: A, 2: edge_circuit(["L1H0->logits"], [1.0])})
