"""The representation screen (issue 13): CKA estimators against textbook implementations, exact
zeros before the first changed block, KL / JS / relative change against direct computations, the
zoo's null vs planted pairs, storage, the figure and typed errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import mechdelta as md
from mechdelta.core.sites import Site
from mechdelta.errors import ConfigError, ResultFormatError, SiteError, TaskError
from mechdelta.representations import (
    RepresentationDiff,
    compare_representations,
    debiased_linear_cka,
    linear_cka,
)
from tests import _builders
from tests._reference import perturb_matching

ALL_SITES = (
    "embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head_out",
    "head_z",
    "head_q",
    "head_k",
    "head_v",
)


# --- the estimators -------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hsic_biased(k: torch.Tensor, lg: torch.Tensor) -> float:
    """Textbook HSIC: tr(K H L H) / (n - 1)²."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return float(torch.trace(k @ h @ lg @ h)) / (n - 1) ** 2


def _hsic_unbiased(k: torch.Tensor, lg: torch.Tensor) -> float:
    """Song et al. (2012), eq. 5: the unbiased HSIC estimator, Gram diagonals zeroed."""
    n = k.shape[0]
    kt = k - torch.diag(torch.diag(k))
    lt = lg - torch.diag(torch.diag(lg))
    one = torch.ones(n, dtype=torch.float64)
    value = (
        torch.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    )
    return float(value) / (n * (n - 3))


def _direct_cka(x: torch.Tensor, y: torch.Tensor, hsic: Any) -> float:
    k, lg = x.double() @ x.double().T, y.double() @ y.double().T  # uncentred linear kernels
    return hsic(k, lg) / math.sqrt(hsic(k, k) * hsic(lg, lg))


@pytest.mark.parametrize(("n", "dx", "dy"), [(40, 7, 5), (9, 30, 20)])  # feature and Gram forms
def test_cka_matches_textbook_hsic(n: int, dx: int, dy: int) -> None:
    x = torch.randn(n, dx, generator=_gen(0), dtype=torch.float64) + 3.0  # not centred
    y = x[:, :1] * torch.randn(1, dy, generator=_gen(1), dtype=torch.float64)
    y = y + torch.randn(n, dy, generator=_gen(2), dtype=torch.float64) - 1.5
    got, want = linear_cka(x, y), _direct_cka(x, y, _hsic_biased)
    assert 0.05 < want < 0.999
    assert abs(got - want) < 1e-6
    got_d, want_d = debiased_linear_cka(x, y), _direct_cka(x, y, _hsic_unbiased)
    assert abs(got_d - want_d) < 1e-6
    assert abs(got_d - got) > 1e-4  # the two estimators do differ


def test_cka_is_one_and_invariant() -> None:
    x = torch.randn(50, 12, generator=_gen(3), dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(12, 9, generator=_gen(4), dtype=torch.float64))
    for f in (linear_cka, debiased_linear_cka):
        assert f(x, x) == pytest.approx(1.0, abs=1e-12)
        assert f(x.float(), x.float()) == pytest.approx(1.0, abs=1e-12)
        base = f(x, y)
        assert base < 0.99
        q, _ = torch.linalg.qr(torch.randn(12, 12, generator=_gen(5), dtype=torch.float64))
        assert f(x @ q, y) == pytest.approx(base, abs=1e-10)  # orthogonal transform
        assert f(7.3 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
        assert f(x + 4.0, y) == pytest.approx(base, abs=1e-10)  # translation


def test_debiased_cka_removes_the_bias_of_many_features() -> None:
    """Independent activations with many features per input: plain CKA is far above 0 (its
    bias), the unbiased-HSIC version close to 0."""
    x = torch.randn(24, 200, generator=_gen(6), dtype=torch.float64)
    y = torch.randn(24, 200, generator=_gen(7), dtype=torch.float64)
    assert linear_cka(x, y) > 0.5
    assert abs(debiased_linear_cka(x, y)) < 0.1


def test_cka_degenerate_input() -> None:
    x = torch.randn(3, 4, generator=_gen(8))
    assert math.isnan(debiased_linear_cka(x, x))  # needs n >= 4
    assert math.isnan(linear_cka(torch.ones(6, 3), torch.randn(6, 3, generator=_gen(9))))
    with pytest.raises(ConfigError):
        linear_cka(torch.ones(1, 3), torch.ones(1, 3))


# --- a pair that differs only from block k on -------------------------------------------------------


def _late_pair(k: int, family: str, tokenizer: Any = None) -> md.ModelPair:
    """Reference and a copy whose blocks >= k (and nothing else) got weight noise."""

    def late(key: str) -> bool:
        return key.startswith("blocks.") and int(key.split(".")[1]) >= k

    if family == "native":
        ref, itv = _builders.native_pair(lambda m: perturb_matching(m, late, seed=11, scale=0.3))
        return md.ModelPair(ref, itv)
    a, b = (_builders.hf_model(family, len(tokenizer), seed=0) for _ in range(2))
    # the HF module's own keys: model.layers.L...
    perturb_matching(b, lambda key: late(key.replace("model.layers.", "blocks.")), 11, 0.3)
    return md.ModelPair.from_hf(a, b, tokenizer=tokenizer)


def _ragged_task(vocab: int) -> md.Task:
    gen = _gen(12)
    rows = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (9, 6, 11, 7, 10, 8)]
    return md.Task(rows, metric="loss", name="ragged")


