"""Warranted claims on the zoo's pairs: per-site p/q on sweeps, attributions and joint patches,
unchanged sites (identical activations) never claimed, the planted components claimed in both
directions, the null pair's empty claims with a reason, seed-variation controls, determinism and
round trips of the test settings, and the reliability of site rankings (split halves)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import mechdelta as md
from mechdelta import (
    AttributionError,
    BothDirections,
    ConfigError,
    PatchResult,
    ShiftNotSignificantWarning,
    Site,
    SiteTest,
    SweepResult,
    TaskError,
)
from mechdelta.patching.results import target_metric
from mechdelta.stats.testing import adjust

N_BOOT = 200
R2I, I2R = "reference->intervened", "intervened->reference"
HEAD = Site("head_out", 1, head=1)
MLP = Site("mlp_out", 1)


@pytest.fixture(scope="module")
def planted():
    return md.zoo.load("planted")


@pytest.fixture(scope="module")
def task(planted):
    return planted.tasks["trigger"]


@pytest.fixture(scope="module")
def heads(planted, task):
    return md.sweep(planted.pair, task, "head_out", "both", n_boot=N_BOOT)


@pytest.fixture(scope="module")
def mlps(planted, task):
    return md.sweep(planted.pair, task, "mlp_out", "both", n_boot=N_BOOT)


@pytest.fixture(scope="module")
def null_heads():
    """The null pair's head sweep on its recall task (the same 2 x 4 head grid as the planted
    pair's): every site differs a little (two seeds), nothing shifts."""
    entry = md.zoo.load("null")
    with pytest.warns(ShiftNotSignificantWarning):
        return md.sweep(entry.pair, entry.tasks["recall"], "head_out", "both", n_boot=N_BOOT)


def _deltas(result: SweepResult) -> torch.Tensor:
    """|mean(patched - target)| per site, flattened (metric units), computed here."""
    per = result.per_prompt.double().reshape(-1, result.per_prompt.shape[-1])
    return (per - target_metric(result.direction, result.shift).double()).mean(1)


# --- unchanged sites and the planted ground truth -----------------------------------------------


def test_unchanged_sites_get_p_one_and_are_never_claimed(planted, heads, mlps):
    assert planted.ground_truth == {HEAD, MLP}
    claimed = {c.site for c in [*md.claims(heads), *md.claims(mlps)]}
    for sweep in (heads, mlps):
        for r in sweep:
            assert r.activation_delta is not None
            # layer 0 is not fine-tuned: its activations are identical in both models ...
            assert torch.all(r.activation_delta[0] == 0)
            # ... so its splices have p = 1 exactly, whatever the test or the correction
            for variant in (r, r.tested("bootstrap"), r.tested(correction="holm")):
                assert torch.all(variant.p[0] == 1.0) and torch.all(variant.q[0] == 1.0)
                assert not variant.significant(0.5)[0].any()
            unchanged = r.activation_delta == 0
            assert torch.all(r.p[unchanged] == 1.0)
            # the splice of identical activations leaves every prompt's metric exactly as it was
            target = target_metric(r.direction, r.shift)
            assert torch.all(r.per_prompt[unchanged] == target)
            for site, same in zip(r.sites, unchanged.flatten().tolist(), strict=True):
                assert not (same and site in claimed)
    # the activation check alone decides: with noise added to the patched metric the unchanged
    # sites still get p = 1 (identical activations cannot change the metric; any difference is
    # float noise of a recomputation)
    r = heads[R2I]
    g = torch.Generator().manual_seed(0)
    noisy = dataclasses.replace(
        r, per_prompt=r.per_prompt + torch.randn(r.per_prompt.shape, generator=g)
    )
    assert torch.all(noisy.p[r.activation_delta == 0] == 1.0)
    # ... and without activation deltas the data decide: the noise sites are now tested
    bare = dataclasses.replace(noisy, activation_delta=None)
    assert bool((bare.p[0] < 1.0).all())


def test_planted_components_are_claimed_in_both_directions(heads, mlps):
    for sweep, site in ((heads, HEAD), (mlps, MLP)):
        claims = md.claims(sweep)
        assert {c.direction.value for c in claims} == {R2I, I2R}
        assert {c.site for c in claims} == {site}  # nothing else
        for c in claims:
            assert c.q < 0.01 and c.p <= c.q and c.effect >= 0.05
        for r in sweep:
            sig = r.significant(0.01)
            assert sig.dtype == torch.bool and sig.shape == r.grid_shape
            # exactly the planted site is significant
            assert [s for s, on in zip(r.sites, sig.flatten().tolist(), strict=True) if on] == [
                site
            ]


