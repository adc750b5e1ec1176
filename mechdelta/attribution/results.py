"""Results of attribution: :class:`AttributionResult` (a sweep grid of *estimated* patched
metrics) and :class:`Verification` (estimates next to exact patches of chosen sites)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.core.directions import Direction
from mechdelta.core.sites import Site
from mechdelta.errors import AttributionError, ConfigError, ResultFormatError
from mechdelta.patching.results import (
    SiteScore,
    SweepResult,
    _cached,
    fraction_explained,
    site_p_values,
)
from mechdelta.patching.shift import _MALFORMED, ShiftResult

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["AttributionResult", "Verification"]


@dataclass(frozen=True, eq=False)
class AttributionResult(SweepResult):
    """A sweep grid whose ``per_prompt`` / :attr:`patched` are *estimated* patched metrics
    (``method``: ``"atp"``, ``"atp*"`` or ``"ig"``; see :func:`~mechdelta.attribute`).

    :meth:`verify` runs exact patches for some sites and compares; scores, intervals and ``top``
    mean what they mean for :class:`~mechdelta.SweepResult`, of the estimates.
    """

    method: str = "atp"
    steps: int | None = None
    graddrop: Float[Tensor, "*grid"] | None = None

    _KIND: ClassVar[str] = "attribution"

    def bind(self, pair: Any, task: Any, *, engine: Any = None) -> None:
        """Keep the pair and task (not stored) so :meth:`verify` can run exact patches."""
        object.__setattr__(self, "_bound", (pair, task, engine))

    @property
    def verification(self) -> Verification | None:
        """The last :meth:`verify` result, if any."""
        return getattr(self, "_verification", None)

    def verify(
        self,
        k: int = 10,
        *,
        random: int | None = None,
        seed: int = 0,
        pair: Any = None,
        task: Any = None,
    ) -> Verification:
        """Exact patches of the top ``k`` sites by |estimate| (by :attr:`graddrop` when it was
        computed) and ``random`` (default ``k``) others
        drawn with ``seed``, side by side with their estimates. A loaded result needs ``pair=``
        and ``task=`` (the ones it was computed on: the prompt hash is checked)."""
        from mechdelta.patching._engine import PatchEngine

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"verify(k={k!r}): k must be a positive int")
        n_random = k if random is None else random
        if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
            raise ConfigError(f"verify(random={random!r}): a non-negative int")
        bound = getattr(self, "_bound", (None, None, None))
        pair = pair if pair is not None else bound[0]
        task = task if task is not None else bound[1]
        engine = bound[2] if pair is bound[0] and task is bound[1] else None
        if pair is None or task is None:
            raise AttributionError(
                "verify() needs the pair and task this result was computed on: "
                "result.verify(k, pair=pair, task=task)"
            )
        if engine is None:
            engine = PatchEngine(pair, task)
            stored = self.provenance.get("task", {}).get("prompt_hash")
            if stored is not None and engine.prepared.prompt_hash() != stored:
                raise AttributionError(
                    "verify(): the task's prompts differ from the ones this result was computed on"
                )
        sites = self.sites
        est = self.per_prompt.reshape(len(sites), -1)
        key = (
            (est.double().mean(1) - self._target_mean()).abs()
            if self.graddrop is None
            else self.graddrop.flatten().double()
        )
        order = torch.argsort(
            torch.nan_to_num(key, nan=-1.0), descending=True, stable=True
        ).tolist()
        top = order[:k]
        rest = order[k:]
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(rest), generator=gen)[:n_random].tolist()
        chosen = top + [rest[i] for i in sorted(pick)]
        exact = engine.run(self.direction, [(sites[i],) for i in chosen], desc="verifying")
        result = Verification(
            sites=tuple(sites[i] for i in chosen),
            direction=self.direction,
            method=self.method,
            estimated=est[chosen].float(),
            exact=exact.float(),
            selected=tuple(["top"] * len(top) + ["random"] * (len(chosen) - len(top))),
            shift=self.shift,
            grid_size=len(sites),
        )
        object.__setattr__(self, "_verification", result)
        self.__dict__.pop("_stats_cache", None)  # p/q follow the new verification
        return result

    @property
    def p(self) -> Float[Tensor, "*grid"]:
        """Per-site p-values of the *exact* patches :meth:`verify` ran (the grid's shape; NaN at
        unverified sites). Estimates are never tested: a first-order estimate is not evidence that
        a splice changes the metric. Raises :class:`~mechdelta.errors.AttributionError` before
        :meth:`verify`."""
        ver = self._verified("p")
        index = {s: i for i, s in enumerate(self.sites)}

        def make() -> Tensor:
            out = torch.full((len(index),), float("nan"), dtype=torch.float64)
            p = site_p_values(ver.exact, self.direction, self.shift, self.testing)
            for site, value in zip(ver.sites, p.tolist(), strict=True):
                out[index[site]] = value
            return out.reshape(self.grid_shape)

        return _cached(self, ("p", self.testing), make)  # type: ignore[no-any-return]

    @property
    def q(self) -> Float[Tensor, "*grid"]:
        """:attr:`p` adjusted with the *whole grid* as the family: every unverified site counts as
        a test with p = 1 (it was not selected, so it is not rejected), so choosing which sites to
        verify from the estimates cannot shrink the correction. NaN at unverified sites."""
        self._verified("q")

        def make() -> Tensor:
            p = self.p
            filled = torch.nan_to_num(p, nan=1.0)
            from mechdelta.stats.testing import adjust

            q = adjust(filled, self.testing.correction)
            return torch.where(torch.isnan(p), p, q)

        return _cached(self, ("q", self.testing), make)  # type: ignore[no-any-return]

    def _verified(self, what: str) -> Verification:
        ver = self.verification
        if ver is None:
            raise AttributionError(
                f"{what}: attribution estimates are not tested; run result.verify(k) first, "
                "which patches the top sites exactly, and their p/q-values are reported"
            )
        return ver

    def _target_mean(self) -> float:
        s = self.shift
        return s.intervened_mean if self.direction.toward_reference else s.reference_mean

    def _stored(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        meta, tensors = super()._stored()
        meta.update(method=self.method, steps=self.steps)
        if self.graddrop is not None:
            tensors["graddrop"] = self.graddrop
        return meta, tensors

    @classmethod
    def _fields(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        return {
            **super()._fields(meta, tensors),
            "method": meta["method"],
            "steps": meta["steps"],
            "graddrop": tensors.get("graddrop"),
        }

    def __str__(self) -> str:
        return f"estimated ({self.method}) " + super().__str__()


@dataclass(frozen=True, eq=False)
class Verification:
    """Estimated and exact patched metrics (per site and prompt) of verified sites.

    ``selected[i]`` says why site i was verified: ``"top"`` (among the top k by |estimate|) or
    ``"random"`` (drawn from the rest, so agreement is not judged on the top alone).
    """

    sites: tuple[Site, ...]
    direction: Direction
    method: str
    estimated: Float[Tensor, "site batch"]
    exact: Float[Tensor, "site batch"]
    selected: tuple[str, ...]
    shift: ShiftResult
    grid_size: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def estimated_scores(self) -> Float[Tensor, " site"]:
        return fraction_explained(
            self.direction, self.shift, self.estimated.double().mean(1)
        ).float()

    @property
    def exact_scores(self) -> Float[Tensor, " site"]:
        return fraction_explained(self.direction, self.shift, self.exact.double().mean(1)).float()

    @property
    def pearson(self) -> float:
        """Pearson correlation of estimated and exact scores over the verified sites."""
        return _pearson(self.estimated_scores.double(), self.exact_scores.double())

    @property
    def spearman(self) -> float:
        """Spearman rank correlation of estimated and exact scores over the verified sites."""
        return _pearson(_ranks(self.estimated_scores), _ranks(self.exact_scores))

    @property
    def max_error(self) -> float:
        """Largest |estimated - exact| score."""
        return float((self.estimated_scores - self.exact_scores).abs().max())

    def recall(self, k: int = 5) -> float:
        """Of the ``k`` verified sites with the largest |exact score|, the fraction that are also
        among the ``k`` largest |estimates| of the verified sites."""
        k = min(k, len(self.sites))
        ex = set(torch.argsort(self.exact_scores.abs(), descending=True)[:k].tolist())
        es = set(torch.argsort(self.estimated_scores.abs(), descending=True)[:k].tolist())
        return len(ex & es) / k

    def top(self, k: int = 10) -> list[SiteScore]:
        """The verified sites ranked by |exact score| (the :meth:`SweepResult.top` interface;
        ``ci`` is NaN: exact patches of single sites carry no interval here)."""
        scores = self.exact_scores
        order = torch.argsort(scores.abs(), descending=True, stable=True)[:k].tolist()
        patched = self.exact.double().mean(1)
        nan = (float("nan"), float("nan"))
        return [SiteScore(self.sites[i], float(scores[i]), nan, float(patched[i])) for i in order]

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {
                "site": [str(s) for s in self.sites],
                "selected": list(self.selected),
                "estimated": self.estimated_scores.tolist(),
                "exact": self.exact_scores.tolist(),
                "error": (self.estimated_scores - self.exact_scores).tolist(),
            }
        )

    def figure(self) -> go.Figure:
        from mechdelta.plotting._attribution import verification_figure

        return verification_figure(self)

    def __str__(self) -> str:
        return (
            f"verified {len(self.sites)} of {self.grid_size} sites ({self.method}, "
            f"{self.direction.value}): Pearson {self.pearson:.3f}, Spearman {self.spearman:.3f}, "
            f"top-5 recall {self.recall(5):.2f}, max |error| {self.max_error:.3g}"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        meta = {
            "sites": [str(s) for s in self.sites],
            "direction": self.direction.value,
            "method": self.method,
            "selected": list(self.selected),
            "grid_size": self.grid_size,
            "shift": self.shift._meta(),
            "provenance": self.provenance,
        }
        tensors = {
            "estimated": self.estimated,
            "exact": self.exact,
            **self.shift._tensors("shift."),
        }
        save_result(path, "verification", meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Verification:
        meta, tensors = load_result(path, "verification")
        try:
            return cls(
                sites=tuple(Site.parse(s) for s in meta["sites"]),
                direction=Direction(meta["direction"]),
                method=meta["method"],
                estimated=tensors["estimated"],
                exact=tensors["exact"],
                selected=tuple(meta["selected"]),
                shift=ShiftResult._from(meta["shift"], tensors, "shift."),
                grid_size=int(meta["grid_size"]),
                provenance=meta.get("provenance", {}),
            )
        except _MALFORMED as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid verification: {exc!r}"
            ) from exc


def _ranks(x: Tensor) -> Tensor:
    return torch.argsort(torch.argsort(x.double(), stable=True)).double()


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")
