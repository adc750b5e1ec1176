"""Patching results: one joint patch, a sweep over a grid of sites, and both directions.

Results are plain data (tensors + metadata) with ``.to_dataframe()``, ``.figure()`` (plotly, from
:mod:`mechdelta.plotting`), ``.save()`` / ``.load()`` (safetensors + JSON, never pickle) and the
provenance of the run. Grids are row-major over ``dims``; ``coords[dim]`` holds each axis' values.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import atomic_write_json, load_result, save_result
from mechdelta.core.directions import Direction
from mechdelta.core.sites import Component, Site
from mechdelta.errors import ConfigError, ResultFormatError
from mechdelta.patching.shift import _MALFORMED, ShiftResult
from mechdelta.stats.testing import SiteTest, adjust, p_values

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["BothDirections", "PatchResult", "SiteScore", "SweepResult"]

_Self = TypeVar("_Self")


def target_metric(direction: Direction, shift: ShiftResult) -> Tensor:
    """The target model's clean metric per prompt (the run a splice in ``direction`` edits)."""
    return shift.intervened if direction.toward_reference else shift.reference


def site_p_values(
    per_prompt: Tensor,
    direction: Direction,
    shift: ShiftResult,
    spec: SiteTest,
    unchanged: Tensor | None = None,
) -> Tensor:
    """Per-site p-values (float64, shape ``per_prompt.shape[:-1]``) of "the splice changes the
    target's metric", from the paired differences ``patched - target`` over prompts; 1 where the
    spliced activations equal the target's (``unchanged``: activation delta exactly 0)."""
    grid = per_prompt.shape[:-1]
    diffs = per_prompt.double().reshape(-1, per_prompt.shape[-1]) - target_metric(
        direction, shift
    ).double().unsqueeze(0)
    p = p_values(diffs, spec)
    if unchanged is not None:
        p = torch.where(unchanged.flatten().to(torch.bool), torch.ones_like(p), p)
    return p.reshape(grid)


