"""CheckpointSeries / SeriesResult (issue 17) on the zoo's induction training series: the shipped
checkpoints are the induction pair's, series analyses equal per-pair calls, and emergence finds the
induction heads at the phase change."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mechdelta as md
from mechdelta import ConfigError, Direction
from mechdelta.circuits import CheckpointSeries, SeriesResult, circuit_membership
from mechdelta.core.provenance import weights_hash
from mechdelta.errors import ArchitectureMismatchError, ResultFormatError, ZooError
from mechdelta.plotting import membership_figure, trajectory_figure
from mechdelta.zoo import induction
from mechdelta.zoo._models import build_model
from mechdelta.zoo.series import STEPS, load_series, read_manifest

I2R, R2I = Direction.INTERVENED_TO_REFERENCE, Direction.REFERENCE_TO_INTERVENED
L1 = ["L1H0", "L1H1", "L1H2", "L1H3"]
L0 = ["L0H0", "L0H1", "L0H2", "L0H3"]


@pytest.fixture(scope="module")
def series():
    return load_series()


@pytest.fixture(scope="module")
def task():
    return induction.task()


@pytest.fixture(scope="module")
def emergence_sweep(series, task):
    """Every checkpoint against step 0, reverting each head's output to step 0's."""
    return series.sweep(task, "head_out", I2R, n_boot=500)


def test_shipped_series_holds_the_induction_pairs_checkpoints(series):
    assert series.labels == STEPS and len(series) == len(STEPS) and series.reference == 0
    manifest = read_manifest()
    hashes = [weights_hash(m.state_dict()) for m in series.models]
    assert hashes == [manifest["hashes"][str(s)] for s in STEPS]
    assert len(set(hashes)) == len(STEPS)
    card = md.zoo.load("induction").card
    assert hashes[STEPS.index(400)] == card.hashes["reference"]
    assert hashes[STEPS.index(1500)] == card.hashes["intervened"]


def test_a_corrupted_checkpoint_is_refused(tmp_path):
    import shutil

    from mechdelta.zoo.series import series_dir

    shutil.copytree(series_dir(), tmp_path / "s")
    manifest = (tmp_path / "s" / "manifest.json").read_text()
    (tmp_path / "s" / "manifest.json").write_text(manifest.replace('"0": "', '"0": "0'))
    with pytest.raises(ZooError, match="does not match the manifest"):
        load_series(tmp_path / "s", steps=[0, 200])
    with pytest.raises(ZooError, match="no steps"):
        load_series(steps=[0, 123])


def test_reference_mode_sweep_equals_sweep_on_each_pair(series, task, emergence_sweep):
    r = emergence_sweep
    assert r.labels == STEPS[1:] and r.checkpoints == STEPS
    assert r.pair_labels == tuple((0, s) for s in STEPS[1:])
    for k in (0, 4, 8):
        pair = md.ModelPair(series.models[0], series.models[k + 1])
        direct = md.sweep(pair, task, "head_out", I2R, n_boot=500)
        assert torch.equal(r.results[k].per_prompt, direct.per_prompt)
        assert torch.equal(r.results[k].ci, direct.ci)
        assert torch.equal(r.scores[k], direct.scores.flatten())
    assert r[STEPS[5]] is r.results[4]


def test_consecutive_pairs_are_neighbours(series):
    idx = series.pair_indices("consecutive")
    assert idx == [(i - 1, i) for i in range(1, len(STEPS))]
    pairs = series.pairs("consecutive")
    for (a, b), p in zip(idx, pairs, strict=True):
        assert p.reference is series.models[a] and p.intervened is series.models[b]
    assert series.pair_labels("consecutive") == list(STEPS[1:])
    assert [p.reference for p in series.pairs()] == [series.models[0]] * (len(STEPS) - 1)


def test_emergence_finds_the_induction_heads_at_the_phase_change(emergence_sweep):
    r = emergence_sweep
    metric = {k: float(v.mean()) for k, v in r.metrics().items()}
    # the phase change: second-copy loss 4.7 at step 750, 0.9 at step 900
    assert metric[750] > 4.0 and metric[900] < 1.5 and metric[600] > 4.5
    shipped = read_manifest()["second_copy_loss"]
    assert metric == pytest.approx({s: shipped[str(s)] for s in STEPS}, abs=1e-3)
    # plain significance: every head carries part of the slow pre-phase-change gain too
    assert set(r.emergence().values()) == {200}
    # effect >= 10% of the whole run's loss drop: the layer-1 heads at step 800, no layer-0 head
    large = r.emergence(threshold=0.1, scale="series")
    assert {h: large[h] for h in L1} == dict.fromkeys(L1, 800)
    assert all(large[h] is None for h in L0)
    scores, cis = r.scored(scale="series")
    before = STEPS.index(750) - 1  # pair index of step 750
    assert float(cis[: before + 1, 4:, 0].max()) < 0.1  # no L1 head's CI clears 0.1 before 800
    assert float(scores[-1, 4:].min()) > 0.25 and float(scores[-1, :4].abs().max()) < 0.05
    # series scale of the last pair (last vs first checkpoint) equals the pair's own score
    assert torch.allclose(scores[-1], r.scores[-1], atol=1e-6)
    with pytest.raises(ConfigError, match="threshold"):
        r.emergence(threshold=-1.0)
    with pytest.raises(ConfigError, match="scale"):
        r.scored(scale="run")


def test_cis_recomputed_at_the_stored_alpha_equal_the_stored_ones(emergence_sweep):
    r = emergence_sweep
    stored = r.cis()
    r0 = r.results[0]
    fresh = SeriesResult(r.kind, r.mode, r.labels[:1], r.pair_labels[:1], (r0,))
    assert torch.equal(fresh.cis(), stored[:1])
    wider = r.cis(0.01)
    assert bool((wider[..., 0] <= stored[..., 0] + 1e-6).all())
    assert bool((wider[..., 1] >= stored[..., 1] - 1e-6).all())


def test_attribute_and_save_load_round_trip(series, task, tmp_path):
    small = CheckpointSeries(series.models[2:5], labels=STEPS[2:5])
    a = small.attribute(task, "head_out", R2I, mode="consecutive", n_boot=100)
    assert a.kind == "attribution" and a.pair_labels == ((400, 600), (600, 750))
    direct = md.attribute(
        md.ModelPair(series.models[3], series.models[4]), task, "head_out", R2I, n_boot=100
    )
    assert torch.equal(a.results[1].per_prompt, direct.per_prompt)
    a.save(tmp_path / "a")
    back = SeriesResult.load(tmp_path / "a")
    assert type(back.results[0]).__name__ == "AttributionResult"
    assert back.labels == a.labels and back.pair_labels == a.pair_labels
    assert back.checkpoints == a.checkpoints == (400, 600, 750)
    assert back.trajectories().equals(a.trajectories())
    assert back.to_dataframe().equals(a.to_dataframe())
    assert list(a.to_dataframe().columns[:3]) == ["label", "reference", "intervened"]
    assert "attribution series (consecutive mode" in str(a)
    with pytest.raises(ResultFormatError):
        SeriesResult.load(tmp_path / "a" / "pair_000")


def test_trajectory_figure_is_deterministic(emergence_sweep):
    f1 = emergence_sweep.figure(top=3, scale="series")
    f2 = trajectory_figure(emergence_sweep, top=3, scale="series")
    assert f1.to_json() == f2.to_json()
    lines = [t for t in f1.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["L1H1", "L1H3", "L1H2"]
    assert list(lines[0].x) == list(STEPS[1:])
    assert len(f1.data) == 6  # a band and a line per site


def test_series_circuit_search_and_membership(series, task):
    small = CheckpointSeries([series.models[i] for i in (2, 6, 9)], labels=[400, 850, 1500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", md.circuits.CircuitNotFaithfulWarning)
        circuits = small.search_circuit(task, method="greedy", direction=R2I, target=0.8)
    assert list(circuits) == [850, 1500]
    assert "L0H3" in circuits[1500].names
    table = circuit_membership(circuits)
    assert list(table.columns) == [850, 1500] and "L0H3" in table.index
    f = membership_figure(circuits)
    assert f.to_json() == membership_figure(circuits).to_json()


def test_a_series_of_different_architectures_raises(series):
    other = build_model({**induction.MODEL, "n_heads": 2, "d_head": 64})
    with pytest.raises(ArchitectureMismatchError, match=r"checkpoint 2 \(label 'odd'"):
        CheckpointSeries([series.models[0], series.models[1], other], labels=[0, 1, "odd"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": [1]}, "1 labels for 2"),
        ({"labels": [1, 1]}, "distinct"),
        ({"reference": 2}, "reference must be"),
    ],
)
def test_bad_series_are_config_errors(series, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CheckpointSeries(series.models[:2], **kwargs)


def test_bad_calls_are_config_errors(series, task):
    with pytest.raises(ConfigError, match="at least 2"):
        CheckpointSeries(series.models[:1])
    small = CheckpointSeries(series.models[:2])
    with pytest.raises(ConfigError, match="mode"):
        small.pairs("neighbours")
    with pytest.raises(ConfigError, match="one direction"):
        small.sweep(task, "head_out", "both")
    assert math.isfinite(float(small.sweep(task, "head_out", n_boot=100).scores.sum()))


def test_build_series_writes_what_load_series_reads(tmp_path):
    built = md.zoo.series.build_series(tmp_path / "s", steps=[0, 3])
    loaded = load_series(tmp_path / "s")
    assert loaded.labels == (0, 3) == built.labels
    h = [weights_hash(m.state_dict()) for m in loaded.models]
    assert h == [weights_hash(m.state_dict()) for m in built.models]
    assert h[0] == read_manifest()["hashes"]["0"] and h[1] != h[0]  # same init as the shipped run
    assert read_manifest(tmp_path / "s")["spec"]["steps"] == 3
    with pytest.raises(ConfigError, match="increasing"):
        md.zoo.series.build_series(steps=[3, 0])