def test_null_pair_has_no_claims_and_says_why(null_heads):
    claims = md.claims(null_heads)
    assert len(claims) == 0 and not claims and list(claims) == []
    # the shift's 95% interval contains 0 (checked before its sign-flip test)
    assert claims.reason == "the shift's interval contains 0: the shift itself is not warranted"
    assert claims.n_tests == 16  # both directions' grids were still tested
    assert "no warranted claims" in str(claims)
    text = claims.to_markdown()
    assert "No warranted claims" in text and claims.reason in text
    df = claims.to_dataframe()
    assert df.empty and "site" in df.columns and "q" in df.columns
    # per-site p-values exist on the null pair all the same (intermediate, no site at q < 0.05)
    for r in null_heads:
        assert torch.isfinite(r.p).all() and (r.p < 1).all()
        assert not r.significant(0.05).any()


def test_shift_test_at_a_tiny_alpha_withholds_claims(mlps):
    # the shift's own sign-flip p is 1/10001 here: at alpha = 1e-5 the shift is not warranted
    claims = md.claims(mlps, alpha=1e-5)
    assert not claims and "sign-flip test" in (claims.reason or "")


# --- claims: criteria, texts, tables ------------------------------------------------------------


def test_claim_fields_and_text(mlps):
    claims = md.claims(mlps)
    assert len(claims) == 2
    assert [abs(c.effect) for c in claims] == sorted((abs(c.effect) for c in claims), reverse=True)
    for c in claims:
        r = mlps[c.direction]
        i = r.sites.index(c.site)
        assert c.effect == pytest.approx(float(r.scores.flatten()[i]))
        assert c.ci == pytest.approx(tuple(r.ci.reshape(-1, 2)[i].tolist()))
        assert c.p == float(r.p.flatten()[i]) and c.q == float(r.q.flatten()[i])
        assert c.delta == pytest.approx(float(_deltas(r)[i]))
        assert c.n_prompts == 64 and "sign-flip" in c.test
        assert c.exceeds_control is None and c.control_threshold is None
        text = c.text
        assert str(c) == text
        assert f"{abs(c.effect):.0%} [" in text
        assert re.search(r"\d+% \[\d+, \d+\]", text)
        assert "q < 0.001" in text and text.endswith("64 prompts")
        if c.direction.toward_reference:
            assert text.startswith("restoring L1.mlp_out from the reference undoes ")
        else:
            assert text.startswith(
                "putting L1.mlp_out from the intervened model into the reference carries "
            )
    df = claims.to_dataframe()
    assert list(df.columns) == [
        "site",
        "direction",
        "effect",
        "ci_low",
        "ci_high",
        "p",
        "q",
        "n_prompts",
        "delta",
        "exceeds_control",
        "control_threshold",
        "test",
        "text",
    ]
    assert len(df) == 2 and set(df["site"]) == {"L1.mlp_out"}
    assert df["text"].tolist() == [c.text for c in claims]
    md_text = claims.to_markdown()
    assert "| site | direction | effect | 95% CI | q | prompts |" in md_text
    assert "|---|---|---|---|---|---|" in md_text and "| L1.mlp_out |" in md_text
    assert md_text.startswith("Shift: logit_diff") and "Criteria: q < 0.05" in md_text
    assert "beyond seed variation" not in md_text
    assert claims._repr_markdown_() == md_text
    assert str(claims) == "\n".join(c.text for c in claims)


def test_min_effect_and_alpha_filters(heads, mlps):
    # L1H1 carries ~22% (restoring) and ~19% (putting in) of the shift, L1.mlp_out ~95-99%
    effects = {c.direction.value: c.effect for c in md.claims(heads)}
    # strongest first (here the reverse of the mlp claims' direction order)
    assert [c.direction.value for c in md.claims(heads)] == [R2I, I2R]
    assert [c.direction.value for c in md.claims(mlps)] == [I2R, R2I]
    assert 0.2 < effects[R2I] < 0.25 and 0.15 < effects[I2R] < 0.2
    mid = md.claims(heads, min_effect=0.2)
    assert [c.direction.value for c in mid] == [R2I]
    none = md.claims(heads, min_effect=0.5)
    assert not none and "no site has q < 0.05 and |effect| >= 50%" in (none.reason or "")
    assert len(md.claims(mlps, min_effect=0.5)) == 2
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="alpha"):
            md.claims(heads, alpha)
    with pytest.raises(ConfigError, match="min_effect"):
        md.claims(heads, min_effect=-0.1)
    # a stricter alpha keeps claims with q below it
    assert len(md.claims(heads, alpha=0.005)) == 2


