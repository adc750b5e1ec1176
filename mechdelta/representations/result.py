"""The result of :func:`~mechdelta.representations.compare_representations`: a long table of
per-layer (and per-head) divergence measures between the reference and the intervened model."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.core.sites import Component, Site
from mechdelta.errors import ConfigError, ResultFormatError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["MEASURES", "Candidate", "RepresentationDiff"]

_KIND = "representation_diff"

#: Every measure a :class:`RepresentationDiff` may hold, in display order, with its meaning.
MEASURES: dict[str, str] = {
    "cka": "linear CKA between the two models' activations (1: same up to rotation and scale)",
    "cka_debiased": "linear CKA with the unbiased HSIC estimator (Song et al. 2012)",
    "delta_norm": "relative activation change ||a_int - a_ref||_F / ||a_ref||_F over all rows",
    "logit_lens_kl": "KL(ref || int) of each layer's residual decoded by each model's own "
    "final norm + unembedding, mean over rows (nats)",
    "kl": "KL(ref || int) of the next-token distributions, mean over rows (nats)",
    "attention_js": "Jensen-Shannon divergence of a head's attention pattern, mean over query "
    "rows (nats, at most ln 2)",
    "weight_delta": "relative weight change ||ΔW|| / ||W_ref|| of the component's parameters",
}
_POSITIONS = ("all", "final")
# divergence = 1 - value for similarities, value otherwise
_SIMILARITY = frozenset({"cka", "cka_debiased"})
_LAYER_MEASURES = frozenset({"cka", "cka_debiased", "delta_norm", "logit_lens_kl"})


@dataclass(frozen=True)
class Candidate:
    """One layer where divergence between the two models starts (see
    :meth:`RepresentationDiff.candidates`).

    ``site``: the layer-level site the divergence was read at (``Site(component, layer)``);
    ``divergence``: ``1 - value`` for ``cka``/``cka_debiased``, the value itself otherwise;
    ``jump``: ``divergence`` minus that of the previous layer of the same site (0 before the
    first layer); ``rank``: 1 for the largest jump over all layers, 2 for the next, ...
    """

    site: Site
    measure: str
    divergence: float
    jump: float
    rank: int

    def __str__(self) -> str:
        return (
            f"{self.site}: {self.measure} divergence {self.divergence:.4g} "
            f"(jump {self.jump:+.4g}, rank {self.rank} by jump)"
        )


@dataclass(frozen=True, eq=False)
class RepresentationDiff:
    """Divergence measures between the reference and the intervened model, one row each.

    Columns (equal-length tuples and ``values``): ``site`` (a component name, or ``"logits"``,
    ``"block"``, ``"unembed"`` for rows that are not a patchable site), ``layer`` and ``head``
    (None where they do not apply), ``measure`` (a key of :data:`MEASURES`) and ``values``
    (float64). Which rows exist and what each means is documented on
    :func:`~mechdelta.representations.compare_representations`.

    ``positions``: which token rows the activation measures used (``"all"``: every real token of
    every prompt; ``"final"``: each prompt's last token); ``n_rows``: how many.
    """

    site: tuple[str, ...]
    layer: tuple[int | None, ...]
    head: tuple[int | None, ...]
    measure: tuple[str, ...]
    values: Float[Tensor, " row"]
    positions: str = "all"
    n_rows: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.site)
        if not (len(self.layer) == len(self.head) == len(self.measure) == n):
            raise ResultFormatError(
                f"RepresentationDiff columns differ in length: site {n}, layer {len(self.layer)}, "
                f"head {len(self.head)}, measure {len(self.measure)}"
            )
        if self.values.dim() != 1 or self.values.shape[0] != n:
            raise ResultFormatError(
                f"RepresentationDiff.values must have one entry per row ({n}), got shape "
                f"{tuple(self.values.shape)}"
            )
        unknown = sorted(set(self.measure) - set(MEASURES))
        if unknown:
            raise ResultFormatError(f"unknown measures {unknown}; known: {list(MEASURES)}")
        if self.positions not in _POSITIONS:
            raise ResultFormatError(
                f"positions must be one of {_POSITIONS}, not {self.positions!r}"
            )
        object.__setattr__(self, "values", self.values.detach().to(torch.float64).cpu())

    # --- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.site)

    @property
    def measures(self) -> tuple[str, ...]:
        """The measures present, in :data:`MEASURES` order."""
        present = set(self.measure)
        return tuple(m for m in MEASURES if m in present)

    def get(
        self, measure: str, site: str, layer: int | None = None, head: int | None = None
    ) -> float:
        """The value of one row; raises :class:`~mechdelta.errors.ConfigError` when absent."""
        for i in range(len(self)):
            if (self.measure[i], self.site[i], self.layer[i], self.head[i]) == (
                measure,
                site,
                layer,
                head,
            ):
                return float(self.values[i])
        raise ConfigError(
            f"no {measure!r} row at site {site!r}, layer {layer}, head {head}; see "
            ".to_dataframe() for the rows this result holds"
        )

    def by_layer(self, measure: str, site: str = "resid_post") -> dict[int, float]:
        """``{layer: value}`` of a layer-level ``measure`` at ``site`` (rows without a head)."""
        return {
            int(lay): float(self.values[i])
            for i, lay in enumerate(self.layer)
            if self.measure[i] == measure
            and self.site[i] == site
            and lay is not None
            and self.head[i] is None
        }

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: ``site``, ``layer`` (Int64, NA where none), ``head`` (Int64, NA where
        none), ``measure``, ``value``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "site": list(self.site),
                "layer": pd.array(list(self.layer), dtype="Int64"),
                "head": pd.array(list(self.head), dtype="Int64"),
                "measure": list(self.measure),
                "value": self.values.tolist(),
            }
        )

    # --- the screen ---------------------------------------------------------------------------

    def candidates(
        self,
        k: int = 3,
        *,
        site: str = "resid_post",
        measure: str = "delta_norm",
        min_fraction: float = 0.1,
        order: str = "onset",
    ) -> tuple[Candidate, ...]:
        """The layers where divergence between the two models starts.

        Over the layers of a layer-level ``site`` (default the residual stream after each block),
        the divergence ``d_L`` is ``1 - value`` for ``cka``/``cka_debiased`` and the value itself
        for ``delta_norm``/``logit_lens_kl``; the *jump* at ``L`` is ``d_L - d_prev`` (``d_prev``:
        the previous layer present, 0 before the first; layers with a NaN value are skipped). A
        layer is a candidate when its jump is positive and at least ``min_fraction`` times the
        largest jump. With ``order="onset"`` (default) the first ``k`` candidates by layer are
        returned, earliest first (where divergence *starts*); with ``order="jump"`` the ``k``
        with the largest jumps, largest first. Each :class:`Candidate` carries its rank by jump.
        Empty when no layer's divergence increases (e.g. identical models).

        A jump at ``resid_post`` of layer ``L`` is what block ``L`` (or the embedding, at the
        first layer) adds to the divergence its input already had.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"candidates(k={k!r}): k must be a positive int")
        if measure not in _LAYER_MEASURES:
            raise ConfigError(
                f"candidates(measure={measure!r}): use one of {sorted(_LAYER_MEASURES)} "
                "(per-layer measures)"
            )
        if order not in ("onset", "jump"):
            raise ConfigError(f"candidates(order={order!r}): use 'onset' or 'jump'")
        if not 0.0 <= min_fraction <= 1.0:
            raise ConfigError(f"candidates(min_fraction={min_fraction!r}) must lie in [0, 1]")
        comp = Component.coerce(site)
        if comp.per_head:
            raise ConfigError(
                f"candidates(site={site!r}): a per-head site has no single previous layer; "
                "use a layer-level site such as 'resid_post'"
            )
        profile = self.by_layer(measure, comp.value)
        if not profile:
            have = sorted({s for s, m in zip(self.site, self.measure, strict=True) if m == measure})
            raise ConfigError(
                f"this result holds no {measure!r} rows at site {comp.value!r} (it has {measure!r} "
                f"at {have}); pass sites=({comp.value!r},) to compare_representations"
            )
        rows: list[tuple[int, float, float]] = []  # (layer, divergence, jump)
        previous = 0.0
        for layer in sorted(profile):
            value = profile[layer]
            if math.isnan(value):
                continue
            div = 1.0 - value if measure in _SIMILARITY else value
            rows.append((layer, div, div - previous))
            previous = div
        top = max((j for _, _, j in rows), default=0.0)
        if not top > 0.0:
            return ()
        by_jump = sorted(rows, key=lambda r: (-r[2], r[0]))
        rank = {r[0]: i + 1 for i, r in enumerate(by_jump)}
        chosen = [r for r in rows if r[2] > 0.0 and r[2] >= min_fraction * top]
        if order == "jump":
            chosen.sort(key=lambda r: (-r[2], r[0]))
        return tuple(
            Candidate(Site(comp, layer), measure, div, jump, rank[layer])
            for layer, div, jump in chosen[:k]
        )

    # --- views --------------------------------------------------------------------------------

    def figure(self) -> go.Figure:
        from mechdelta.plotting._representations import representation_figure

        return representation_figure(self)

    def __str__(self) -> str:
        lines = [
            f"RepresentationDiff: {len(self)} rows, {self.n_rows} token rows "
            f"(positions={self.positions!r})"
        ]
        for m in self.measures:
            vals = [float(self.values[i]) for i in range(len(self)) if self.measure[i] == m]
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                lines.append(
                    f"  {m:<14} {len(vals)} rows, min {min(finite):.4g}, max {max(finite):.4g}"
                )
            else:
                lines.append(f"  {m:<14} {len(vals)} rows, none finite")
        if "delta_norm" in self.measures and self.by_layer("delta_norm"):
            onset = self.candidates(1)
            if onset:
                lines.append(f"  divergence starts at {onset[0]}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"

    # --- storage ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to a directory: the values as safetensors (float64), the labels as JSON."""
        meta = {
            "site": list(self.site),
            "layer": list(self.layer),
            "head": list(self.head),
            "measure": list(self.measure),
            "positions": self.positions,
            "n_rows": self.n_rows,
            "provenance": self.provenance,
        }
        save_result(path, _KIND, meta, {"values": self.values})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RepresentationDiff:
        meta, tensors = load_result(path, _KIND)

        def opt(v: Any) -> int | None:
            return None if v is None else int(v)

        try:
            return cls(
                site=tuple(str(s) for s in meta["site"]),
                layer=tuple(opt(v) for v in meta["layer"]),
                head=tuple(opt(v) for v in meta["head"]),
                measure=tuple(str(m) for m in meta["measure"]),
                values=tensors["values"],
                positions=str(meta["positions"]),
                n_rows=int(meta["n_rows"]),
                provenance=meta.get("provenance", {}),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid representation diff: {exc!r}"
            ) from exc
