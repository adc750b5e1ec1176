"""Results: save/load round trips (safetensors + JSON), corrupt or partial directories, data frames,
top(k), and the grid layout of sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mechdelta as md
from mechdelta import (
    BothDirections,
    FactorialResult,
    PatchResult,
    ResultFormatError,
    ShiftResult,
    Site,
    SweepResult,
)
from tests import _builders
from tests._reference import N_BOOT, contrast_task, perturb_matching, random_tokens


@pytest.fixture(scope="module")
def results():
    ref, itv = _builders.native_pair(lambda m: perturb_matching(m, lambda k: True))
    pair = md.ModelPair(ref, itv)
    tokens = random_tokens(5, 6, 50, seed=21)
    corrupted = tokens.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 7) % 49 + 1
    task = contrast_task(pair, tokens, corrupted=corrupted)
    return {
        "pair": pair,
        "task": task,
        "shift": md.measure_shift(pair, task, n_boot=N_BOOT),
        "sweep": md.sweep(
            pair, task, "head_out", positions=[1, 5], direction="both", n_boot=N_BOOT
        ),
        "layer_sweep": md.sweep(pair, task, "mlp_neuron", neurons=[3, 9, 4], n_boot=N_BOOT),
        "patch": md.patch(pair, task, ["L1H2", "L0.mlp_out"], direction="both", n_boot=N_BOOT),
        "factorial": md.factorial(pair, task, n_boot=N_BOOT),
    }


def _same_shift(a: ShiftResult, b: ShiftResult) -> None:
    assert torch.equal(a.reference, b.reference) and torch.equal(a.intervened, b.intervened)
    assert (a.metric, a.ci, a.alpha, a.n_boot, a.task) == (
        b.metric,
        b.ci,
        b.alpha,
        b.n_boot,
        b.task,
    )
    assert a.provenance == b.provenance


def _same_sweep(a: SweepResult, b: SweepResult) -> None:
    assert (a.component, a.direction, a.dims, a.coords, a.tokens) == (
        b.component,
        b.direction,
        b.dims,
        b.coords,
        b.tokens,
    )
    assert torch.equal(a.per_prompt, b.per_prompt)
    torch.testing.assert_close(a.ci, b.ci, rtol=0, atol=0, equal_nan=True)
    assert a.activation_delta is not None and b.activation_delta is not None
    assert torch.equal(a.activation_delta, b.activation_delta)
    assert a.provenance == b.provenance
    _same_shift(a.shift, b.shift)


def _same_patch(a: PatchResult, b: PatchResult) -> None:
    assert (a.sites, a.direction, a.ci, a.activation_delta) == (
        b.sites,
        b.direction,
        b.ci,
        b.activation_delta,
    )
    assert torch.equal(a.per_prompt, b.per_prompt) and a.provenance == b.provenance
    _same_shift(a.shift, b.shift)


# --- round trips ----------------------------------------------------------------------------------


def test_round_trips(results, tmp_path):
    shift = results["shift"]
    shift.save(tmp_path / "shift")
    _same_shift(shift, ShiftResult.load(tmp_path / "shift"))

    both = results["sweep"]
    for one in both:
        one.save(tmp_path / one.direction.name)
        _same_sweep(one, SweepResult.load(tmp_path / one.direction.name))
    both.save(tmp_path / "both")
    loaded = BothDirections.load(tmp_path / "both")
    for a, b in zip(both, loaded, strict=True):
        _same_sweep(a, b)
    layer = results["layer_sweep"]
    layer.save(tmp_path / "neurons")
    _same_sweep(layer, SweepResult.load(tmp_path / "neurons"))

    patches = results["patch"]
    patches.reference_to_intervened.save(tmp_path / "patch")
    _same_patch(patches.reference_to_intervened, PatchResult.load(tmp_path / "patch"))
    patches.save(tmp_path / "both-patch")
    for a, b in zip(patches, BothDirections.load(tmp_path / "both-patch"), strict=True):
        _same_patch(a, b)

    fac = results["factorial"]
    fac.save(tmp_path / "factorial")
    back = FactorialResult.load(tmp_path / "factorial")
    assert back.cells.keys() == fac.cells.keys()
    assert all(torch.equal(fac.cells[k], back.cells[k]) for k in fac.cells)
    assert (back.metric, back.interaction_ci, back.alpha, back.provenance) == (
        fac.metric,
        fac.interaction_ci,
        fac.alpha,
        fac.provenance,
    )
    # nothing is pickled: JSON metadata and safetensors only
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".safetensors"), path


def test_saving_over_an_existing_result_replaces_it(results, tmp_path):
    both = results["sweep"]
    both.reference_to_intervened.save(tmp_path / "r")
    both.intervened_to_reference.save(tmp_path / "r")
    _same_sweep(both.intervened_to_reference, SweepResult.load(tmp_path / "r"))


# --- corrupt and partial directories --------------------------------------------------------------


def _saved(results, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    results["sweep"].reference_to_intervened.save(path)
    return path


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "result.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    (path / "result.json").write_text(json.dumps(meta))


def test_corrupt_or_partial_directories_raise_result_format_error(results, tmp_path):
    with pytest.raises(ResultFormatError, match="holds no result.json"):
        SweepResult.load(tmp_path / "missing")
    p = _saved(results, tmp_path, "no-meta")
    (p / "result.json").unlink()  # an interrupted save: tensors written, metadata not yet
    with pytest.raises(ResultFormatError, match="interrupted"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "bad-json")
    (p / "result.json").write_text('{"kind": "sweep", ')
    with pytest.raises(ResultFormatError, match="is corrupt"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "kind")
    with pytest.raises(ResultFormatError, match="holds a 'sweep' result, not a 'patch' result"):
        PatchResult.load(p)
    _edit_meta(p, format_version=99)
    with pytest.raises(ResultFormatError, match="format version 99"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "no-tensors")
    (p / "tensors.safetensors").unlink()
    with pytest.raises(ResultFormatError, match="missing tensors.safetensors"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "truncated")
    data = (p / "tensors.safetensors").read_bytes()
    (p / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFormatError, match="tensors.safetensors' is corrupt"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "lacks")
    meta = json.loads((p / "result.json").read_text())
    _edit_meta(p, tensor_keys=[*meta["tensor_keys"], "extra"])
    with pytest.raises(ResultFormatError, match=r"lacks tensors \['extra'\]"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "no-dims")
    _edit_meta(p, dims=None)
    with pytest.raises(ResultFormatError, match="not a valid sweep result"):
        SweepResult.load(p)
    p = _saved(results, tmp_path, "bad-grid")
    _edit_meta(p, coords={"layer": [0], "position": [1, 5], "head": [0, 1, 2, 3]})
    with pytest.raises(ResultFormatError, match="do not match the grid"):
        SweepResult.load(p)


@pytest.mark.parametrize("kind", ["shift", "patch", "factorial"])
def test_missing_metadata_fields_raise_result_format_error(results, tmp_path, kind):
    result = {
        "shift": results["shift"],
        "patch": results["patch"].reference_to_intervened,
        "factorial": results["factorial"],
    }[kind]
    result.save(tmp_path / kind)
    _edit_meta(tmp_path / kind, metric=None) if kind != "patch" else _edit_meta(
        tmp_path / kind, sites=None
    )
    with pytest.raises(ResultFormatError, match=f"not a valid {kind} result"):
        type(result).load(tmp_path / kind)


def test_partial_two_direction_results_raise(results, tmp_path):
    both = results["sweep"]
    with pytest.raises(ResultFormatError, match="no both.json"):
        BothDirections.load(tmp_path)
    both.save(tmp_path / "both")
    (tmp_path / "both" / "intervened_to_reference" / "result.json").unlink()
    with pytest.raises(ResultFormatError, match="holds no result.json"):
        BothDirections.load(tmp_path / "both")
    both.save(tmp_path / "odd")
    (tmp_path / "odd" / "both.json").write_text('{"kind": "both", "result": "Nope"}')
    with pytest.raises(ResultFormatError, match="unknown result kind 'Nope'"):
        BothDirections.load(tmp_path / "odd")
    (tmp_path / "odd" / "both.json").write_text("{not json")
    with pytest.raises(ResultFormatError, match="both.json"):
        BothDirections.load(tmp_path / "odd")


def test_shape_mismatch_is_rejected_on_construction(results):
    one = results["sweep"].reference_to_intervened
    with pytest.raises(ResultFormatError, match="do not match the grid"):
        SweepResult(
            component=one.component,
            direction=one.direction,
            dims=one.dims,
            coords={**one.coords, "layer": (0,)},
            per_prompt=one.per_prompt,
            ci=one.ci,
            shift=one.shift,
        )


# --- data frames, top(k), grid layout ---------------------------------------------------------------


def test_sweep_dataframe_rows_follow_the_grid(results):
    one = results["sweep"].intervened_to_reference
    assert one.dims == ("layer", "position", "head") and one.grid_shape == (3, 2, 4)
    df = one.to_dataframe()
    assert df.columns.tolist() == [
        "site",
        "component",
        "layer",
        "head",
        "position",
        "neuron",
        "direction",
        "score",
        "ci_low",
        "ci_high",
        "patched",
        "activation_delta",
    ]
    assert len(df) == 24
    assert df["site"].tolist() == [str(s) for s in one.sites]
    assert df["layer"].tolist() == [s.layer for s in one.sites]
    assert set(df["position"]) == {1, 5} and set(df["direction"]) == {"intervened->reference"}
    assert torch.allclose(torch.tensor(df["score"].tolist()), one.scores.flatten(), equal_nan=True)
    assert torch.allclose(torch.tensor(df["patched"].tolist()), one.patched.flatten())
    both = results["sweep"].to_dataframe()
    assert len(both) == 48 and both["direction"].value_counts().to_dict() == {
        "reference->intervened": 24,
        "intervened->reference": 24,
    }
    neurons = results["layer_sweep"].to_dataframe()
    assert neurons["neuron"].tolist()[:3] == [3, 9, 4] and len(neurons) == 9
    patch_df = results["patch"].to_dataframe()
    assert len(patch_df) == 10 and set(patch_df["direction"]) == {
        "reference->intervened",
        "intervened->reference",
    }
    assert results["patch"].reference_to_intervened.to_dataframe().columns.tolist() == [
        "prompt",
        "reference",
        "intervened",
        "patched",
    ]


def test_top_k_orders_sites_by_score(results):
    one = results["sweep"].reference_to_intervened
    scores = one.scores.flatten()
    top = one.top(5)
    assert len(top) == 5
    magnitudes = [abs(s.score) for s in top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert magnitudes[0] == scores.abs().max().item()
    sites = one.sites
    for row in top:
        i = sites.index(row.site)
        assert row.score == scores[i].item()
        assert row.patched == one.patched.flatten()[i].item()
        assert row.ci == tuple(one.ci.reshape(-1, 2)[i].tolist())
    signed = [s.score for s in one.top(24, by="signed")]
    assert signed == sorted(signed, reverse=True)
    with pytest.raises(md.ConfigError, match="use 'abs'"):
        one.top(3, by="absolute")
    assert len(one.top(100)) == 24
    assert str(top[0].site) in str(one)


def test_scores_follow_the_direction_formulas(results):
    both = results["sweep"]
    shift = both.shift
    m_r, m_i = shift.reference_mean, shift.intervened_mean
    r2i, i2r = both
    want_r2i = (m_i - r2i.per_prompt.double().mean(-1)) / (m_i - m_r)
    want_i2r = (i2r.per_prompt.double().mean(-1) - m_r) / (m_i - m_r)
    assert torch.allclose(r2i.scores.double(), want_r2i, atol=1e-6)
    assert torch.allclose(i2r.scores.double(), want_i2r, atol=1e-6)
    patch = results["patch"].reference_to_intervened
    assert patch.score == pytest.approx((m_i - patch.patched) / (m_i - m_r), abs=1e-6)
    lo, hi = patch.ci
    assert lo <= hi


def test_sites_grid_order_matches_per_prompt_layout(results):
    pair, task = results["pair"], results["task"]
    one = results["sweep"].intervened_to_reference
    flat = one.per_prompt.reshape(-1, one.per_prompt.shape[-1])
    i = 13  # layer 1, position 5, head 1: row-major over (layer, position, head)
    assert one.sites[i] == Site("head_out", 1, head=1, position=5)
    alone = md.patch(pair, task, one.sites[i], direction="intervened->reference", n_boot=N_BOOT)
    assert (alone.per_prompt - flat[i]).abs().max().item() < 1e-5
    assert alone.activation_delta[0] == pytest.approx(one.activation_delta.flatten()[i].item())
