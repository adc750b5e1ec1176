"""Results of analyses along a checkpoint series: :class:`SeriesResult` (one sweep or attribution
per pair, trajectories, emergence), :class:`SeriesCircuits` (one circuit search per pair) and
:func:`circuit_membership` (members x checkpoints)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from mechdelta.core._io import load_result, save_result
from mechdelta.core.directions import Direction
from mechdelta.errors import ConfigError, ResultFormatError
from mechdelta.patching.results import SweepResult
from mechdelta.stats.bootstrap import Bootstrap, score_ci

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from mechdelta.circuits.circuit import Circuit

__all__ = ["MODES", "Label", "SeriesCircuits", "SeriesResult", "circuit_membership"]

Label = Union[int, float, str]  # noqa: UP007  (a runtime alias)
MODES = ("reference", "consecutive")
SCALES = ("pair", "series")
_KIND = "series"
_CIRCUITS_KIND = "series_circuits"


def _mode(value: str) -> str:
    text = str(value).strip().lower()
    if text not in MODES:
        raise ConfigError(f"unknown series mode {value!r}; use 'reference' or 'consecutive'")
    return text


def _scale(value: str) -> str:
    if value not in SCALES:
        raise ConfigError(f"unknown scale {value!r}; use 'pair' or 'series'")
    return value


@dataclass(frozen=True, eq=False)
class SeriesResult:
    """One sweep or attribution result per pair of a series, in series order.

    ``labels[k]`` labels ``results[k]`` (its intervened checkpoint); ``pair_labels[k]`` is its
    ``(reference, intervened)`` checkpoint labels; ``kind`` is ``"sweep"`` or ``"attribution"``.
    """

    kind: str
    mode: str
    labels: tuple[Label, ...]
    pair_labels: tuple[tuple[Label, Label], ...]
    results: tuple[SweepResult, ...]
    checkpoints: tuple[Label, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.pair_labels) == len(self.results) > 0:
            raise ResultFormatError("a series result needs one label and pair label per result")
        grids = {  # coords in any key order (a loaded result's are sorted by name)
            (r.component, r.dims, tuple(sorted((k, tuple(v)) for k, v in r.coords.items())))
            for r in self.results
        }
        if len(grids) != 1:
            raise ResultFormatError("the results of a series must share one grid")
        held = list(dict.fromkeys(x for p in self.pair_labels for x in p))
        if not self.checkpoints:
            object.__setattr__(self, "checkpoints", tuple(held))
        elif set(held) - set(self.checkpoints):
            raise ResultFormatError(f"pairs name checkpoints {held} beyond {self.checkpoints}")

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[SweepResult]:
        return iter(self.results)

    def __getitem__(self, label: Label) -> SweepResult:
        try:
            return self.results[self.labels.index(label)]
        except ValueError:
            raise KeyError(f"no pair labelled {label!r}; labels: {list(self.labels)}") from None

    @property
    def direction(self) -> Direction:
        return self.results[0].direction

    @property
    def sites(self) -> list[str]:
        return [str(s) for s in self.results[0].sites]

    @property
    def scores(self) -> torch.Tensor:
        """Scores, shape ``(pairs, sites)`` (sites flattened row-major over the grid)."""
        return torch.stack([r.scores.flatten() for r in self.results])

    def cis(self, alpha: float | None = None) -> torch.Tensor:
        """Score CIs, shape ``(pairs, sites, 2)``: as stored (``alpha=None`` or the stored alpha),
        else recomputed at ``1 - alpha`` from the stored per-prompt values (same resamples)."""
        out = []
        for r in self.results:
            if alpha is None or alpha == r.shift.alpha:
                out.append(r.ci.reshape(-1, 2).float())
                continue
            flat = r.per_prompt.reshape(-1, r.per_prompt.shape[-1])
            toward = r.direction.toward_reference
            out.append(score_ci(r.shift.reference, r.shift.intervened, flat, self._boot(alpha),
                                toward_reference=toward))  # fmt: skip
        return torch.stack(out)

    def _boot(self, alpha: float | None) -> Bootstrap:
        r = self.results[0]
        a = r.shift.alpha if alpha is None else alpha
        return Bootstrap(r.shift.n_boot, a, int(r.provenance.get("seed", 0)))

    def metrics(self) -> dict[Label, torch.Tensor]:
        """The task metric per prompt of every checkpoint the pairs hold, by label."""
        out: dict[Label, torch.Tensor] = {}
        for (ref, itv), r in zip(self.pair_labels, self.results, strict=True):
            out.setdefault(ref, r.shift.reference)
            out.setdefault(itv, r.shift.intervened)
        return out

    def scored(
        self, alpha: float | None = None, scale: str = "pair"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, cis)`` of shapes ``(pairs, sites)`` and ``(pairs, sites, 2)``.

        ``scale="pair"``: the stored scores, each a fraction of its own pair's shift.
        ``scale="series"``: each site's effect (the score's numerator, in metric units) divided
        by the *series' shift*, ``mean metric(last checkpoint) - mean metric(first
        checkpoint)``, so all pairs share one unit; the CI resamples prompts jointly (the same
        bootstrap weights for the effect and the series' shift).
        """
        if _scale(scale) == "pair":
            return self.scores, self.cis(alpha)
        metrics, order = self.metrics(), self.checkpoints
        first, last = metrics[order[0]].double(), metrics[order[-1]].double()
        boot = self._boot(alpha)
        w = boot.weights(first.shape[0])
        denom_b, denom = w @ (last - first), float((last - first).mean())
        scores, cis = [], []
        for r in self.results:
            if r.per_prompt.shape[-1] != first.shape[0]:
                raise ConfigError("scale='series' needs one task (the same prompts) in every pair")
            flat = r.per_prompt.reshape(-1, r.per_prompt.shape[-1]).double()
            ref, itv = r.shift.reference.double(), r.shift.intervened.double()
            toward = r.direction.toward_reference
            num_b = (w @ itv - flat @ w.T) if toward else (flat @ w.T - w @ ref)
            num = (itv.mean() - flat.mean(-1)) if toward else (flat.mean(-1) - ref.mean())
            samples = torch.where(denom_b == 0, torch.nan, num_b / denom_b)
            scores.append((num / denom if denom != 0 else num * torch.nan).float())
            cis.append(boot.interval(samples).float())
        return torch.stack(scores), torch.stack(cis)

    def trajectories(self, alpha: float | None = None, scale: str = "pair") -> pd.DataFrame:
        """Long table: ``label, reference, intervened, site, score, ci_low, ci_high`` (scores
        and CIs as :meth:`scored` gives them)."""
        import pandas as pd

        scores, cis = self.scored(alpha, scale)
        rows = [
            {
                "label": lab,
                "reference": pl[0],
                "intervened": pl[1],
                "site": site,
                "score": float(scores[k, j]),
                "ci_low": float(cis[k, j, 0]),
                "ci_high": float(cis[k, j, 1]),
            }
            for k, (lab, pl) in enumerate(zip(self.labels, self.pair_labels, strict=True))
            for j, site in enumerate(self.sites)
        ]
        return pd.DataFrame(rows)

    def emergence(
        self, alpha: float = 0.05, *, threshold: float = 0.0, scale: str = "pair"
    ) -> dict[str, Label | None]:
        """Per site, the label of the first pair (in series order) whose ``1 - alpha`` score CI
        lies entirely outside ``[-threshold, threshold]`` (``threshold=0``: excludes 0), else
        None. Scores and CIs as :meth:`scored` gives them for ``scale``.

        In ``"reference"`` mode: the first checkpoint at which patching the site between it and
        the reference checkpoint moves a significant part of the shift (either sign); the
        reference itself is never a candidate. Pairs whose shift is ~0 get wide (or NaN) CIs
        under ``scale="pair"`` and so do not count. In ``"consecutive"`` mode: the first step
        whose own change the site significantly carries.

        Significance alone does not see a phase change when the sites also carry the gradual
        change before it (they do in the zoo's induction series): use ``scale="series"`` with a
        ``threshold`` (a fraction of the whole series' shift) to ask when a site's effect first
        becomes *large*.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise ConfigError(f"threshold must be a number >= 0, got {threshold!r}")
        _, cis = self.scored(alpha, scale)
        out: dict[str, Label | None] = {}
        for j, site in enumerate(self.sites):
            low, high = cis[:, j, 0], cis[:, j, 1]
            hit = ((low > threshold) | (high < -threshold)).tolist()
            out[site] = next((lab for lab, h in zip(self.labels, hit, strict=True) if h), None)
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """Every pair's ``to_dataframe()`` rows, with ``label``, ``reference``, ``intervened``."""
        import pandas as pd

        frames = []
        for lab, pl, r in zip(self.labels, self.pair_labels, self.results, strict=True):
            df = r.to_dataframe()
            df.insert(0, "intervened", [pl[1]] * len(df))
            df.insert(0, "reference", [pl[0]] * len(df))
            df.insert(0, "label", [lab] * len(df))
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def figure(self, top: int = 6, alpha: float | None = None, scale: str = "pair") -> go.Figure:
        """Score trajectories of the ``top`` sites (by largest |score| at any pair), CI bands."""
        from mechdelta.plotting._series import trajectory_figure

        return trajectory_figure(self, top=top, alpha=alpha, scale=scale)

    def __str__(self) -> str:
        head = f"{self.kind} series ({self.mode} mode, {self.direction.value}), {len(self)} pairs"
        lines = [head]
        for lab, r in zip(self.labels, self.results, strict=True):
            best = r.top(1)[0]
            lines.append(f"  {lab!s:>8}  shift {r.shift.shift:+.4g}  top {best}")
        return "\n".join(lines)

    # --- storage ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """A directory: one subdirectory per pair result, then ``meta`` (safetensors + JSON)."""
        root = Path(path)
        for k, r in enumerate(self.results):
            r.save(root / f"pair_{k:03d}")
        meta = {
            "series_kind": self.kind,
            "mode": self.mode,
            "labels": list(self.labels),
            "pair_labels": [list(p) for p in self.pair_labels],
            "checkpoints": list(self.checkpoints),
            "provenance": self.provenance,
        }
        save_result(root, _KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SeriesResult:
        from mechdelta.attribution.results import AttributionResult

        root = Path(path)
        meta, _ = load_result(root, _KIND)
        try:
            kind = meta["series_kind"]
            loader = {"sweep": SweepResult, "attribution": AttributionResult}[kind]
            labels = tuple(meta["labels"])
            results = tuple(loader.load(root / f"pair_{k:03d}") for k in range(len(labels)))
            return cls(
                kind=kind,
                mode=_mode(meta["mode"]),
                labels=labels,
                pair_labels=tuple((p[0], p[1]) for p in meta["pair_labels"]),
                results=results,
                checkpoints=tuple(meta.get("checkpoints", ())),
                provenance=meta.get("provenance", {}),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            if isinstance(exc, ResultFormatError):
                raise
            raise ResultFormatError(f"{os.fspath(path)!r} is not a valid series: {exc!r}") from exc


@dataclass(frozen=True, eq=False)
class SeriesCircuits:
    """One circuit search per pair of a series (:meth:`CheckpointSeries.search_circuit
    <mechdelta.circuits.CheckpointSeries.search_circuit>`), in series order.

    ``labels[k]`` labels ``circuits[k]`` (its intervened checkpoint: the non-reference one in
    ``"reference"`` mode, the later one in ``"consecutive"`` mode); ``pair_labels[k]`` is its
    ``(reference, intervened)`` checkpoint labels. Every circuit is a search of one level,
    semantics, method, direction and target, each on its own pair: its faithfulness is the
    fraction of *that pair's* mean shift its hybrid run moves.
    """

    mode: str
    labels: tuple[Label, ...]
    pair_labels: tuple[tuple[Label, Label], ...]
    circuits: tuple[Circuit, ...]
    checkpoints: tuple[Label, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.pair_labels) == len(self.circuits) > 0:
            raise ResultFormatError(
                "a series of circuits needs one label and pair label per circuit"
            )
        _mode(self.mode)
        kinds = {(c.level, c.semantics, c.method, c.direction, c.target) for c in self.circuits}
        if len(kinds) != 1:
            raise ResultFormatError(
                "the circuits of a series must share level, semantics, method, direction and "
                f"target; got {sorted(str(k) for k in kinds)}"
            )
        if not self.checkpoints:
            held = tuple(dict.fromkeys(x for p in self.pair_labels for x in p))
            object.__setattr__(self, "checkpoints", held)

    @classmethod
    def from_dict(
        cls,
        circuits: Mapping[Label, Circuit],
        pair_labels: tuple[tuple[Label, Label], ...],
        mode: str,
        checkpoints: tuple[Label, ...] = (),
    ) -> SeriesCircuits:
        """From :meth:`CheckpointSeries.search_circuit`'s dict (label -> circuit)."""
        return cls(_mode(mode), tuple(circuits), pair_labels, tuple(circuits.values()), checkpoints)

    def __len__(self) -> int:
        return len(self.circuits)

    def __iter__(self) -> Iterator[Circuit]:
        return iter(self.circuits)

    def __getitem__(self, label: Label) -> Circuit:
        try:
            return self.circuits[self.labels.index(label)]
        except ValueError:
            raise KeyError(f"no pair labelled {label!r}; labels: {list(self.labels)}") from None

    def as_dict(self) -> dict[Label, Circuit]:
        """Label -> circuit (what :meth:`CheckpointSeries.search_circuit` returns)."""
        return dict(zip(self.labels, self.circuits, strict=True))

    @property
    def direction(self) -> Direction:
        return self.circuits[0].direction

    def membership(self, values: str = "member") -> pd.DataFrame:
        """Members x labels (:func:`circuit_membership`)."""
        return circuit_membership(self.as_dict(), values)

    def to_dataframe(self) -> pd.DataFrame:
        """Every circuit's member rows (``Circuit.to_dataframe()``), with ``label``,
        ``reference``, ``intervened``, and the circuit's ``faithfulness`` and ``reached``."""
        import pandas as pd

        frames = []
        for lab, pl, c in zip(self.labels, self.pair_labels, self.circuits, strict=True):
            df = c.to_dataframe()
            if df.empty:  # an empty circuit still gets its row
                df = pd.DataFrame({"member": [None], "minimality": [float("nan")]})
            for i, (col, v) in enumerate(
                (("label", lab), ("reference", pl[0]), ("intervened", pl[1]),
                 ("faithfulness", c.faithfulness), ("reached", c.reached))
            ):  # fmt: skip
                df.insert(i, col, [v] * len(df))
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def figure(self) -> go.Figure:
        """Circuit membership over the series (:func:`~mechdelta.plotting.membership_figure`)."""
        from mechdelta.plotting._series import membership_figure

        return membership_figure(self.as_dict())

    def __str__(self) -> str:
        c0 = self.circuits[0]
        lines = [
            f"{c0.level}-level {c0.semantics} circuits ({c0.method}) over a series ({self.mode} "
            f"mode, {self.direction.value}), {len(self)} pairs"
        ]
        for lab, c in zip(self.labels, self.circuits, strict=True):
            lines.append(
                f"  {lab!s:>8}  {len(c)} members, faithfulness {c.faithfulness:+.3f}"
                f"{'' if c.reached else ' (target not reached)'}"
            )
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> None:
        """A directory: one subdirectory per circuit, then ``meta`` (safetensors + JSON)."""
        root = Path(path)
        for k, c in enumerate(self.circuits):
            c.save(root / f"pair_{k:03d}")
        meta = {
            "mode": self.mode,
            "labels": list(self.labels),
            "pair_labels": [list(p) for p in self.pair_labels],
            "checkpoints": list(self.checkpoints),
            "provenance": self.provenance,
        }
        save_result(root, _CIRCUITS_KIND, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SeriesCircuits:
        from mechdelta.circuits.circuit import Circuit

        root = Path(path)
        meta, _ = load_result(root, _CIRCUITS_KIND)
        try:
            labels = tuple(meta["labels"])
            return cls(
                mode=_mode(meta["mode"]),
                labels=labels,
                pair_labels=tuple((p[0], p[1]) for p in meta["pair_labels"]),
                circuits=tuple(Circuit.load(root / f"pair_{k:03d}") for k in range(len(labels))),
                checkpoints=tuple(meta.get("checkpoints", ())),
                provenance=meta.get("provenance", {}),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            if isinstance(exc, ResultFormatError):
                raise
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid series of circuits: {exc!r}"
            ) from exc


def circuit_membership(circuits: Mapping[Label, Circuit], values: str = "member") -> pd.DataFrame:
    """Members x labels for circuits keyed by label (e.g. :meth:`CheckpointSeries.search_circuit`).

    ``values="member"``: 1.0 where the member is in that circuit, else 0.0; ``"minimality"``:
    its drop-one loss there (NaN where it is not a member, or was not measured). Rows in order of
    first appearance; columns = the labels. Circuits of different levels raise ConfigError.
    """
    import pandas as pd

    if values not in ("member", "minimality"):
        raise ConfigError(f"values must be 'member' or 'minimality', got {values!r}")
    levels = {c.level for c in circuits.values()}
    if len(levels) > 1:
        raise ConfigError(f"circuits of different levels {sorted(levels)} share no members")
    order: dict[str, None] = {}
    table: dict[Label, dict[str, float]] = {}
    for lab, c in circuits.items():
        table[lab] = dict(zip(c.names, c.minimality, strict=True))
        order.update(dict.fromkeys(c.names))
    absent = 0.0 if values == "member" else float("nan")
    data = {
        lab: [
            absent if m not in table[lab] else 1.0 if values == "member" else table[lab][m]
            for m in order
        ]
        for lab in circuits
    }
    return pd.DataFrame(data, index=pd.Index(list(order), name="member"))