def test_few_prompts_note_the_p_value_floor(planted, task):
    # 8 prompts: the exact sign-flip test cannot go below 2/256 = 0.0078, so across 8 sites
    # Benjamini-Hochberg cannot reach q < 0.05 for a single site: the claims say so
    small = md.sweep(planted.pair, task.subset(range(8)), "head_out", R2I, n_boot=N_BOOT)
    claims = md.claims(small)
    assert claims.notes and "smallest attainable p-value is 7.8e-03" in claims.notes[0]
    assert "Benjamini-Hochberg" in claims.notes[0]
    assert "Note: the smallest attainable" in claims.to_markdown()
    # Holm: the note names the correction in use
    assert "Holm" in md.claims(small.tested(correction="holm")).notes[0]
    # the bootstrap test resolves 1/(1 + 10000) at any prompt count: no note
    assert md.claims(small.tested("bootstrap")).notes == ()


# --- seed-variation control ---------------------------------------------------------------------


def test_control_marks_claims_beyond_seed_variation(planted, task, heads, mlps, null_heads):
    claims = md.claims(heads, control=null_heads)
    assert {(c.site, c.direction.value) for c in claims} == {(HEAD, R2I), (HEAD, I2R)}
    null_effects = torch.cat([_deltas(r).abs() for r in null_heads])
    threshold = float(torch.quantile(null_effects, 0.95))
    for c in claims:
        assert c.control_threshold == pytest.approx(threshold)
        assert c.exceeds_control is True and abs(c.delta) > 10 * threshold
        assert "; exceeds seed variation (|effect| " in c.text
    assert "beyond seed variation |" in claims.to_markdown()
    assert claims.to_dataframe()["exceeds_control"].tolist() == [True, True]
    # the mark can be negative: as its own control, the planted sweep's 16 per-site effects (14
    # zeros, L1H1's 3.27 and 2.85) put the threshold between L1H1's two effects
    own = {c.direction.value: c for c in md.claims(heads, control=heads)}
    assert own[R2I].exceeds_control is True and own[I2R].exceeds_control is False
    assert "does not exceed seed variation" in own[I2R].text
    assert "| no |" in md.claims(heads, control=heads).to_markdown()
    # a control must cover the same grid, and be a grid
    with pytest.raises(ConfigError, match="different grid"):
        md.claims(heads, control=mlps)
    with pytest.raises(ConfigError, match="different grid"):
        md.claims(heads[R2I], control=mlps[R2I])
    patch = md.patch(planted.pair, task, [HEAD], R2I, n_boot=N_BOOT)
    with pytest.raises(ConfigError, match="needs a grid"):
        md.claims(heads, control=patch)


# --- determinism, switching tests, round trips --------------------------------------------------


def test_p_values_are_deterministic_given_the_seed(null_heads):
    r = null_heads[R2I]
    p = r.p
    # a fresh copy (no cached values) with the same settings gives identical p
    assert torch.equal(r.tested(seed=0).p, p) and torch.equal(r.tested().q, r.q)
    # Monte Carlo over 64 prompts: another seed moves p slightly
    other = r.tested(seed=1).p
    assert not torch.equal(other, p)
    assert float((other - p).abs().max()) < 0.02
    boot = r.tested("bootstrap", correction="holm")
    assert boot.testing == SiteTest("bootstrap", "holm")
    assert not torch.equal(boot.p, p) and float((boot.p - p).abs().max()) < 0.1
    torch.testing.assert_close(boot.q, adjust(boot.p, "holm"), rtol=0, atol=0)
    torch.testing.assert_close(r.q, adjust(p, "bh"), rtol=0, atol=0)
    assert bool((boot.q >= boot.p).all())
    # switching back: the original settings' values, not a cached bootstrap value
    assert torch.equal(boot.tested().p, p)
    with pytest.raises(ConfigError):
        r.tested("t-test")
    with pytest.raises(ConfigError, match="alpha"):
        r.significant(1.0)