@pytest.mark.parametrize(("family", "k"), [("native", 1), ("native", 2), ("llama", 1)])
def test_exact_before_the_first_changed_block(family: str, k: int, tokenizer: Any) -> None:
    pair = _late_pair(k, family, tokenizer)
    shape = pair.shape
    sites = ALL_SITES if family == "native" else ("resid_post", "head_out", "head_k")
    diff = compare_representations(pair, _ragged_task(int(pair.cfg.d_vocab)), sites=sites)
    df = diff.to_dataframe()
    assert diff.n_rows == 51
    before = df[(df.layer < k) & df.measure.isin(["cka", "cka_debiased"])]
    assert len(before) > 0
    assert (before.value - 1).abs().max() < 1e-6
    for measure in ("delta_norm", "logit_lens_kl", "attention_js"):
        rows = df[(df.layer < k) & (df.measure == measure)]
        assert len(rows) > 0 and (rows.value == 0).all(), measure
    # the input of block k is still identical; its output is not
    if family == "native":
        assert diff.get("delta_norm", "resid_pre", k) == 0.0
    assert diff.get("delta_norm", "resid_post", k) > 1e-2
    assert diff.get("cka", "resid_post", k) < 1 - 1e-4
    assert max(diff.get("attention_js", "head_pattern", k, h) for h in range(shape.n_heads)) > 0
    for measure in ("delta_norm", "cka", "cka_debiased", "logit_lens_kl"):
        first = diff.candidates(1, measure=measure)
        assert [c.site for c in first] == [Site("resid_post", k)], measure
    # weight deltas sit exactly where the noise went
    weights = df[df.measure == "weight_delta"]
    assert (weights[weights.layer >= k].value > 0).all()
    assert (weights[~(weights.layer >= k).fillna(False)].value == 0).all()
    if family == "llama":  # GQA: the query heads of one group read the same key head
        g = shape.group_size
        assert g == 2
        assert diff.get("delta_norm", "head_k", k, 0) == diff.get("delta_norm", "head_k", k, 1)
        assert diff.get("delta_norm", "head_k", k, 1) != diff.get("delta_norm", "head_k", k, 2)


def _real_rows(tokens: torch.Tensor, lengths: torch.Tensor, final: bool) -> tuple[Any, Any]:
    if final:
        return torch.arange(len(lengths)), lengths - 1
    b = torch.cat([torch.full((int(n),), i) for i, n in enumerate(lengths)])
    p = torch.cat([torch.arange(int(n)) for n in lengths])
    return b, p


