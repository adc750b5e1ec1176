"""Reliability of a site ranking: do disjoint halves of the prompts rank the sites alike?

:func:`reliability` compares two results over the same grid (Spearman correlation of their
per-site scores, and the overlap of their top-``k`` sites by |score|); :func:`split_half` runs an
analysis on two disjoint random halves of a task's prompts and compares them. A claims table is
only as good as its ranking's reliability: report both together.

:meth:`Reliability.save` / :meth:`Reliability.load` store one (safetensors + JSON);
:func:`save_reliability` / :func:`load_reliability` also store a mapping direction -> Reliability
(one directory per direction, plus ``both.json`` naming them), as :func:`reliability` returns for
two-direction results.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from mechdelta.core._io import atomic_write_json, load_result, save_result
from mechdelta.errors import ConfigError, ResultFormatError, TaskError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = ["Reliability", "load_reliability", "reliability", "save_reliability", "split_half"]

_KIND = "reliability"
_INDEX = "both.json"


@dataclass(frozen=True, eq=False)
class Reliability:
    """Agreement of two results' site rankings (per direction where both have two).

    ``spearman``: rank correlation of the per-site scores (NaN sites dropped); ``top_k_overlap``:
    ``|top_k(a) ∩ top_k(b)| / k`` by |score|, ``k`` capped at half the compared sites (so the
    overlap can be below 1). ``scores_a`` / ``scores_b`` keep the compared scores
    (flattened, same site order) for the figure; ``sites`` their labels.
    """

    spearman: float
    top_k_overlap: float
    k: int
    n_sites: int
    sites: tuple[str, ...]
    scores_a: Tensor
    scores_b: Tensor
    labels: tuple[str, str] = ("half A", "half B")

    @property
    def summary(self) -> str:
        return (
            f"Spearman {self.spearman:.2f} over {self.n_sites} sites; top-{self.k} overlap "
            f"{self.top_k_overlap:.0%} ({self.labels[0]} vs {self.labels[1]})"
        )

    def __str__(self) -> str:
        return f"reliability: {self.summary}"

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {
                "site": list(self.sites),
                self.labels[0]: self.scores_a.tolist(),
                self.labels[1]: self.scores_b.tolist(),
            }
        )

    def figure(self) -> go.Figure:
        from mechdelta.plotting import reliability_figure

        return reliability_figure(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Store under ``path``: ``result.json`` (statistics, site labels; NaN as null) and the
        two halves' scores as safetensors."""
        meta = {
            "spearman": _nan_to_none(self.spearman),
            "top_k_overlap": _nan_to_none(self.top_k_overlap),
            "k": self.k,
            "n_sites": self.n_sites,
            "sites": list(self.sites),
            "labels": list(self.labels),
        }
        tensors = {"scores_a": self.scores_a.float(), "scores_b": self.scores_b.float()}
        return save_result(path, _KIND, meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Reliability:
        """What :meth:`save` stored; :class:`~mechdelta.errors.ResultFormatError` if invalid."""
        meta, tensors = load_result(path, _KIND)
        try:
            return cls(
                spearman=_none_to_nan(meta["spearman"]),
                top_k_overlap=_none_to_nan(meta["top_k_overlap"]),
                k=int(meta["k"]),
                n_sites=int(meta["n_sites"]),
                sites=tuple(str(x) for x in meta["sites"]),
                scores_a=tensors["scores_a"],
                scores_b=tensors["scores_b"],
                labels=(str(meta["labels"][0]), str(meta["labels"][1])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid reliability: {exc!r}"
            ) from exc


def _nan_to_none(x: float) -> float | None:
    return None if x != x else float(x)


def _none_to_nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _direction_dir(path: Path, direction: str) -> Path:
    return path / direction.replace("->", "_to_")


def save_reliability(
    path: str | os.PathLike[str], rel: Reliability | Mapping[str, Reliability]
) -> None:
    """Store a :class:`Reliability` (as :meth:`Reliability.save`), or a mapping direction ->
    Reliability: each under ``path/<direction>/`` (``->`` written ``_to_``), plus ``both.json``
    naming the directions."""
    root = Path(path)
    if isinstance(rel, Mapping):
        directions = list(rel)
        for direction in directions:
            rel[direction].save(_direction_dir(root, direction))
        atomic_write_json(root / _INDEX, {"kind": _KIND, "directions": directions})
        return
    rel.save(root)


def load_reliability(
    path: str | os.PathLike[str],
) -> Reliability | dict[str, Reliability] | None:
    """What :func:`save_reliability` stored (None when ``path`` holds nothing);
    :class:`~mechdelta.errors.ResultFormatError` if it is damaged."""
    root = Path(path)
    index = root / _INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResultFormatError(
                f"the reliability index {os.fspath(index)!r} is corrupt (not JSON: {exc})"
            ) from None
        if not isinstance(data, dict):
            raise ResultFormatError(f"{os.fspath(index)!r} is corrupt (not a JSON object)")
        directions = data.get("directions")
        if not isinstance(directions, list):
            raise ResultFormatError(f"{os.fspath(index)!r} is corrupt (no directions)")
        return {str(d): Reliability.load(_direction_dir(root, str(d))) for d in directions}
    if (root / "result.json").is_file():
        return Reliability.load(root)
    return None


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    vals, inverse = torch.unique(x, return_inverse=True)
    if len(vals) < len(x):
        sums = torch.zeros(len(vals), dtype=torch.float64).scatter_add_(0, inverse, ranks)
        counts = torch.zeros(len(vals), dtype=torch.float64).scatter_add_(
            0, inverse, torch.ones_like(ranks)
        )
        ranks = (sums / counts)[inverse]
    return ranks


def _spearman(a: Tensor, b: Tensor) -> float:
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return math.nan if denom == 0 else float((ra * rb).sum()) / denom


def _flat(result: Any) -> tuple[list[str], Tensor]:
    from mechdelta.patching.results import SweepResult

    if not isinstance(result, SweepResult):
        raise ConfigError(
            f"reliability compares sweep or attribution grids, got {type(result).__name__}"
        )
    return [str(s) for s in result.sites], result.scores.flatten().double()


def reliability(
    result_a: Any, result_b: Any, *, k: int = 10, labels: tuple[str, str] = ("A", "B")
) -> Reliability | dict[str, Reliability]:
    """Agreement of two results over the same grid; for two :class:`~mechdelta.BothDirections`
    a dict by direction value."""
    from mechdelta.patching.results import BothDirections

    if isinstance(result_a, BothDirections) or isinstance(result_b, BothDirections):
        if not (isinstance(result_a, BothDirections) and isinstance(result_b, BothDirections)):
            raise ConfigError("reliability(): compare two BothDirections or two single results")
        out: dict[str, Reliability] = {}
        for a, b in zip(result_a, result_b, strict=True):
            out[a.direction.value] = cast(Reliability, reliability(a, b, k=k, labels=labels))
        return out
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r}: a positive int")
    sites_a, a = _flat(result_a)
    sites_b, b = _flat(result_b)
    if sites_a != sites_b:
        raise ConfigError(
            "reliability(): the two results cover different grids; run the same analysis "
            "(component, layers, heads, positions) on both"
        )
    ok = ~(torch.isnan(a) | torch.isnan(b))
    names = tuple(s for s, keep in zip(sites_a, ok.tolist(), strict=True) if keep)
    a, b = a[ok], b[ok]
    # at most half the compared sites: top-k of k >= n sites overlaps fully by construction
    kk = min(k, max(1, len(a) // 2))
    top_a = set(torch.argsort(a.abs(), descending=True, stable=True)[:kk].tolist())
    top_b = set(torch.argsort(b.abs(), descending=True, stable=True)[:kk].tolist())
    return Reliability(
        spearman=_spearman(a, b),
        top_k_overlap=(len(top_a & top_b) / kk) if kk else math.nan,
        k=kk,
        n_sites=len(a),
        sites=names,
        scores_a=a.float(),
        scores_b=b.float(),
        labels=labels,
    )


def split_half(
    pair: ModelPair,
    task: Task,
    analysis: Callable[..., Any],
    *,
    k: int = 10,
    seed: int = 0,
    **kwargs: Any,
) -> Reliability | dict[str, Reliability]:
    """Run ``analysis(pair, half, **kwargs)`` on two disjoint random halves of ``task``'s prompts
    (shuffled with ``seed``; an odd prompt out is dropped) and compare the site rankings.

    ``analysis`` is e.g. :func:`~mechdelta.sweep` with ``component=...`` in ``kwargs``, or
    :func:`~mechdelta.attribute`. Needs at least 8 prompts (4 per half).
    """
    n = len(task)
    if n < 8:
        raise TaskError(f"split_half needs at least 8 prompts (4 per half), the task has {n}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    half = n // 2
    first, second = sorted(perm[:half]), sorted(perm[half : 2 * half])
    res_a = analysis(pair, task.subset(first, name=f"{task.name} (half A)"), **kwargs)
    res_b = analysis(pair, task.subset(second, name=f"{task.name} (half B)"), **kwargs)
    return reliability(res_a, res_b, k=k, labels=("half A", "half B"))