def test_round_trips_keep_the_test_settings(tmp_path, heads, planted, task):
    spec = dict(correction="holm", n_resamples=500, seed=3)
    r = heads[I2R].tested("bootstrap", **spec)
    r.save(tmp_path / "sweep")
    loaded = SweepResult.load(tmp_path / "sweep")
    assert loaded.testing == r.testing == SiteTest("bootstrap", "holm", 500, 3)
    assert torch.equal(loaded.p, r.p) and torch.equal(loaded.q, r.q)
    both = BothDirections(*(x.tested("bootstrap", **spec) for x in heads))
    both.save(tmp_path / "both")
    back = BothDirections.load(tmp_path / "both")
    for a, b in zip(both, back, strict=True):
        assert b.testing == a.testing and torch.equal(a.p, b.p) and torch.equal(a.q, b.q)
    patch = md.patch(planted.pair, task, [HEAD, MLP], R2I, n_boot=N_BOOT)
    assert isinstance(patch, PatchResult)
    tp = patch.tested("bootstrap", n_resamples=300, seed=2)
    tp.save(tmp_path / "patch")
    pl = PatchResult.load(tmp_path / "patch")
    assert pl.testing == SiteTest("bootstrap", "bh", 300, 2) and pl.p == tp.p and pl.q == tp.q
    # default settings survive too (and a result stored before the field existed loads them)
    heads[R2I].save(tmp_path / "plain")
    assert SweepResult.load(tmp_path / "plain").testing == SiteTest()


# --- attribution: only verified sites are tested ------------------------------------------------


def test_attribution_p_only_at_verified_sites(planted, task, heads):
    result = md.attribute(planted.pair, task, "head_out", R2I, n_boot=N_BOOT)
    for what in ("p", "q"):
        with pytest.raises(AttributionError, match="verify"):
            getattr(result, what)
    with pytest.raises(AttributionError):
        result.significant()
    with pytest.raises(AttributionError):
        md.claims(result)
    ver = result.verify(2, random=1)
    assert HEAD in ver.sites and len(ver.sites) == 3
    p, q = result.p, result.q
    assert p.shape == q.shape == result.grid_shape == (2, 4)
    verified = [site in ver.sites for site in result.sites]
    assert torch.isfinite(p).flatten().tolist() == verified
    assert torch.isfinite(q).flatten().tolist() == verified
    # the exact patches' p-values: the same as the sweep's at those sites
    exact = heads[R2I]
    for i, on in enumerate(verified):
        if on:
            assert float(p.flatten()[i]) == float(exact.p.flatten()[i])
    # q: the whole 8-site grid is the family, unverified sites counting as p = 1
    filled = adjust(torch.nan_to_num(p, nan=1.0), "bh")
    ok = torch.isfinite(q)
    torch.testing.assert_close(q[ok], filled[ok], rtol=0, atol=0)
    head_i = result.sites.index(HEAD)
    assert float(q.flatten()[head_i]) == pytest.approx(8 * float(p.flatten()[head_i]))
    assert float(q.flatten()[head_i]) > float(adjust(p).flatten()[head_i])  # not the 3-site family
    assert result.significant(0.01).flatten().tolist() == [s == HEAD for s in result.sites]
    # claims state the exact patch's effect and interval, not the first-order estimate
    (claim,) = md.claims(result)
    assert claim.site == HEAD
    assert claim.effect == pytest.approx(float(exact.scores[1, 1]), abs=1e-6)
    assert claim.ci == pytest.approx(tuple(exact.ci[1, 1].tolist()), abs=1e-6)
    assert abs(float(result.scores[1, 1]) - claim.effect) > 0.05  # the estimate is far off here
    assert md.claims(result).n_tests == 8


def test_attribution_p_follows_each_new_verification(planted, task):
    result = md.attribute(planted.pair, task, "head_out", R2I, n_boot=N_BOOT)
    for i in range(40):
        result.verify(1 + i % 4, random=0)
        ver = result.verification
        assert ver is not None
        assert int(torch.isfinite(result.p).sum()) == len(ver.sites), i


# --- joint patches --------------------------------------------------------------------------------