@pytest.mark.parametrize("positions", ["all", "final"])
def test_measures_match_direct_computations(positions: str) -> None:
    """KL of the final distributions, one head's attention JS and one layer's relative change,
    from full forward passes and the textbook formulas; the last logit-lens layer equals KL."""
    pair = _late_pair(0, "native")
    task = _ragged_task(50)
    diff = compare_representations(pair, task, sites=("resid_post",), positions=positions)
    prepared = task.prepare(None, n_ctx=16, d_vocab=50)
    b, p = _real_rows(prepared.tokens, prepared.lengths, positions == "final")
    assert diff.n_rows == len(b)
    out = []
    for model in (pair.reference, pair.intervened):
        with torch.no_grad():
            logits, cache = model.run_with_cache(prepared.tokens)
        out.append((logits, cache))
    (lr, cr), (li, ci) = out
    lp = torch.log_softmax(lr[b, p].double(), -1)
    lq = torch.log_softmax(li[b, p].double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert kl > 1e-3
    assert diff.get("kl", "logits") == pytest.approx(kl, rel=1e-9, abs=1e-12)
    last = pair.shape.n_layers - 1
    assert diff.get("logit_lens_kl", "resid_post", last) == pytest.approx(kl, rel=1e-6)
    # attention JS of L1H2, textbook form with explicit masks
    pr = cr["blocks.1.attn.hook_pattern"][b, 2, p].double()
    pi = ci["blocks.1.attn.hook_pattern"][b, 2, p].double()
    m = (pr + pi) / 2
    js = 0.0
    for a in (pr, pi):
        mask = a > 0
        js += 0.5 * (a[mask] * (a[mask] / m[mask]).log()).sum().item()
    assert diff.get("attention_js", "head_pattern", 1, 2) == pytest.approx(js / len(b), rel=1e-9)
    # relative change of layer 1's residual: Frobenius norms over all rows
    xr = cr["blocks.1.hook_resid_post"][b, p].double()
    xi = ci["blocks.1.hook_resid_post"][b, p].double()
    want = ((xi - xr).norm() / xr.norm()).item()
    assert diff.get("delta_norm", "resid_post", 1) == pytest.approx(want, rel=1e-9)
    assert diff.get("cka", "resid_post", 1) == pytest.approx(linear_cka(xr, xi), abs=1e-12)


# --- the zoo -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_diffs() -> dict[str, tuple[Any, RepresentationDiff]]:
    out = {}
    for name in ("planted", "null"):
        entry = md.zoo.load(name)
        task = entry.task.subset(range(16))
        out[name] = (
            entry,
            compare_representations(entry.pair, task, sites=("resid_post", "head_out")),
        )
    return out


def test_null_pair_diverges_far_less_than_planted(zoo_diffs: Any) -> None:
    (planted_entry, planted), (_, null) = zoo_diffs["planted"], zoo_diffs["null"]
    for measure, site in (("delta_norm", "resid_post"), ("logit_lens_kl", "resid_post")):
        p_max = max(planted.by_layer(measure, site).values())
        n_max = max(null.by_layer(measure, site).values())
        assert n_max < 0.05 * p_max, (measure, n_max, p_max)
    assert null.get("kl", "logits") < 0.01 * planted.get("kl", "logits")
    p_cka = min(planted.by_layer("cka").values())
    n_cka = min(null.by_layer("cka").values())
    assert 1 - n_cka < 0.05 * (1 - p_cka)
    # the planted pair changes only L1H1 and layer 1's MLP: every other head's write is identical
    df = planted.to_dataframe()
    heads = df[(df.site == "head_out") & (df.measure == "delta_norm") & (df.value > 0)]
    moved = {Site("head_out", int(r.layer), head=int(r.head)) for r in heads.itertuples()}
    truth = {s for s in planted_entry.ground_truth if s.kind.value == "head_out"}
    assert moved == truth
    assert [c.site for c in planted.candidates(1)] == [Site("resid_post", 1)]


def test_save_load_round_trip(zoo_diffs: Any, tmp_path: Any) -> None:
    _, diff = zoo_diffs["planted"]
    diff.save(tmp_path / "r")
    back = RepresentationDiff.load(tmp_path / "r")
    assert torch.equal(back.values, diff.values)
    assert back.to_dataframe().equals(diff.to_dataframe())
    assert back.provenance == diff.provenance
    assert (back.positions, back.n_rows) == (diff.positions, diff.n_rows)
    assert back.provenance["task"]["n_prompts"] == 16
    assert back.provenance["models"]["reference"]["weights_hash"]
    with pytest.raises(ResultFormatError):
        md.ShiftResult.load(tmp_path / "r")


def test_figure_builds(zoo_diffs: Any) -> None:
    _, diff = zoo_diffs["planted"]
    fig = diff.figure()
    titles = [a.text for a in fig.layout.annotations]
    assert any("CKA" in t for t in titles) and any("Jensen" in t for t in titles)
    assert any("head_out per head" in t for t in titles)
    # one panel per measure with layer-level rows (cka, cka_debiased, delta_norm, logit_lens_kl,
    # kl, weight_delta) and a heatmap per per-head (measure, site): 3 x head_out, attention_js,
    # weight_delta of head_out
    assert len(titles) == 6 + 5
    assert len(fig.data) == 6 + 5 + 4  # weight_delta: embed, attn_out, mlp_out, block, unembed
    assert fig.to_json() == diff.figure().to_json()  # deterministic
    assert fig.layout.template.layout.paper_bgcolor == "white"


# --- candidates -------------------------------------------------------------------------------------


def _synthetic(values: list[float], measure: str = "delta_norm") -> RepresentationDiff:
    n = len(values)
    return RepresentationDiff(
        site=("resid_post",) * n,
        layer=tuple(range(n)),
        head=(None,) * n,
        measure=(measure,) * n,
        values=torch.tensor(values, dtype=torch.float64),
    )


def test_candidates_definition() -> None:
    diff = _synthetic([0.0, 0.5, 0.6, 2.0])  # jumps 0, 0.5, 0.1, 1.4
    onset = diff.candidates(3)
    assert [c.site.layer for c in onset] == [1, 3]  # 0.1 < 0.1 x 1.4 is not a candidate
    assert [c.rank for c in onset] == [2, 1]
    assert onset[0].jump == pytest.approx(0.5) and onset[1].divergence == pytest.approx(2.0)
    assert [c.site.layer for c in diff.candidates(1, order="jump")] == [3]
    assert [c.site.layer for c in diff.candidates(3, min_fraction=0.0)] == [1, 2, 3]
    cka = _synthetic([1.0, 0.9, 0.4], measure="cka")  # divergence 0, 0.1, 0.6
    assert [c.site.layer for c in cka.candidates(2, measure="cka")] == [1, 2]
    assert _synthetic([0.0, 0.0]).candidates(2) == ()
    assert _synthetic([0.3, 0.3]).candidates(2)[0].site == Site("resid_post", 0)


def test_candidates_bad_arguments() -> None:
    diff = _synthetic([0.0, 1.0])
    for kwargs in (
        {"k": 0},
        {"measure": "attention_js"},
        {"order": "size"},
        {"min_fraction": 2.0},
        {"site": "head_out"},
        {"site": "mlp_out"},
    ):
        with pytest.raises(ConfigError):
            diff.candidates(**kwargs)
    with pytest.raises(SiteError):
        diff.candidates(site="nonsense")


# --- bad input --------------------------------------------------------------------------------------


def test_bad_input_raises_typed_errors() -> None:
    pair = _late_pair(1, "native")
    task = _ragged_task(50)
    for sites in (
        ("resid_foo",),
        ("head_pattern",),
        ("mlp_neuron",),
        (Site("resid_post", 0, position=2),),
    ):
        with pytest.raises(SiteError):
            compare_representations(pair, task, sites=sites)
    with pytest.raises(SiteError):
        compare_representations(pair, task, sites=(Site("resid_post", 7),))
    with pytest.raises(ConfigError):
        compare_representations(pair, task, sites=())
    with pytest.raises(ConfigError):
        compare_representations(pair, task, positions="middle")
    with pytest.raises(ConfigError):
        compare_representations(pair, task, batch_size=0)
    with pytest.raises(TaskError):
        md.Task([], metric="loss")  # an empty task cannot even be built
    with pytest.raises(TaskError):
        compare_representations(pair, task.subset([0, 1]), positions="final")  # 2 rows < 4
    with pytest.raises(TaskError):
        compare_representations(pair, [[1, 2, 3]])  # type: ignore[arg-type]
    attn_only = md.ModelPair(
        *_builders.native_pair(lambda m: perturb_matching(m, lambda k: True), attn_only=True)
    )
    with pytest.raises(SiteError):
        compare_representations(attn_only, task, sites=("mlp_out",))
    with pytest.raises(ResultFormatError):
        RepresentationDiff(("a",), (0,), (None,), ("cka", "kl"), torch.zeros(1))
    with pytest.raises(ResultFormatError):
        RepresentationDiff(("a",), (0,), (None,), ("similarity",), torch.zeros(1))


def test_single_sites_and_batching_agree() -> None:
    """Site values pick single layers/heads; chunked forwards give the same numbers."""
    pair = _late_pair(1, "native")
    task = _ragged_task(50)
    full = compare_representations(pair, task, sites=("resid_post", "head_out"), batch_size=4)
    one = compare_representations(
        pair,
        task,
        sites=(Site("resid_post", 2), Site("head_out", 1, head=3)),
        attention=False,
        logit_lens=False,
        weights=False,
        batch_size=2,
    )
    assert set(one.measures) == {"cka", "cka_debiased", "delta_norm", "kl"}
    assert len(one) == 7
    for measure in ("cka", "cka_debiased", "delta_norm"):
        assert one.get(measure, "resid_post", 2) == pytest.approx(
            full.get(measure, "resid_post", 2), rel=1e-6
        )
        assert one.get(measure, "head_out", 1, 3) == pytest.approx(
            full.get(measure, "head_out", 1, 3), rel=1e-6
        )
    assert one.get("kl", "logits") == pytest.approx(full.get("kl", "logits"), rel=1e-6)
    assert "divergence starts at L1.resid_post" in str(full)
