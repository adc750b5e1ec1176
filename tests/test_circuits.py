"""search_circuit / Circuit (issue 17): node and edge circuits across two checkpoints, checked
against independent graft / patch / patch_edges calls on pairs whose answer is known."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mechdelta as md
from mechdelta import ConfigError, Direction
from mechdelta.circuits import Circuit, CircuitNotFaithfulWarning, search_circuit
from mechdelta.circuits._evaluate import Evaluator, node_site
from mechdelta.core.graph import Edge, Graph, Node
from tests import _builders
from tests._reference import N_BOOT, contrast_task, random_tokens

I2R, R2I = "intervened->reference", "reference->intervened"
CHANGED = ((0, 1), (2, 3))  # the two heads the two-head pair differs in
METHODS = ("greedy", "acdc", "attribution")


def _score(semantics: str, pair, task, members, direction=I2R) -> float:
    """An independent exact evaluation of a node circuit (graft / patch) or edge circuit."""
    members = list(members)
    edges = any(isinstance(m, Edge) or "->" in str(m) for m in members)
    if semantics == "graft" and not edges:
        res = md.graft(pair, task, members, direction, n_boot=N_BOOT)
    elif semantics == "splice" and not edges:
        res = md.patch(pair, task, [str(m) for m in members], direction, n_boot=N_BOOT)
    else:
        res = md.patch_edges(pair, task, members, direction, semantics=semantics, n_boot=N_BOOT)
    assert isinstance(res, md.PatchResult)
    return res.score


@pytest.fixture(scope="module")
def two_head():
    """A 3-layer native pair differing only in heads L0H1 and L2H3 (their Q/K/V/O slices)."""
    ref = _builders.native_bridge(0)
    itv = copy.deepcopy(ref)
    d_head = int(ref.cfg.d_head)
    with torch.no_grad():
        sd, i = itv.state_dict(), 0
        for layer, head in CHANGED:
            rows = slice(head * d_head, (head + 1) * d_head)
            for key in [f"blocks.{layer}.attn.{p}.{w}" for p in "qkv" for w in ("weight", "bias")]:
                if key in sd:
                    t = sd[key][rows]
                    t += 2.0 * float(sd[key].std()) * torch.randn(t.shape, generator=_gen(i))
                    i += 1
            w_o = sd[f"blocks.{layer}.attn.o.weight"][:, rows]  # nn.Linear [out, in]
            w_o += 2.0 * float(w_o.std()) * torch.randn(w_o.shape, generator=_gen(i))
            i += 1
    pair = md.ModelPair(ref, itv)
    task = contrast_task(pair, random_tokens(8, 6, int(pair.cfg.d_vocab), seed=7))
    return pair, task


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def induction():
    return md.zoo.load("induction")


@pytest.fixture(scope="module")
def planted():
    entry = md.zoo.load("planted")
    return entry.pair, entry.tasks["trigger"]


# --- the two-head pair ---------------------------------------------------------------------------


def test_the_two_head_pair_needs_both_heads(two_head):
    pair, task = two_head
    for semantics in ("graft", "splice"):
        assert _score(semantics, pair, task, ["L0H1", "L2H3"]) == pytest.approx(1.0, abs=1e-5)
        for head in ("L0H1", "L2H3"):  # each pushes the answer, neither suffices
            assert 0.05 < _score(semantics, pair, task, [head]) < 0.95


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("semantics", ["graft", "splice"])
def test_node_search_finds_exactly_the_two_changed_heads(two_head, semantics, method):
    pair, task = two_head
    c = search_circuit(pair, task, method=method, semantics=semantics, target=0.99)
    assert c.names == ("L0H1", "L2H3")
    assert c.reached and c.level == "node" and c.edges == ()
    assert c.faithfulness == pytest.approx(_score(semantics, pair, task, c.nodes), abs=1e-6)
    assert c.faithfulness_per_prompt == pytest.approx(1.0, abs=1e-5)
    # minimality: f(C) - f(C - m), re-evaluated exactly
    for node, loss in zip(c.nodes, c.minimality, strict=True):
        rest = [n for n in c.nodes if n != node]
        assert loss == pytest.approx(c.faithfulness - _score(semantics, pair, task, rest), abs=1e-5)
    assert c.provenance["n_exact"] > 0 and c.provenance["timings"]["total_s"] > 0


def test_node_search_the_other_way(two_head):
    pair, task = two_head
    c = search_circuit(pair, task, method="acdc", direction=R2I, semantics="graft", target=0.99)
    assert c.names == ("L0H1", "L2H3") and c.direction is Direction.REFERENCE_TO_INTERVENED


# --- the planted zoo pair ------------------------------------------------------------------------


def test_planted_graft_circuit_is_the_planted_head_and_mlp(planted):
    pair, task = planted
    truth = ["L1H1", "L1.mlp_out"]
    assert _score("graft", pair, task, truth) == pytest.approx(1.0, abs=1e-5)
    for one in truth:  # neither alone reaches 0.9: both are needed
        assert _score("graft", pair, task, [one]) < 0.9
    for method in METHODS:
        c = search_circuit(pair, task, method=method, semantics="graft", target=0.9)
        assert set(c.names) == {"L1H1", "MLP1"}, method


def test_planted_splice_circuit_is_the_mlp_alone(planted):
    """Under splice the MLP's source write already carries L1H1's effect (it reads L1H1)."""
    pair, task = planted
    assert _score("splice", pair, task, ["L1.mlp_out"]) >= 0.9
    c = search_circuit(pair, task, method="attribution", semantics="splice", target=0.9)
    assert c.names == ("MLP1",)
    assert c.provenance["ranking"].startswith("atp")


# --- the induction pair, edge level ---------------------------------------------------------------


def _k_edges(edges) -> list[Edge]:
    return [
        e for e in edges if str(e.sender) == "L0H3" and e.receiver.layer == 1 and e.input == "k"
    ]


def test_induction_splice_reference_to_intervened_needs_l0h3_k_composition(induction):
    pair, task = induction.pair, induction.task
    c = search_circuit(pair, task, level="edge", method="attribution", direction=R2I,
                       semantics="splice", target=0.9)  # fmt: skip
    assert c.reached and 0.9 <= c.faithfulness <= 1.1
    assert c.faithfulness == pytest.approx(_score("splice", pair, task, c.edges, R2I), abs=1e-5)
    k = _k_edges(c.edges)
    assert k, c.names
    without = [e for e in c.edges if e not in k]
    assert _score("splice", pair, task, without, R2I) < 0.9
    curve_sizes = [s for s, _ in c.curve]
    assert curve_sizes == sorted(set(curve_sizes)) and curve_sizes[0] == 0


def test_induction_splice_intervened_to_reference_reports_its_ceiling(induction):
    pair, task = induction.pair, induction.task
    with pytest.warns(CircuitNotFaithfulWarning, match="full graph"):
        c = search_circuit(pair, task, level="edge", direction=I2R, semantics="splice",
                           target=0.9, max_size=6)  # fmt: skip
    assert not c.reached and len(c) <= 6
    full = _score("splice", pair, task, Graph.from_model(pair).edges, I2R)
    assert c.ceiling == pytest.approx(full, abs=1e-5)
    assert full < 0.9  # T's final norm + unembedding run: the splice ceiling
    assert all(math.isnan(x) for x in c.minimality)


def test_induction_ablate_circuit_needs_l0h3_k_composition(induction):
    task = induction.task
    sub = md.Task(task.prompts[:8], metric="loss", loss_mask=task.loss_mask[:8], name="sub")
    pair = induction.pair
    c = search_circuit(pair, sub, level="edge", direction=I2R, semantics="ablate", target=0.9)
    assert c.reached
    assert c.faithfulness == pytest.approx(_score("ablate", pair, sub, c.edges), abs=1e-5)
    k = _k_edges(c.edges)
    assert len(k) >= 3, c.names
    assert _score("ablate", pair, sub, [e for e in c.edges if e not in k]) < 0.5
    assert min(c.minimality) >= -1e-6 or c.faithfulness > 1  # pruned: every member is needed


def test_induction_graft_reference_to_intervened_needs_l0h3_k_composition(induction):
    """Edge-level graft, reference->intervened: a small circuit with ``L0H3 -> L1Hx.k`` (the
    issue's independent implementation: 6 edges incl. ``L0H3 -> L1H1.k``), which dropping the
    k edges breaks; the ranking is the graft first-order estimate."""
    task = induction.task
    sub = md.Task(task.prompts[:8], metric="loss", loss_mask=task.loss_mask[:8], name="sub")
    pair = induction.pair
    c = search_circuit(pair, sub, level="edge", direction=R2I, semantics="graft", target=0.9)
    assert c.reached and c.semantics == "graft"
    assert c.provenance["ranking"].startswith("graft first order")
    assert c.faithfulness == pytest.approx(_score("graft", pair, sub, c.members, R2I), abs=1e-5)
    k = _k_edges(c.edges)
    assert k, c.names
    assert _score("graft", pair, sub, [m for m in c.members if m not in k], R2I) < 0.9


def test_induction_graft_intervened_to_reference_needs_the_k_composition_edges(induction):
    """Edge-level graft, intervened->reference: the search itself costs minutes here (39 members
    with all four ``L0H3 -> L1Hx.k`` and ``unembed``, faithfulness 0.90 on the whole task:
    ``benchmarks/bench_circuits.py --induction-graft-i2r``), so this checks its claim on the full
    graph: every edge + ``unembed`` grafted reaches the target, and the same graph without the
    ``L0H3 -> L1Hx.k`` edges loses most of the shift."""
    task = induction.task
    sub = md.Task(task.prompts[:8], metric="loss", loss_mask=task.loss_mask[:8], name="sub")
    pair = induction.pair
    full = [*Graph.from_model(pair).edges, "unembed"]
    assert _score("graft", pair, sub, full) >= 0.9
    k = _k_edges([m for m in full if isinstance(m, Edge)])
    assert len(k) == 4
    assert _score("graft", pair, sub, [m for m in full if m not in k]) < 0.5


# --- the Circuit object ----------------------------------------------------------------------------


def test_circuit_round_trip_dataframe_figure_and_str(two_head, tmp_path):
    pair, task = two_head
    c = search_circuit(pair, task, method="greedy", semantics="graft", target=0.99)
    c.save(tmp_path / "c")
    back = Circuit.load(tmp_path / "c")
    assert back.names == c.names and back.minimality == c.minimality
    assert back.curve == c.curve and back.faithfulness == c.faithfulness
    assert back.direction is c.direction and back.reached and back.provenance == c.provenance
    assert torch.equal(back.shift.reference, c.shift.reference)
    df = c.to_dataframe()
    assert list(df["member"]) == ["L0H1", "L2H3"]
    assert df["minimality"].tolist() == list(c.minimality)
    assert len(c.figure().data) >= 1
    assert "L0H1" in str(c) and "reaches target 0.99" in str(c)
    assert 0 < c.curve_area <= 1.0
    sizes = [s for s, _ in c.curve]
    assert sizes == sorted(set(sizes))


def test_edge_circuit_round_trip_and_figure(planted, tmp_path):
    pair, task = planted
    c = search_circuit(pair, task, level="edge", semantics="splice", target=0.8)
    assert c.reached
    c.save(tmp_path / "e")
    back = Circuit.load(tmp_path / "e")
    assert back.edges == c.edges and back.nodes == c.nodes
    fig = back.figure()
    assert len(fig.data) == len(c.edges) + 1
    assert set(back.to_dataframe()["member"]) == {str(e) for e in c.edges}


def test_edge_graft_circuit_holds_unembed_round_trip_and_figure(tmp_path):
    """A pair differing in one head and the final norm + unembedding: the edge-level graft
    circuit needs the pseudo-member ``unembed``; it survives save / load, the data frame, the
    figure, and the faithfulness equals an independent patch_edges graft of the members."""

    def perturb(m):
        sd = m.state_dict()
        for i, key in enumerate(["unembed.weight", "ln_final.weight", "blocks.1.attn.v.weight"]):
            t = sd[key] if key != "blocks.1.attn.v.weight" else sd[key][16:32]
            t += 1.5 * float(t.std() + 0.1) * torch.randn(t.shape, generator=_gen(20 + i))

    pair = md.ModelPair(*_builders.native_pair(perturb))
    task = contrast_task(pair, random_tokens(6, 6, int(pair.cfg.d_vocab), seed=3))
    c = search_circuit(pair, task, level="edge", semantics="graft", method="greedy", target=0.9)
    assert c.reached and c.unembed and c.members[-1] == Node("logits")
    assert c.names[-1] == "unembed" and len(c.minimality) == len(c.members)
    assert c.faithfulness == pytest.approx(_score("graft", pair, task, c.members), abs=1e-5)
    assert c.faithfulness == pytest.approx(_score("graft", pair, task, c.names), abs=1e-5)
    c.save(tmp_path / "g")
    back = Circuit.load(tmp_path / "g")
    assert back.unembed and back.members == c.members and back.names == c.names
    assert back.minimality == c.minimality
    df = back.to_dataframe()
    assert df["member"].tolist()[-1] == "unembed" and df["kind"].tolist()[-1] == "unembed"
    fig = back.figure()
    assert "unembed" in [t for tr in fig.data if tr.text is not None for t in tr.text]
    assert "unembed" in str(back)


def test_unembed_is_a_graft_node(planted, tmp_path):
    pair, task = planted
    c = search_circuit(pair, task, method="greedy", semantics="graft", target=0.9)
    assert Node("logits") not in c.nodes  # unchanged in the planted pair: never needed
    assert c.provenance["n_members"] == len(Graph.from_model(pair).nodes)  # + unembed - logits


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"level": "edge", "semantics": "graf"}, "'ablate' or 'graft'"),
        ({"level": "node", "semantics": "ablate"}, "available at level='edge'"),
        ({"method": "beam"}, "attribution, acdc, greedy"),
        ({"level": "path"}, "node, edge"),
        ({"direction": "both"}, "one direction"),
        ({"max_size": 0}, "max_size"),
    ],
)
def test_bad_searches_are_config_errors(two_head, kwargs, match):
    pair, task = two_head
    with pytest.raises(ConfigError, match=match):
        search_circuit(pair, task, **kwargs)


# --- attribution growth: predicted first prefix, exact checks, early stop --------------------------


def _old_walk(pair, task, c, level: str, semantics: str, target: float) -> tuple[set, int]:
    """The exhaustive growth this search replaced, on a fresh evaluator: the prefixes of the
    circuit's ranking in order (node level: all at once; edge level: stacked chunks of 8, 16,
    ...) up to the first that reaches the target, then the old pruning (latest-added first,
    then drop-one rounds). Returns the circuit and its number of exact runs."""
    ev = Evaluator(pair, task, level=level, semantics=semantics, direction=Direction.coerce(I2R),
                   batch_budget=None, progress=False)  # fmt: skip
    by_name = {str(m): m for m in ev.members}
    order = [by_name[k] for k in c.provenance["estimates"]]
    assert len(order) == len(ev.members)

    def reaches(f: float) -> bool:
        return target - 1e-9 <= f <= 2 - target + 1e-9

    done, chunk, first = 0, 8 if level == "edge" else len(order), None
    while first is None:  # the old walk: prefixes in stacked chunks (edge: 8, 16, ...)
        sizes = list(range(done + 1, min(len(order), done + chunk) + 1))
        fs = ev.faithfulness([order[:k] for k in sizes])
        first = next((k for k, f in zip(sizes, fs, strict=True) if reaches(f)), None)
        done, chunk = sizes[-1], 2 * chunk
    circuit = order[:first]
    for x in reversed(list(circuit)):
        trial = [y for y in circuit if y != x]
        if reaches(ev.faithfulness([trial])[0]):
            circuit = trial
    while True:
        drops = ev.faithfulness([[y for y in circuit if y != x] for x in circuit])
        ok = [i for i, g in enumerate(drops) if reaches(g)]
        if not ok:
            return set(circuit), ev.n_exact
        del circuit[min(ok, key=lambda i: abs(drops[i] - 1))]


@pytest.mark.parametrize(
    ("fixture", "level", "semantics", "target"),
    [
        ("two_head", "node", "graft", 0.99),
        ("two_head", "node", "splice", 0.99),
        ("planted", "node", "graft", 0.9),
        ("planted", "edge", "splice", 0.8),
        ("planted", "edge", "ablate", 0.9),
    ],
)
def test_growth_returns_the_exhaustive_walks_circuit_with_fewer_runs(
    request, fixture, level, semantics, target
):
    pair, task = request.getfixturevalue(fixture)
    c = search_circuit(pair, task, level=level, semantics=semantics, target=target)
    assert c.reached
    old, n_old = _old_walk(pair, task, c, level, semantics, target)
    assert set(c.members) == old
    assert c.provenance["n_exact"] < n_old, (c.provenance["n_exact"], n_old)
    # the curve holds exact evaluations only: each point is the prefix's exact faithfulness
    order = list(c.provenance["estimates"])
    k0 = c.provenance["growth"]["predicted_first"]
    assert 1 <= k0 <= len(order)
    assert c.curve[0][0] == 0 and c.curve[0][1] == pytest.approx(0.0, abs=1e-5)
    ev = Evaluator(pair, task, level=level, semantics=semantics, direction=Direction.coerce(I2R),
                   batch_budget=None, progress=False)  # fmt: skip
    by_name = {str(m): m for m in ev.members}
    sizes = [s for s, _ in c.curve]
    exact = ev.faithfulness([[by_name[n] for n in order[:s]] for s in sizes])
    assert [f for _, f in c.curve] == pytest.approx(exact, abs=1e-6)


def test_full_graph_below_target_stops_growth_after_o1_runs():
    """A pair whose final norm + unembedding changed: under splice the target's unembedding
    always runs, so even the full graph carries little of the shift. Growth evaluates the
    empty circuit, the predicted first prefix (and at edge level the one before it, stacked)
    and the full graph, then stops: not reached, the full graph returned, its ceiling."""

    def perturb(m):
        sd = m.state_dict()
        for i, key in enumerate(["unembed.weight", "ln_final.weight", "blocks.1.attn.v.weight"]):
            t = sd[key] if key != "blocks.1.attn.v.weight" else sd[key][16:32]
            t += 1.5 * float(t.std() + 0.1) * torch.randn(t.shape, generator=_gen(20 + i))

    pair = md.ModelPair(*_builders.native_pair(perturb))
    task = contrast_task(pair, random_tokens(6, 6, int(pair.cfg.d_vocab), seed=3))
    for level, rank_runs in (("node", 1), ("edge", 0)):  # node splice ranks embed exactly
        with pytest.warns(CircuitNotFaithfulWarning, match="full graph"):
            c = search_circuit(pair, task, level=level, semantics="splice", target=0.9)
        n = c.provenance["n_members"]
        assert not c.reached and len(c) == n
        assert c.provenance["growth"]["stopped"] == "the full graph is below the target"
        assert c.provenance["n_exact_search"] <= rank_runs + 4  # old walk: all n prefixes
        assert len(c.curve) <= 4 and c.curve[-1][0] == n
        members = c.members if level == "edge" else [node_site(n) for n in c.nodes]
        full = _score("splice", pair, task, members)
        assert c.ceiling == pytest.approx(full, abs=1e-5) and full < 0.9
        assert c.curve[-1][1] == pytest.approx(full, abs=1e-5)


class _Fake(Evaluator):
    """An evaluator stand-in whose faithfulness of a circuit depends only on its size."""

    def __init__(self, f_of_size, n: int, level: str = "edge", semantics: str = "splice"):
        self.members = tuple(Node("head", 0, i) for i in range(n))
        self.level, self.semantics, self.f_of_size = level, semantics, f_of_size
        self.runs: list[int] = []

    def faithfulness(self, circuits) -> list[float]:
        sizes = [len(list(c)) for c in circuits]
        self.runs += sizes
        return [self.f_of_size(s) for s in sizes]


def _grow(fake: _Fake, pred, target: float = 0.9, max_size=None):
    from mechdelta.circuits.search import _Search

    s = _Search(fake, target, max_size)
    found = s.grow(list(fake.members), pred)
    return (None if found is None else len(found)), s


@pytest.mark.parametrize("guess", [1, 5, 37, 38, 60, 100])
def test_growth_finds_the_first_reaching_prefix_from_any_guess(guess):
    n, first = 100, 37
    pred = [0.0] * guess + [0.95] * (n + 1 - guess)  # predicted to reach from size `guess`
    size, s = _grow(_Fake(lambda k: min(1.0, k / first * 0.9), n), pred)
    assert size == first
    assert s.growth["predicted_first"] == guess
    assert len(s.curve) <= 2 * math.ceil(math.log2(n)) + 4  # the old walk: all 100 prefixes
    assert all(s.curve[k] == pytest.approx(min(1.0, k / first * 0.9)) for k in s.curve)


def test_growth_walks_on_past_an_overshooting_boundary_and_respects_max_size():
    # f jumps from 0.5 to 1.5 at size 10 (overshoot), and comes back into [0.9, 1.1] at 30
    def f(k: int) -> float:
        return 0.5 if k < 10 else (1.5 if k < 30 else 1.0)

    pred = [min(1.0, k / 10) for k in range(51)]
    size, s = _grow(_Fake(f, 50), pred)
    assert size == 30 and s.growth["walked_from"] == 11
    size, s = _grow(_Fake(f, 50), pred, max_size=20)
    assert size is None and max(s.curve) <= 50
    assert s.best is not None and len(s.best) <= 20


def test_growth_stops_when_the_full_graph_is_below_target():
    fake = _Fake(lambda k: 0.6 * k / 200, 200)
    size, s = _grow(fake, [k / 100 for k in range(201)])
    assert size is None and s.growth["stopped"] == "the full graph is below the target"
    assert sorted(fake.runs) == [0, 89, 90, 200]  # empty, guess - 1 and guess stacked, full


def test_predicted_faithfulness_per_semantics():
    from mechdelta.circuits.search import predicted

    est = [0.5, 0.3, -0.1, float("-inf")]
    assert predicted(est, "graft") == pytest.approx([0.0, 0.5, 0.8, 0.7, 0.7])
    assert predicted(est, "splice") == predicted(est, "graft")
    # ablate: each estimate is the loss of removing one member from the full graph
    assert predicted(est, "ablate") == pytest.approx([0.3, 0.8, 1.1, 1.0, 1.0])