def _cached(obj: object, key: tuple[Any, ...], make: Any) -> Any:
    """A value computed once per frozen result (results are immutable)."""
    cache: dict[tuple[Any, ...], Any] = obj.__dict__.setdefault("_stats_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _with_testing(result: _Self, spec: SiteTest) -> _Self:
    """A copy of ``result`` with other test settings (private runtime state carried over)."""
    import dataclasses

    new = dataclasses.replace(result, testing=spec)  # type: ignore[type-var]
    for name in ("_bound", "_verification"):
        if name in result.__dict__:
            object.__setattr__(new, name, result.__dict__[name])
    return new


def fraction_explained(direction: Direction, shift: ShiftResult, patched: Tensor) -> Tensor:
    """Score of patched means: the fraction of the shift the patch explains (NaN if no shift)."""
    m_r, m_i = shift.reference_mean, shift.intervened_mean
    denom = m_i - m_r
    if denom == 0:
        return torch.full_like(patched, float("nan"))
    if direction.toward_reference:
        return (m_i - patched.double()) / denom
    return (patched.double() - m_r) / denom


@dataclass(frozen=True)
class SiteScore:
    """One row of :meth:`SweepResult.top`."""

    site: Site
    score: float
    ci: tuple[float, float]
    patched: float

    def __repr__(self) -> str:
        return (
            f"SiteScore({self.site}, score={self.score:+.4g}, "
            f"ci=[{self.ci[0]:+.4g}, {self.ci[1]:+.4g}], patched={self.patched:.4g})"
        )

    def __str__(self) -> str:
        return f"{self.site!s:>16}  score {self.score:+.3f}  [{self.ci[0]:+.3f}, {self.ci[1]:+.3f}]"


@dataclass(frozen=True, eq=False)
class PatchResult:
    """A joint patch of ``sites`` in one ``direction``: the patched metric per prompt and score."""

    sites: tuple[Site, ...]
    direction: Direction
    per_prompt: Float[Tensor, " batch"]
    ci: tuple[float, float]
    shift: ShiftResult
    activation_delta: tuple[float, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    testing: SiteTest = field(default_factory=SiteTest)

    @property
    def patched(self) -> float:
        return float(self.per_prompt.double().mean())

    @property
    def p(self) -> float:
        """p-value of "this joint splice changes the target's metric" (paired test over
        prompts, :attr:`testing`); 1 when every spliced activation equals the target's."""

        def make() -> float:
            unchanged = (
                torch.tensor([all(d == 0.0 for d in self.activation_delta)])
                if self.activation_delta
                else None
            )
            return float(
                site_p_values(
                    self.per_prompt[None], self.direction, self.shift, self.testing, unchanged
                )[0]
            )

        return float(_cached(self, ("p", self.testing), make))

    @property
    def q(self) -> float:
        """The adjusted p-value: one test, so equal to :attr:`p`."""
        return self.p

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether ``q < alpha``."""
        return bool(self.q < alpha)

    def tested(
        self,
        test: str = "signflip",
        *,
        correction: str = "bh",
        n_resamples: int = 10_000,
        seed: int = 0,
    ) -> PatchResult:
        """The same result with p/q from another test (``"signflip"`` or ``"bootstrap"``)."""
        return _with_testing(self, SiteTest(test, correction, n_resamples, seed))

    @property
    def score(self) -> float:
        return float(fraction_explained(self.direction, self.shift, torch.tensor(self.patched)))

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {
                "prompt": range(len(self.per_prompt)),
                "reference": self.shift.reference.tolist(),
                "intervened": self.shift.intervened.tolist(),
                "patched": self.per_prompt.tolist(),
            }
        )

    def figure(self) -> go.Figure:
        from mechdelta.plotting import patch_figure

        return patch_figure(self)

    def __str__(self) -> str:
        names = ", ".join(str(s) for s in self.sites) or "(no sites)"
        semantics = self.provenance.get("semantics")
        what = "patch"
        if self.provenance.get("edges") is not None:
            edges = self.provenance["edges"]
            what, names = f"edge patch ({semantics})", f"{len(edges)} edges"
        elif semantics == "graft":
            what = "graft"
            names = ", ".join(self.provenance.get("components", [])) or names
        return (
            f"{what} {self.direction.value} of {names}: {self.shift.metric} "
            f"{self.patched:.4g} (reference {self.shift.reference_mean:.4g}, intervened "
            f"{self.shift.intervened_mean:.4g}); score {self.score:+.3f} "
            f"[{self.ci[0]:+.3f}, {self.ci[1]:+.3f}]"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {"patched": self.per_prompt, **self.shift._tensors("shift.")}
        meta = {
            "sites": [str(s) for s in self.sites],
            "direction": self.direction.value,
            "ci": list(self.ci),
            "activation_delta": list(self.activation_delta),
            "shift": self.shift._meta(),
            "provenance": self.provenance,
            "testing": self.testing.to_json(),
        }
        save_result(path, "patch", meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatchResult:
        meta, tensors = load_result(path, "patch")
        try:
            return cls(
                sites=tuple(Site.parse(s) for s in meta["sites"]),
                direction=Direction(meta["direction"]),
                per_prompt=tensors["patched"],
                ci=(float(meta["ci"][0]), float(meta["ci"][1])),
                shift=ShiftResult._from(meta["shift"], tensors, "shift."),
                activation_delta=tuple(meta.get("activation_delta", ())),
                provenance=meta.get("provenance", {}),
                testing=SiteTest.from_json(meta.get("testing")),
            )
        except _MALFORMED as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid patch result: {exc!r}"
            ) from exc


_Sweep = TypeVar("_Sweep", bound="SweepResult")


@dataclass(frozen=True, eq=False)
class SweepResult:
    """One patch per site over a grid (``dims``), in one direction.

    ``per_prompt`` has shape ``grid + (batch,)``, ``ci`` ``grid + (2,)``; :attr:`patched` and
    :attr:`scores` have the grid's shape. ``tokens`` holds prompt 0's tokens along the position axis;
    ``shared_tokens`` per position the token every prompt has there (None where they differ; the
    field is None for results stored before it existed).
    """

    component: Component
    direction: Direction
    dims: tuple[str, ...]
    coords: dict[str, tuple[int, ...]]
    per_prompt: Float[Tensor, "*grid batch"]
    ci: Float[Tensor, "*grid 2"]
    shift: ShiftResult
    activation_delta: Float[Tensor, "*grid"] | None = None
    tokens: tuple[str, ...] | None = None
    shared_tokens: tuple[str | None, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    testing: SiteTest = field(default_factory=SiteTest)

    def __post_init__(self) -> None:
        grid = tuple(len(self.coords[d]) for d in self.dims)
        if tuple(self.per_prompt.shape[:-1]) != grid or tuple(self.ci.shape) != (*grid, 2):
            raise ResultFormatError(
                f"sweep arrays do not match the grid {dict(zip(self.dims, grid, strict=True))}: "
                f"per_prompt {tuple(self.per_prompt.shape)}, ci {tuple(self.ci.shape)}"
            )

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)

    @property
    def patched(self) -> Float[Tensor, "*grid"]:
        """Mean patched metric per site."""
        return self.per_prompt.double().mean(-1).float()

    @property
    def scores(self) -> Float[Tensor, "*grid"]:
        """Fraction of the shift explained per site (see :class:`~mechdelta.Direction`)."""
        # From the double-precision means (not the float32 ``patched``), so a site whose patch
        # leaves every prompt's metric unchanged scores exactly 0.
        means = self.per_prompt.double().mean(-1)
        return fraction_explained(self.direction, self.shift, means).float()

    @property
    def p(self) -> Float[Tensor, "*grid"]:
        """Per-site p-value (float64, the grid's shape) of "this splice changes the target's
        metric": a paired test over prompts of ``patched - target`` (:attr:`testing`: sign-flip
        permutation by default, see :mod:`mechdelta.stats.testing`); 1 where the spliced
        activations equal the target's."""
        unchanged = None if self.activation_delta is None else self.activation_delta == 0
        return _cached(  # type: ignore[no-any-return]
            self,
            ("p", self.testing),
            lambda: site_p_values(
                self.per_prompt, self.direction, self.shift, self.testing, unchanged
            ),
        )

    @property
    def q(self) -> Float[Tensor, "*grid"]:
        """:attr:`p` adjusted across the grid (Benjamini-Hochberg by default; Holm with
        ``tested(correction="holm")``). Sites whose spliced activations equal the target's are
        true nulls by construction, known before any metric is read: they get q = 1 and are not
        counted in the family."""

        def make() -> Tensor:
            p = self.p
            if self.activation_delta is None:
                return adjust(p, self.testing.correction)
            unchanged = self.activation_delta.reshape(p.shape) == 0
            q = adjust(torch.where(unchanged, torch.full_like(p, float("nan")), p),
                       self.testing.correction)  # fmt: skip
            return torch.where(unchanged & ~torch.isnan(p), torch.ones_like(q), q)

        return _cached(self, ("q", self.testing), make)  # type: ignore[no-any-return]

    def significant(self, alpha: float = 0.05) -> Tensor:
        """Boolean grid: ``q < alpha`` (NaN q: False)."""
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"significant(alpha={alpha!r}): alpha must lie in (0, 1)")
        return torch.nan_to_num(self.q, nan=1.0) < alpha

    def tested(
        self: _Sweep,
        test: str = "signflip",
        *,
        correction: str = "bh",
        n_resamples: int = 10_000,
        seed: int = 0,
    ) -> _Sweep:
        """The same result with p/q from another test (``"signflip"`` or ``"bootstrap"``) or
        correction (``"bh"`` or ``"holm"``)."""
        return _with_testing(self, SiteTest(test, correction, n_resamples, seed))

    @property
    def sites(self) -> list[Site]:
        """Every site of the grid, row-major over ``dims``."""
        return [self._site(dict(zip(self.dims, vals, strict=True))) for vals in self._coord_rows()]

    def _coord_rows(self) -> Iterator[tuple[int, ...]]:
        return itertools.product(*(self.coords[d] for d in self.dims))

    def _site(self, at: dict[str, int]) -> Site:
        return Site(
            self.component,
            at.get("layer", 0),
            head=at.get("head"),
            position=at.get("position"),
            neuron=at.get("neuron"),
        )

    def top(self, k: int = 10, *, by: str = "abs") -> list[SiteScore]:
        """The ``k`` sites with the largest score (``by="abs"``: largest magnitude, ``"signed"``:
        largest signed score)."""
        if by not in ("abs", "signed"):
            raise ConfigError(f"top(by={by!r}): use 'abs' (largest magnitude) or 'signed'")
        flat = self.scores.flatten()
        key = flat.abs() if by == "abs" else flat
        key = torch.nan_to_num(key, nan=-float("inf"))
        order = torch.argsort(key, descending=True, stable=True)[:k].tolist()
        sites, ci, patched = self.sites, self.ci.reshape(-1, 2), self.patched.flatten()
        return [
            SiteScore(
                sites[i], float(flat[i]), (float(ci[i, 0]), float(ci[i, 1])), float(patched[i])
            )
            for i in order
        ]

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        ci = self.ci.reshape(-1, 2)
        delta = None if self.activation_delta is None else self.activation_delta.flatten()
        rows = []
        for i, (site, score, patched) in enumerate(
            zip(
                self.sites,
                self.scores.flatten().tolist(),
                self.patched.flatten().tolist(),
                strict=True,
            )
        ):
            rows.append(
                {
                    "site": str(site),
                    "component": site.kind.value,
                    "layer": site.layer,
                    "head": site.head,
                    "position": site.position,
                    "neuron": site.neuron,
                    "direction": self.direction.value,
                    "score": score,
                    "ci_low": float(ci[i, 0]),
                    "ci_high": float(ci[i, 1]),
                    "patched": patched,
                    "activation_delta": None if delta is None else float(delta[i]),
                }
            )
        return pd.DataFrame(rows)

    def figure(self) -> go.Figure:
        from mechdelta.plotting import sweep_figure

        return sweep_figure(self)

    def __str__(self) -> str:
        grid = " x ".join(f"{d} {len(self.coords[d])}" for d in self.dims)
        best = "\n".join(f"  {row}" for row in self.top(5))
        return (
            f"sweep {self.component.value} {self.direction.value} over {grid}\n"
            f"  {self.shift}\n{best}"
        )

    _KIND: ClassVar[str] = "sweep"

    def _stored(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The JSON metadata and tensors :meth:`save` writes (subclasses extend both)."""
        tensors = {"per_prompt": self.per_prompt, "ci": self.ci, **self.shift._tensors("shift.")}
        if self.activation_delta is not None:
            tensors["activation_delta"] = self.activation_delta
        meta = {
            "component": self.component.value,
            "direction": self.direction.value,
            "dims": list(self.dims),
            "coords": {k: list(v) for k, v in self.coords.items()},
            "tokens": None if self.tokens is None else list(self.tokens),
            "shared_tokens": None if self.shared_tokens is None else list(self.shared_tokens),
            "shift": self.shift._meta(),
            "provenance": self.provenance,
            "testing": self.testing.to_json(),
        }
        return meta, tensors

    @classmethod
    def _fields(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments from stored metadata and tensors (subclasses extend)."""
        return {
            "component": Component(meta["component"]),
            "direction": Direction(meta["direction"]),
            "dims": tuple(meta["dims"]),
            "coords": {k: tuple(v) for k, v in meta["coords"].items()},
            "per_prompt": tensors["per_prompt"],
            "ci": tensors["ci"],
            "shift": ShiftResult._from(meta["shift"], tensors, "shift."),
            "activation_delta": tensors.get("activation_delta"),
            "tokens": None if meta.get("tokens") is None else tuple(meta["tokens"]),
            "shared_tokens": (
                None if meta.get("shared_tokens") is None else tuple(meta["shared_tokens"])
            ),
            "provenance": meta.get("provenance", {}),
            "testing": SiteTest.from_json(meta.get("testing")),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        meta, tensors = self._stored()
        save_result(path, self._KIND, meta, tensors)

    @classmethod
    def load(cls: type[_Sweep], path: str | os.PathLike[str]) -> _Sweep:
        meta, tensors = load_result(path, cls._KIND)
        try:
            return cls(**cls._fields(meta, tensors))
        except ResultFormatError:
            raise
        except _MALFORMED as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid {cls._KIND} result: {exc!r}"
            ) from exc


@runtime_checkable
class _Directional(Protocol):
    """What a one-direction result offers :class:`BothDirections`."""

    @property
    def direction(self) -> Direction: ...

    @property
    def shift(self) -> ShiftResult: ...

    def to_dataframe(self) -> pd.DataFrame: ...

    def save(self, path: str | os.PathLike[str]) -> None: ...


R = TypeVar("R", bound=_Directional)


@dataclass(frozen=True, eq=False)
class BothDirections(Generic[R]):
    """The same analysis in both directions (``direction="both"``)."""

    reference_to_intervened: R
    intervened_to_reference: R

    def __getitem__(self, direction: Direction | str) -> R:
        d = Direction.coerce(direction)
        if d is Direction.REFERENCE_TO_INTERVENED:
            return self.reference_to_intervened
        if d is Direction.INTERVENED_TO_REFERENCE:
            return self.intervened_to_reference
        raise KeyError("index with one direction, not 'both'")

    def __iter__(self) -> Iterator[R]:
        yield self.reference_to_intervened
        yield self.intervened_to_reference

    @property
    def shift(self) -> ShiftResult:
        return self.reference_to_intervened.shift

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        frames = []
        for r in self:
            df = r.to_dataframe()
            if "direction" not in df:
                df.insert(0, "direction", r.direction.value)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def figure(self) -> go.Figure:
        from mechdelta.plotting import both_directions_figure

        return both_directions_figure(self)

    def __str__(self) -> str:
        return f"{self.reference_to_intervened}\n{self.intervened_to_reference}"

    def save(self, path: str | os.PathLike[str]) -> None:
        out = Path(path)
        kinds = set()
        for r in self:
            r.save(out / r.direction.value.replace("->", "_to_"))
            kinds.add(type(r).__name__)
        atomic_write_json(out / "both.json", {"kind": "both", "result": kinds.pop()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BothDirections[Any]:
        src = Path(path)
        marker = src / "both.json"
        if not marker.is_file():
            raise ResultFormatError(
                f"{os.fspath(src)!r} holds no both.json: not a two-direction result"
            )
        import json

        try:
            data = json.loads(marker.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResultFormatError(f"{os.fspath(marker)!r} is corrupt: {exc}") from exc
        kind = data.get("result") if isinstance(data, dict) else None
        from mechdelta.attribution._edge_result import EdgeAttribution
        from mechdelta.attribution.results import AttributionResult

        loaders: dict[Any, Any] = {
            "SweepResult": SweepResult,
            "PatchResult": PatchResult,
            "AttributionResult": AttributionResult,
            "EdgeAttribution": EdgeAttribution,
        }
        loader = loaders.get(kind)
        if loader is None:
            raise ResultFormatError(f"{os.fspath(marker)!r} names an unknown result kind {kind!r}")
        return cls(
            loader.load(src / "reference_to_intervened"),
            loader.load(src / "intervened_to_reference"),
        )


def direction_results(
    direction: Direction,
    shift: ShiftResult,
    boot: Any,
    values_of: Callable[[Direction], Tensor],
    provenance: dict[str, Any],
    *,
    sites: tuple[Site, ...] = (),
    delta_of: Callable[[Direction], tuple[float, ...]] | None = None,
) -> PatchResult | BothDirections[PatchResult]:
    """One :class:`PatchResult` per single direction of ``direction`` (a
    :class:`BothDirections` for ``"both"``): ``values_of(d)`` = the patched metric per prompt,
    its score's interval by the paired bootstrap ``boot``, ``delta_of(d)`` = the activation
    deltas (none when omitted)."""
    from mechdelta.stats.bootstrap import score_ci

    results = []
    for single in direction.singles:
        values = values_of(single)
        ci = score_ci(
            shift.reference,
            shift.intervened,
            values[None, :],
            boot,
            toward_reference=single.toward_reference,
        )[0]
        results.append(
            PatchResult(
                sites=sites,
                direction=single,
                per_prompt=values.float(),
                ci=(float(ci[0]), float(ci[1])),
                shift=shift,
                activation_delta=() if delta_of is None else delta_of(single),
                provenance=dict(provenance),
            )
        )
    if direction is Direction.BOTH:
        return BothDirections(results[0], results[1])
    return results[0]