def test_joint_patch_p_q_and_claims(planted, task):
    both = md.patch(planted.pair, task, [HEAD, MLP], "both", n_boot=N_BOOT)
    for r in both:
        assert r.p == pytest.approx(1 / 10001) and r.q == r.p
        assert r.significant() is True and r.significant(1e-5) is False
        assert r.tested("bootstrap").p == pytest.approx(1 / 10001)
    claims = md.claims(both)
    assert len(claims) == 2 and {c.direction.value for c in claims} == {R2I, I2R}
    for c in claims:
        assert c.site == (HEAD, MLP) and c.label == "{L1H1, L1.mlp_out}"
        assert c.effect == pytest.approx(1.0, abs=1e-3)
        assert "{L1H1, L1.mlp_out}" in c.text and "100%" in c.text
    # layer 0 is identical in both models: its joint patch has p = 1 and no claim
    zero = md.patch(planted.pair, task, ["L0H1", "L0.mlp_out"], "both", n_boot=N_BOOT)
    for r in zero:
        assert r.activation_delta == (0.0, 0.0)
        assert r.p == 1.0 and r.q == 1.0 and r.significant(0.99) is False
    none = md.claims(zero)
    assert not none and "no site has q < 0.05" in (none.reason or "")


# --- reliability ----------------------------------------------------------------------------------


def _spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of ranks (no ties in the data used here)."""
    ra = torch.argsort(torch.argsort(torch.tensor(a))).double()
    rb = torch.argsort(torch.argsort(torch.tensor(b))).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_reliability_of_rankings(heads, mlps, null_heads):
    a, b = null_heads[R2I], null_heads[I2R]
    same = md.reliability(a, a)
    assert isinstance(same, md.Reliability)
    assert same.spearman == pytest.approx(1.0) and same.top_k_overlap == 1.0
    assert same.n_sites == 8 and same.sites == tuple(str(s) for s in a.sites)
    # reversed ranking: negating the patched metric reverses the order of the scores
    flipped = dataclasses.replace(a, per_prompt=-a.per_prompt)
    assert md.reliability(a, flipped).spearman == pytest.approx(-1.0)
    # against an independent computation on two different rankings (no ties in these scores)
    sa, sb = a.scores.flatten().tolist(), b.scores.flatten().tolist()
    assert len(set(sa)) == len(set(sb)) == 8
    rel = md.reliability(a, b, k=3, labels=("r->i", "i->r"))
    assert rel.spearman == pytest.approx(_spearman(sa, sb), abs=1e-12)
    top = [set(sorted(range(8), key=lambda i, s=s: -abs(s[i]))[:3]) for s in (sa, sb)]
    assert rel.top_k_overlap == pytest.approx(len(top[0] & top[1]) / 3) and rel.k == 3
    assert "Spearman" in rel.summary and "r->i vs i->r" in rel.summary
    assert list(rel.to_dataframe().columns) == ["site", "r->i", "i->r"]
    rel.figure()
    # two BothDirections: one per direction
    per = md.reliability(heads, heads)
    assert isinstance(per, dict) and set(per) == {R2I, I2R}
    assert all(x.spearman == pytest.approx(1.0) for x in per.values())
    with pytest.raises(ConfigError, match="different grids"):
        md.reliability(heads[R2I], mlps[R2I])
    with pytest.raises(ConfigError, match="BothDirections"):
        md.reliability(heads, heads[R2I])
    with pytest.raises(ConfigError, match="k="):
        md.reliability(a, a, k=0)


def test_split_half_on_the_planted_pair(planted, task, heads):
    seen = []

    def recording_sweep(pair, half, **kwargs):
        seen.append(half)
        return md.sweep(pair, half, **kwargs)

    rel = md.split_half(
        planted.pair,
        task,
        recording_sweep,
        k=1,
        component="head_out",
        direction="both",
        n_boot=N_BOOT,
    )
    assert isinstance(rel, dict) and set(rel) == {R2I, I2R}
    for value in rel.values():
        assert value.spearman > 0.5 and value.top_k_overlap == 1.0  # L1H1 tops both halves
        assert value.labels == ("half A", "half B")
    # two disjoint halves of 32 prompts each
    first, second = (h.prompts for h in seen)
    assert len(first) == len(second) == 32
    rows = {tuple(x.tolist()) for x in first} | {tuple(x.tolist()) for x in second}
    assert len(rows) == len({tuple(x.tolist()) for x in task.prompts})
    assert seen[0].name == "trigger (half A)" and seen[1].name == "trigger (half B)"
    # attached to claims, shown under the table
    claims = md.claims(heads).with_reliability(rel[R2I])
    assert claims.reliability is rel[R2I]
    assert "Reliability (split halves): Spearman" in claims.to_markdown()
    with pytest.raises(TaskError, match="at least 8 prompts"):
        md.split_half(planted.pair, task.subset(range(7)), md.sweep, component="head_out")
