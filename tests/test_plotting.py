"""Figures: snapshot of each plot type's JSON, colour ranges, hover text, export (HTML, PNG)."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mechdelta import (
    BothDirections,
    Component,
    Direction,
    ExportError,
    FactorialResult,
    PatchResult,
    ShiftResult,
    Site,
    SweepResult,
    WeightDiff,
    WeightDiffRow,
)
from mechdelta import plotting as P
from mechdelta.stats.testing import format_p

SNAPSHOTS = Path(__file__).parent / "snapshots"
R2I, I2R = Direction.REFERENCE_TO_INTERVENED, Direction.INTERVENED_TO_REFERENCE


# --- fixed results (no model) ------------------------------------------------------------------


def make_shift() -> ShiftResult:
    reference = torch.tensor([1.0, 1.5, 0.5, 2.0, 1.0, 1.25])
    intervened = torch.tensor([3.0, 3.25, 2.0, 3.5, 2.75, 3.0])
    return ShiftResult("logit_diff", reference, intervened, (1.4, 2.1), task="induction")


def _grid(shape: tuple[int, ...], seed: float = 0.0) -> torch.Tensor:
    """Fixed, varied values in [-0.6, 1.0] (no RNG)."""
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, dtype=torch.float64)
    return (0.2 + 0.8 * torch.sin(1.7 * i + seed)).clamp(-0.6, 1.0).float().reshape(shape)


def make_sweep(
    dims: tuple[str, ...],
    coords: dict[str, tuple[int, ...]],
    direction: Direction = R2I,
    component: Component = Component.HEAD_OUT,
    tokens: tuple[str, ...] | None = None,
    seed: float = 0.0,
    shared_tokens: tuple[str | None, ...] | None = None,
) -> SweepResult:
    shift = make_shift()
    grid = tuple(len(coords[d]) for d in dims)
    score = _grid(grid, seed)
    m_r, m_i = shift.reference_mean, shift.intervened_mean
    # per-prompt patched values whose mean reproduces `score` exactly in this direction
    mean = m_i - score * (m_i - m_r) if direction.toward_reference else m_r + score * (m_i - m_r)
    spread = torch.tensor([-0.3, -0.1, 0.0, 0.1, 0.2, 0.1])
    per_prompt = mean.double()[..., None] + spread.double()
    ci = torch.stack([score - 0.15, score + 0.2], dim=-1)
    return SweepResult(
        component=component,
        direction=direction,
        dims=dims,
        coords=coords,
        per_prompt=per_prompt.float(),
        ci=ci,
        shift=shift,
        activation_delta=_grid(grid, seed + 1.0).abs() * 3,
        tokens=tokens,
        shared_tokens=shared_tokens,
    )


TOKENS = ("<|endoftext|>", "A", " B", " C", " A", " B", " the", "\n", " the")
# the prompts differ at positions 2 and 3 (prompt 0 has " B", " C" there)
SHARED = tuple(None if p in (2, 3) else t for p, t in enumerate(TOKENS))


def sweep_layer_head(direction: Direction = R2I) -> SweepResult:
    return make_sweep(
        ("layer", "head"),
        {"layer": (0, 1, 2), "head": (0, 1, 2, 3)},
        direction,
        seed=0.0 if direction is R2I else 2.0,
    )


def sweep_layer_position() -> SweepResult:
    return make_sweep(
        ("layer", "position"),
        {"layer": (0, 1, 2), "position": tuple(range(9))},
        component=Component.RESID_PRE,
        tokens=TOKENS,
        shared_tokens=SHARED,
    )


def sweep_layer() -> SweepResult:
    return make_sweep(("layer",), {"layer": (0, 1, 2, 3)}, component=Component.MLP_OUT)


def sweep_layer_position_head() -> SweepResult:
    return make_sweep(
        ("layer", "position", "head"),
        {"layer": (0, 1), "position": (0, 1, 2, 3, 4), "head": (0, 2, 3)},
        tokens=TOKENS[:5],
    )


def sweep_layer_neuron() -> SweepResult:
    return make_sweep(
        ("layer", "neuron"),
        {"layer": (0, 1), "neuron": tuple(range(20))},
        component=Component.MLP_NEURON,
    )


def make_patch(direction: Direction = R2I) -> PatchResult:
    return PatchResult(
        sites=(Site("head_out", 1, head=2), Site("head_out", 2, head=0)),
        direction=direction,
        per_prompt=torch.tensor([1.5, 2.0, 1.0, 2.5, 1.5, 1.75]),
        ci=(0.45, 0.8),
        shift=make_shift(),
    )


def make_factorial() -> FactorialResult:
    return FactorialResult(
        metric="logit_diff",
        cells={
            "reference/clean": torch.tensor([1.0, 1.5, 0.5, 2.0]),
            "reference/corrupted": torch.tensor([0.0, 0.25, -0.25, 0.5]),
            "intervened/clean": torch.tensor([3.0, 3.25, 2.0, 3.5]),
            "intervened/corrupted": torch.tensor([0.1, 0.2, -0.1, 0.4]),
        },
        interaction_ci=(1.2, 2.0),
    )


def make_weight_diff() -> WeightDiff:
    rows = [WeightDiffRow("embed", None, None, 40.0, 0.0)]
    for layer in range(2):
        for h in range(2):
            for c in ("head_q", "head_k", "head_v", "head_o"):
                delta = 0.02 * (1 + h + layer) if c != "head_q" or (layer, h) != (1, 0) else 4.0
                rows.append(WeightDiffRow(c, layer, h, 8.0, delta))
        rows.append(WeightDiffRow("mlp", layer, None, 30.0, 0.003 * (layer + 1)))
        rows.append(WeightDiffRow("ln1", layer, None, 5.0, 0.0))
    rows.append(WeightDiffRow("unembed", None, None, 40.0, 0.0005))
    return WeightDiff(tuple(rows), "ref0123456789ab", "itv0123456789ab")


def fixed_patterns() -> tuple[torch.Tensor, torch.Tensor]:
    n = 6
    scores = torch.arange(n * n, dtype=torch.float64).reshape(n, n).sin()
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    ref = scores.masked_fill(mask, -torch.inf).softmax(-1)
    shifted = torch.eye(n, dtype=torch.float64).roll(-1, dims=1) * 3  # previous-token head
    itv = (scores + shifted.T).masked_fill(mask, -torch.inf).softmax(-1)
    return ref.float(), itv.float()


def make_reliability() -> Any:
    """Split-half style agreement of two fixed layer x head grids (no model)."""
    from mechdelta import reliability

    other = make_sweep(("layer", "head"), {"layer": (0, 1, 2), "head": (0, 1, 2, 3)}, seed=0.4)
    return reliability(sweep_layer_head(), other, k=3, labels=("half A", "half B"))


def make_reliability_both() -> Any:
    from mechdelta import reliability

    grid = {"layer": (0, 1, 2), "head": (0, 1, 2, 3)}
    a = BothDirections(sweep_layer_head(R2I), sweep_layer_head(I2R))
    b = BothDirections(
        make_sweep(("layer", "head"), grid, seed=0.4),
        make_sweep(("layer", "head"), grid, I2R, seed=2.3),
    )
    return reliability(a, b, k=3, labels=("half A", "half B"))


FIGURES: dict[str, Any] = {
    "sweep_layer_head": lambda: P.sweep_figure(sweep_layer_head()),
    "sweep_layer_position": lambda: P.sweep_figure(sweep_layer_position()),
    "sweep_layer": lambda: P.sweep_figure(sweep_layer()),
    "sweep_layer_position_head": lambda: P.sweep_figure(sweep_layer_position_head()),
    "sweep_layer_neuron": lambda: P.sweep_figure(sweep_layer_neuron()),
    "both_directions": lambda: P.both_directions_figure(
        BothDirections(sweep_layer_head(R2I), sweep_layer_head(I2R))
    ),
    "both_directions_patch": lambda: P.both_directions_figure(
        BothDirections(make_patch(R2I), make_patch(I2R))
    ),
    "shift": lambda: P.shift_figure(make_shift()),
    "patch": lambda: P.patch_figure(make_patch()),
    "factorial": lambda: P.factorial_figure(make_factorial()),
    "weight_diff": lambda: P.weight_diff_figure(make_weight_diff()),
    "reliability": lambda: P.reliability_figure(make_reliability()),
    "reliability_both": lambda: P.reliability_figure(make_reliability_both()),
    "attention": lambda: P.attention_figure_from_patterns(
        *fixed_patterns(), ["<bos>", "A", " B", " A", " B", " A"], 1, 2
    ),
}


# --- snapshots ---------------------------------------------------------------------------------


def normalised(fig: Any) -> str:
    """The figure JSON, keys sorted, floats to 6 significant digits (last-ulp differences of
    libm/SIMD between machines must not fail a snapshot); plotly's template (its data, not
    ours) left out."""
    obj = json.loads(fig.to_json())
    obj.get("layout", {}).pop("template", None)
    return json.dumps(_round(obj), sort_keys=True, indent=1, ensure_ascii=False)


def _round(o: Any) -> Any:
    if isinstance(o, float):
        return float(f"{o:.6g}")
    if isinstance(o, list):
        return [_round(v) for v in o]
    if isinstance(o, dict):
        return {k: _round(v) for k, v in o.items()}
    return o


def assert_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.json"
    if os.environ.get("MECHDELTA_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        return
    if not path.is_file():
        pytest.fail(
            f"no snapshot {path}; create it with MECHDELTA_UPDATE_SNAPSHOTS=1 pytest {__file__}"
        )
    expected = path.read_text(encoding="utf-8").rstrip("\n")
    if text != expected:
        import difflib

        diff = "\n".join(
            list(
                difflib.unified_diff(
                    expected.splitlines(), text.splitlines(), "snapshot", "now", lineterm=""
                )
            )[:40]
        )
        pytest.fail(
            f"figure {name!r} differs from {path}:\n{diff}\n(if the change is intended, rerun with "
            "MECHDELTA_UPDATE_SNAPSHOTS=1 and review the diff)"
        )


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_matches_snapshot(name: str) -> None:
    first = FIGURES[name]()
    assert normalised(first) == normalised(FIGURES[name]())  # deterministic
    assert first.to_json() == FIGURES[name]().to_json()
    assert first.layout.template.layout.paper_bgcolor == "white"  # plotly_white, set per figure
    assert_snapshot(name, normalised(first))


# --- content -----------------------------------------------------------------------------------


def _colour_ranges(fig: Any) -> list[tuple[float, float, float]]:
    out = []
    for t in fig.data:
        if t.type == "heatmap" and t.zmin is not None:
            out.append((t.zmin, t.zmid, t.zmax))
        if t.type == "bar" and t.marker.cmin is not None:
            out.append((t.marker.cmin, t.marker.cmid, t.marker.cmax))
    diff_axis = fig.layout.to_plotly_json().get("coloraxis2")  # attention differences
    if diff_axis:
        out.append((diff_axis["cmin"], diff_axis["cmid"], diff_axis["cmax"]))
    return out


@pytest.mark.parametrize(
    "name",
    ["sweep_layer_head", "sweep_layer_position", "sweep_layer", "sweep_layer_position_head",
     "sweep_layer_neuron", "both_directions", "attention"],
)  # fmt: skip
def test_score_colours_are_symmetric_and_centred(name: str) -> None:
    ranges = _colour_ranges(FIGURES[name]())
    assert ranges
    for lo, mid, hi in ranges:
        assert mid == 0.0 and lo == -hi and hi > 0
    assert len({r for r in ranges}) == 1  # one shared range across panels


def test_sweep_range_is_max_abs_score_and_hover_names_sites() -> None:
    result = sweep_layer_head()
    fig = P.sweep_figure(result, significance=False)
    (trace,) = fig.data
    assert trace.zmax == pytest.approx(float(result.scores.abs().max()))
    assert len(trace.z) == 3 and len(trace.z[0]) == 4  # layer rows x head columns
    assert trace.customdata[1][2][0] == str(Site("head_out", 1, head=2)) == "L1H2"
    for i, j in [(0, 0), (2, 3)]:
        row = trace.customdata[i][j]
        assert row[1] == pytest.approx(float(result.scores[i, j]))
        assert row[2:4] == pytest.approx(result.ci[i, j].tolist())
        assert row[4] == pytest.approx(float(result.patched[i, j]))
    assert "%{customdata[0]}" in trace.hovertemplate and "CI" in trace.hovertemplate
    assert "patched logit_diff" in trace.hovertemplate
    title = fig.layout.title.text
    assert "head_out" in title and "reference → intervened" in title and "logit_diff" in title
    assert "shift +1.71" in title and "95% CI [+1.4, +2.1]" in title


def test_both_directions_share_one_range() -> None:
    a, b = sweep_layer_head(R2I), sweep_layer_head(I2R)
    fig = P.both_directions_figure(BothDirections(a, b))
    scores = [t for t in fig.data if t.name != "not significant"]  # the grey layers: own tests
    assert [t.type for t in scores] == ["heatmap", "heatmap"]
    m = max(float(a.scores.abs().max()), float(b.scores.abs().max()))
    assert all(t.zmax == pytest.approx(m) for t in scores)
    assert [t.showscale for t in fig.data] == [True, False, False, False]
    titles = [a.text.split("<br>")[0] for a in fig.layout.annotations]
    assert titles == ["reference → intervened", "intervened → reference"]


def _plain(text: str) -> str:
    """Figure text without its markup (line breaks and font tags become spaces)."""
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def test_each_direction_panel_says_what_its_score_means() -> None:
    fig = P.both_directions_figure(BothDirections(sweep_layer_head(R2I), sweep_layer_head(I2R)))
    r2i, i2r = (_plain(a.text) for a in fig.layout.annotations)
    assert r2i.endswith("fraction of the shift undone by restoring the site's reference activation")
    assert i2r.endswith("fraction of the shift carried by the site's intervened activation alone")
    # the single-direction figure says the same in its subtitle
    single = _plain(P.sweep_figure(sweep_layer_head(I2R)).layout.title.text)
    assert "fraction of the shift carried by the site's intervened activation alone" in single
    # facets (a row per head): only the top row of each direction carries the explanation
    grid = {"layer": (0,), "position": (0, 1), "head": (0, 1)}
    dims = ("layer", "position", "head")
    facets = BothDirections(make_sweep(dims, grid), make_sweep(dims, grid, direction=I2R))
    texts = [a.text for a in P.both_directions_figure(facets).layout.annotations]
    assert ["undone" in t or "carried" in t for t in texts] == [True, True, False, False]
    # joint patches: each panel too, and the single patch figure in its title
    patches = P.both_directions_figure(BothDirections(make_patch(R2I), make_patch(I2R)))
    r2i, i2r = (_plain(a.text) for a in patches.layout.annotations)
    assert "shift undone by restoring" in r2i and "shift carried by" in i2r
    assert "shift undone by restoring" in _plain(P.patch_figure(make_patch()).layout.title.text)


def test_shift_panel_y_axis_names_the_metric() -> None:
    fig = P.shift_figure(make_shift())
    assert fig.layout.yaxis.title.text == "logit_diff"
    assert fig.layout.yaxis2.title.text == "shift in logit_diff"


def test_position_labels_show_a_token_only_where_every_prompt_has_it() -> None:
    fig = P.sweep_figure(sweep_layer_position())
    x = list(fig.data[0].x)
    assert len(set(x)) == len(x) == 9
    assert x[:4] == ["0: &lt;|endoftext|&gt;", "1: A", "2", "3"]  # prompts differ at 2 and 3
    assert x[6] == "6:  the" and x[7] == "7: ↵"
    assert fig.layout.xaxis.title.text == "position: token where all 6 prompts agree, else index"
    assert "L2P5.resid_pre" in json.dumps(fig.data[0].customdata)
    dims, coords = ("layer", "position"), {"layer": (0,), "position": (1, 3)}

    def axis(**kw: Any) -> tuple[list[str], str]:
        f = P.sweep_figure(make_sweep(dims, coords, component=Component.RESID_PRE, **kw))
        return list(f.data[0].x), f.layout.xaxis.title.text

    assert axis() == (["1", "3"], "position")
    assert axis(tokens=TOKENS, shared_tokens=TOKENS) == (
        ["1: A", "3:  C"],
        "position: token (the same in all 6 prompts)",
    )
    assert axis(tokens=TOKENS, shared_tokens=(None,) * 9) == (
        ["1", "3"],
        "position (the 6 prompts' tokens differ at every position)",
    )
    # a result stored before shared_tokens existed: prompt 0's tokens, said to be prompt 0's
    assert axis(tokens=TOKENS) == (
        ["1: A", "3:  C"],
        "position: prompt 0's token (scores: mean over 6 prompts)",
    )
    assert P.position_labels([0, 1], ["a", "a"]) == ["0: a", "1: a"]
    assert P.position_labels([0, 1, 5], ["a", None]) == ["0: a", "1", "5"]


def test_one_prompt_labels_positions_with_its_tokens() -> None:
    coords = {"layer": (0,), "position": (0, 1)}
    r = make_sweep(("layer", "position"), coords, component=Component.RESID_PRE)
    one = SweepResult(
        r.component, r.direction, r.dims, r.coords, r.per_prompt[..., :1], r.ci, r.shift,
        tokens=("x", "y"),
    )  # fmt: skip
    fig = P.sweep_figure(one)
    assert list(fig.data[0].x) == ["0: x", "1: y"]
    assert fig.layout.xaxis.title.text == "position: token"


@pytest.mark.parametrize(("n_positions", "text"), [(9, True), (24, True), (25, False), (64, False)])
def test_cell_values_are_printed_only_when_they_fit(n_positions: int, text: bool) -> None:
    result = make_sweep(
        ("layer", "position"),
        {"layer": (0, 1), "position": tuple(range(n_positions))},
        component=Component.RESID_PRE,
    )
    (trace,) = P.sweep_figure(result, significance=False).data
    assert (trace.texttemplate is not None) is text
    assert "%{customdata[1]" in trace.hovertemplate  # the value is always in the hover


def test_long_position_titles_are_written_once_per_row() -> None:
    fig = P.sweep_figure(sweep_layer_position_head())
    titles = [fig.layout[f"xaxis{'' if i == 1 else i}"].title.text for i in (1, 2, 3)]
    assert titles == ["position: prompt 0's token (scores: mean over 6 prompts)", None, None]
    heads = P.both_directions_figure(BothDirections(sweep_layer_head(R2I), sweep_layer_head(I2R)))
    assert [heads.layout.xaxis.title.text, heads.layout.xaxis2.title.text] == ["head", "head"]


def test_by_position_head_sweep_has_one_panel_per_head() -> None:
    fig = P.sweep_figure(sweep_layer_position_head(), significance=False)
    assert len(fig.data) == 3
    assert [a.text for a in fig.layout.annotations] == ["H0", "H2", "H3"]
    assert all(len(t.z) == 2 and len(t.z[0]) == 5 for t in fig.data)
    assert fig.data[1].customdata[1][4][0] == "L1H2P4"


def test_many_neurons_by_position_stack_rows_in_one_panel() -> None:
    result = make_sweep(
        ("layer", "position", "neuron"),
        {"layer": (0, 1), "position": (0, 1, 2), "neuron": tuple(range(20))},
        component=Component.MLP_NEURON,
    )
    (trace,) = P.sweep_figure(result, significance=False).data
    assert len(trace.y) == 40 and trace.y[21] == "L1 N1" and len(trace.x) == 3
    assert trace.customdata[21][2][0] == "L1N1P2"
    assert trace.z[21][2] == pytest.approx(float(result.scores[1, 2, 1]))


def test_nan_scores_give_gaps_and_a_tiny_range() -> None:
    shift = ShiftResult("logit_diff", torch.ones(3), torch.ones(3), (0.0, 0.0))
    result = SweepResult(
        Component.HEAD_OUT, R2I, ("layer", "head"), {"layer": (0,), "head": (0, 1)},
        torch.ones(1, 2, 3), torch.full((1, 2, 2), float("nan")), shift,
    )  # fmt: skip
    fig = P.sweep_figure(result)
    assert [list(r) for r in fig.data[0].z] == [[None, None]]
    assert fig.data[0].zmax == P.EPS
    assert "NaN" not in fig.to_json()


def test_weight_diff_bars_sorted_and_log_scaled() -> None:
    diff = make_weight_diff()
    fig = P.weight_diff_figure(diff)
    order = list(fig.layout.yaxis.categoryarray)
    assert order[0] == "L1H0.head_q"
    values = {y: x for t in fig.data for x, y in zip(t.x, t.y, strict=True)}
    assert [values[k] for k in order] == sorted(values.values(), reverse=True)
    assert len(order) == len(diff.changed())  # unchanged rows are counted, not drawn
    assert fig.layout.xaxis.type == "log"
    assert P.weight_diff_figure(diff, log=False).layout.xaxis.type == "linear"
    assert len(P.weight_diff_figure(diff, top=3).layout.yaxis.categoryarray) == 3
    assert list(diff.figure(top=5).layout.yaxis.categoryarray) == order[:5]
    same = WeightDiff((WeightDiffRow("mlp", 0, None, 1.0, 0.0),), "a", "a")
    assert "identical" in P.weight_diff_figure(same).layout.annotations[0].text


def test_shift_patch_factorial_content() -> None:
    shift = make_shift()
    fig = P.shift_figure(shift)
    ci_trace = next(t for t in fig.data if t.error_y.array is not None)
    assert ci_trace.y[0] == pytest.approx(shift.shift)
    assert ci_trace.y[0] + ci_trace.error_y.array[0] == pytest.approx(shift.ci[1])
    assert ci_trace.y[0] - ci_trace.error_y.arrayminus[0] == pytest.approx(shift.ci[0])
    assert shift.figure().to_json() == fig.to_json()
    patch = P.patch_figure(make_patch())
    assert {t.name for t in patch.data if t.showlegend is not False} >= {
        "reference", "intervened", "patched"
    }  # fmt: skip
    assert "L1H2, L2H0" in patch.layout.title.text
    fac = P.factorial_figure(make_factorial())
    lines = [t for t in fac.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["reference", "intervened"]
    assert "interaction" in fac.layout.title.text


# --- significance overlay and split-half reliability -----------------------------------------


def _overlay(fig: Any) -> list[Any]:
    return [t for t in fig.data if t.name == "not significant"]


def _grey(trace: Any) -> list[list[bool]]:
    return [[v is not None for v in row] for row in trace.z]


def test_sweep_heatmaps_grey_the_sites_that_are_not_significant() -> None:
    result = sweep_layer_head()
    fig = P.sweep_figure(result)
    score, grey = fig.data
    assert grey.name == "not significant" and grey.hoverinfo == "skip"
    assert grey.showscale is False and grey.zmin is None  # not on the score's colour scale
    assert 0 < grey.opacity < 1  # the score's colour shows through, faintly
    expected = (~result.significant(0.05)).tolist()
    assert _grey(grey) == expected and any(map(any, expected)) and not all(map(all, expected))
    # hover: p and q of every site (the overlay layer itself has none)
    assert score.hovertemplate.endswith("<br>%{customdata[6]}<extra></extra>")
    p, q = result.p, result.q
    for i, j in [(0, 0), (2, 3)]:
        text = score.customdata[i][j][6]
        assert text.startswith(f"{format_p(float(p[i, j]), 'p')}, {format_p(float(q[i, j]))}")
        assert text.endswith("(not significant at 0.05)") is bool(expected[i][j])
    title = fig.layout.title.text
    assert "grey: not significant (q ≥ 0.05; sign-flip permutation test over prompts, " in title
    assert "Benjamini-Hochberg-adjusted over 12 sites)" in title
    # another alpha greys another set of cells; significance=False draws the scores alone
    loose = P.sweep_figure(result, alpha=0.5)
    assert _grey(_overlay(loose)[0]) == (~result.significant(0.5)).tolist() != expected
    assert "q ≥ 0.5;" in loose.layout.title.text
    plain = P.sweep_figure(result, significance=False)
    assert len(plain.data) == 1 and "customdata[6]" not in plain.data[0].hovertemplate
    assert "grey" not in plain.layout.title.text
    assert P.sweep_figure(result).to_json() == fig.to_json()  # deterministic
    # a grid where every site is significant has nothing to grey
    assert _overlay(P.sweep_figure(result, alpha=0.999)) == []


def test_layer_bars_fade_and_hatch_the_sites_that_are_not_significant() -> None:
    result = sweep_layer()
    loose = P.sweep_figure(result, alpha=0.1)
    (bars,) = loose.data
    faded = (~result.significant(0.1)).tolist()
    assert faded == [True, False, True, False]
    assert list(bars.marker.opacity) == [0.35 if f else 1.0 for f in faded]
    assert list(bars.marker.pattern.shape) == ["/" if f else "" for f in faded]
    assert P.sweep_figure(result, significance=False).data[0].marker.opacity is None


def test_both_directions_grey_each_direction_on_its_own_grid() -> None:
    a, b = sweep_layer_head(R2I), sweep_layer_head(I2R)
    fig = P.both_directions_figure(BothDirections(a, b))
    greys = _overlay(fig)
    assert [_grey(g) for g in greys] == [
        (~a.significant(0.05)).tolist(),
        (~b.significant(0.05)).tolist(),
    ]
    assert [g.xaxis for g in greys] == ["x", "x2"]  # each over its own direction's panel
    assert fig.layout.title.text.count("grey: not significant") == 1
    plain = P.both_directions_figure(BothDirections(a, b), significance=False)
    assert _overlay(plain) == []


def test_significance_level_must_be_a_level() -> None:
    from mechdelta.errors import ConfigError

    for bad in (0.0, 1.0, 2.0, -0.5):
        with pytest.raises(ConfigError, match="must lie in"):
            P.sweep_figure(sweep_layer_head(), alpha=bad)


def _attribution(verified: bool) -> Any:
    import dataclasses

    from mechdelta import AttributionResult
    from mechdelta.attribution.results import Verification

    sweep = sweep_layer_head()
    fields = {f.name: getattr(sweep, f.name) for f in dataclasses.fields(sweep)}
    result = AttributionResult(**fields, method="atp")
    if verified:
        sites = (Site("head_out", 0, head=1), Site("head_out", 2, head=2))
        rows = [1, 10]  # their flat indices in the 3 x 4 grid
        per = sweep.per_prompt.reshape(12, -1)[rows]
        v = Verification(sites, R2I, "atp", per, per, ("top", "random"), sweep.shift, grid_size=12)
        object.__setattr__(result, "_verification", v)  # as verify() or a stored run sets it
    return result


def test_attribution_estimates_get_no_overlay_and_say_why() -> None:
    fig = P.sweep_figure(_attribution(verified=False))
    assert _overlay(fig) == [] and len(fig.data) == 1
    assert "no significance shading: attribution estimates carry no p-values" in (
        fig.layout.title.text
    )
    assert fig.data[0].customdata[0][0][6].startswith("p, q: none (an estimate, not tested")


def test_verified_attribution_greys_every_site_not_tested_significant() -> None:
    result = _attribution(verified=True)
    fig = P.sweep_figure(result, alpha=0.2)
    grey = _grey(_overlay(fig)[0])
    significant = result.significant(0.2).tolist()
    assert [row for row in grey] == [[not s for s in row] for row in significant]
    assert sum(not g for row in grey for g in row) <= 2  # at most the two verified sites
    assert fig.data[0].customdata[0][0][6] == "p, q: not tested (not verified)"
    assert fig.data[0].customdata[0][1][6].startswith("p = ")
    assert "only the 2 verified sites were tested" in fig.layout.title.text


def test_reliability_figure_plots_one_half_against_the_other() -> None:
    rel = make_reliability()
    fig = P.reliability_figure(rel)
    points = [t for t in fig.data if t.mode == "markers"]
    xs = sorted(x for t in points for x in t.x)
    ys = sorted(y for t in points for y in t.y)
    assert xs == pytest.approx(sorted(rel.scores_a.tolist()))
    assert ys == pytest.approx(sorted(rel.scores_b.tolist()))
    assert sorted(s for t in points for s in t.text) == sorted(rel.sites)
    names = [t.name for t in points]
    assert names[0] == "top-3 in both halves" and "other sites" in names
    both = set(points[0].text)
    top_a = {rel.sites[i] for i in rel.scores_a.abs().argsort(descending=True)[:3].tolist()}
    top_b = {rel.sites[i] for i in rel.scores_b.abs().argsort(descending=True)[:3].tolist()}
    assert both == top_a & top_b and len(both) == round(rel.top_k_overlap * 3)
    (line,) = [t for t in fig.data if t.mode == "lines"]
    assert line.x == line.y and line.x[0] <= xs[0] and line.x[1] >= xs[-1]  # identity
    title = fig.layout.title.text
    assert f"Spearman {rel.spearman:.2f} over 12 sites, top-3 overlap {rel.top_k_overlap:.0%}" in (
        title
    )
    assert fig.layout.xaxis.title.text == "score, half A"
    assert fig.layout.yaxis.title.text == "score, half B"
    assert rel.figure().to_json() == fig.to_json() == P.reliability_figure(rel).to_json()
    # both directions: one panel each, its statistics in its panel title
    pair = make_reliability_both()
    two = P.reliability_figure(pair)
    titles = [a.text for a in two.layout.annotations]
    assert titles[0].startswith("reference → intervened") and "Spearman" in titles[0]
    assert titles[1].startswith("intervened → reference")
    assert {t.xaxis for t in two.data} == {"x", "x2"}
    from mechdelta.errors import ConfigError

    with pytest.raises(ConfigError, match="takes a Reliability"):
        P.reliability_figure({})  # type: ignore[arg-type]


def test_attention_figure_from_a_model(native_pair_factory) -> None:
    from mechdelta import ModelPair

    def perturb(m: Any) -> None:
        m.blocks[1].attn.q.weight.mul_(4.0)

    pair = ModelPair(*native_pair_factory(perturb))
    tokens = torch.tensor([[3, 7, 9, 3, 7, 9, 1]])
    ref, itv = P.attention_patterns(pair, tokens, layer=1, head=2)
    assert ref.shape == itv.shape == (1, 7, 7)
    assert torch.allclose(ref.sum(-1), torch.ones(1, 7), atol=1e-5)
    assert not torch.allclose(ref, itv)
    fig = P.attention_figure(pair, tokens, layer=1, head=2)
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert list(fig.data[0].x) == ["0: 3", "1: 7", "2: 9", "3: 3", "4: 7", "5: 9", "6: 1"]
    assert fig.data[0].z[0][1] is None  # future key: masked
    again = P.attention_figure_from_patterns(
        ref[0], itv[0], ["3", "7", "9", "3", "7", "9", "1"], 1, 2
    )
    assert again.to_json() == fig.to_json()


# --- export ------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _has_browser() -> bool:
    try:
        P.find_browser()
    except ExportError:
        return False
    return True


needs_browser = pytest.mark.skipif(
    not _has_browser(),
    reason="no Chrome/Chromium for kaleido (bash scripts/setup.sh installs it; or set BROWSER_PATH)",
)


@needs_browser
def test_static_export_writes_real_images(tmp_path: Path) -> None:
    figs = {
        "heads": FIGURES["sweep_layer_head"](),
        "tokens": FIGURES["sweep_layer_position"](),
        "attention": FIGURES["attention"](),
    }
    with P.FigureWriter() as writer:
        assert not writer.started
        t0 = time.perf_counter()
        out = P.write_figure(
            figs["heads"], tmp_path / "heads", ("html", "png", "svg"), width=640, height=420
        )
        first = time.perf_counter() - t0
        assert writer.started
        t0 = time.perf_counter()
        writer.write(figs["tokens"], tmp_path / "tokens.png", ("png", "pdf"), width=800, height=500)
        writer.write(figs["attention"], tmp_path / "attention", ("png",))
        warm = (time.perf_counter() - t0) / 2
    assert not writer.started
    assert _png_size(out["png"].read_bytes()) == (640, 420)
    assert _png_size((tmp_path / "tokens.png").read_bytes()) == (800, 500)
    assert _png_size((tmp_path / "attention.png").read_bytes()) == P.figure_size(figs["attention"])
    assert (tmp_path / "tokens.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in out["svg"].read_bytes()[:200]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attention.png",
        "heads.html",
        "heads.png",
        "heads.svg",
        "tokens.pdf",
        "tokens.png",
    ]  # fmt: skip  (no temporary files left behind)
    print(f"static export: first figure {first:.2f} s (browser start), then {warm:.2f} s each")


@needs_browser
def test_static_fallback_renderer_adds_a_png_at_the_figures_size() -> None:
    import base64

    import plotly.io as pio

    fig = FIGURES["both_directions"]()
    renderer = P.StaticFallbackRenderer()
    bundle = renderer.to_mimebundle(fig.to_plotly_json())
    assert list(bundle) == ["image/png"]
    png = base64.b64decode(bundle["image/png"])
    assert _png_size(png) == P.figure_size(fig) == (720, 402)  # 2 title lines: significance
    # registered by a notebook for itself: importing mechdelta changes no plotly setting
    assert "mechdelta_png" not in pio.renderers
    assert "mechdelta_png" not in (pio.renderers.default or "")


def test_static_fallback_renderer_without_a_browser_shows_the_figure_anyway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    renderer = P.StaticFallbackRenderer()
    fig_dict = FIGURES["shift"]().to_plotly_json()
    assert renderer.to_mimebundle(fig_dict) == {}
    note = capsys.readouterr().err
    assert (
        note.startswith("note: figures are shown without a static PNG copy")
        and "BROWSER_PATH" in note
    )
    assert renderer.to_mimebundle(fig_dict) == {}
    assert capsys.readouterr().err == ""  # said once


def test_html_export_needs_no_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    fig = FIGURES["sweep_layer_head"]()
    out = P.write_figure(fig, tmp_path / "fig", ("html", "json"))
    html = out["html"].read_text("utf-8")
    assert '<script src="http' not in html and len(html) > 1_000_000  # plotly.js inlined
    assert 'id="mechdelta-fig"' in html
    assert out["json"].read_text("utf-8").strip() == fig.to_json()
    again = P.write_figure(fig, tmp_path / "fig", ("html",))["html"].read_text("utf-8")
    assert again == html  # deterministic bytes


def test_missing_browser_raises_export_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fig = FIGURES["shift"]()
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(ExportError, match="BROWSER_PATH=.*scripts/setup.sh"):
        P.write_figure(fig, tmp_path / "shift", ("html", "png"))
    assert (tmp_path / "shift.html").is_file()  # the HTML was written before the error
    assert not (tmp_path / "shift.png").exists()
    monkeypatch.delenv("BROWSER_PATH")
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    with pytest.raises(ExportError, match=r"apt install chromium"):
        P.write_figure(fig, tmp_path / "shift", ("svg",))
    with pytest.raises(ExportError, match="unknown figure format"):
        P.write_figure(fig, tmp_path / "shift", ("gif",))


def test_choreographer_decode_noise_is_dropped_and_nothing_else():
    import logging

    from mechdelta.plotting import _export

    _export._kaleido()
    logger = logging.getLogger("choreographer.channels.pipe")
    noise = logger.makeRecord(
        logger.name, logging.ERROR, "x", 1, "JSONError decoding message. Ignoring", (), None
    )
    other = logger.makeRecord(
        logger.name, logging.ERROR, "x", 1, "Error in trying to decode JSON", (), None
    )
    assert not logger.filter(noise)
    assert logger.filter(other)
    _export._kaleido()  # idempotent: one filter
    assert sum(isinstance(f, _export._DropIgnoredBrowserNoise) for f in logger.filters) == 1


def test_the_noise_filter_leaves_choreographers_logger_class_alone():
    """Regression: creating the logger before kaleido's import made it a plain Logger, and
    choreographer's `debug2` calls then failed every static export."""
    import subprocess
    import sys

    code = (
        "import logging; from mechdelta.plotting import _export; _export._kaleido(); "
        "lg = logging.getLogger('choreographer.channels.pipe'); print(hasattr(lg, 'debug2'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr
