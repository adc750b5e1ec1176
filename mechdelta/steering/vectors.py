"""Steering vectors between the two models of a pair: :func:`steering_vectors`.

A steering vector at a site is the **mean difference of the two models' clean activations**
there, ``mean(intervened activation) - mean(reference activation)``, over the same prompts and
positions (each model run on its own, no patching). Adding it to the reference's activation
asks whether the shift is carried by one direction at that site; subtracting it from the
intervened model's asks whether removing that direction undoes the shift
(:func:`~mechdelta.steering.steer.steer`).

Which prompts (``fit``): by default a seeded random half of the task's prompts (``"half"``), so
that :func:`~mechdelta.steering.steer.steer` on the same task evaluates on the other half
(estimating and evaluating on the same prompts overstates the effect); ``"all"`` uses every
prompt.

Which positions (``positions``), and where :func:`~mechdelta.steering.steer.steer` adds the
vector (always the same positions as it was estimated on):

- ``"all"`` (default): every real (non-padding) token of every fit prompt, pooled (each token
  weighs the same, so longer prompts weigh more); added at every position.
- ``"read"``: the positions the task's metric reads (each prompt's last token for
  ``logit_diff`` / ``logprob`` / ``prob`` / callables, every scored position for ``loss``);
  added at those positions only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.core.sites import Component, Site
from mechdelta.errors import ConfigError, ResultFormatError, SiteError

if TYPE_CHECKING:
    import pandas as pd

    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = ["STEERABLE", "SteeringVectors", "fit_split", "steering_vectors"]

#: The components a steering vector can be estimated and added at (one ``d_model`` vector each;
#: ``head_out`` is the head's own write ``z_h @ W_O[h]``, added to the layer's attention output).
STEERABLE = (
    Component.RESID_PRE,
    Component.RESID_POST,
    Component.ATTN_OUT,
    Component.MLP_OUT,
    Component.HEAD_OUT,
)
METHODS = ("mean_diff",)
POSITIONS = ("all", "read")
FITS = ("half", "all")
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def _check_site(site: Site) -> Site:
    if site.kind not in STEERABLE:
        known = ", ".join(c.value for c in STEERABLE)
        raise SiteError(f"{site}: steering takes one of {known}, not {site.kind.value!r}")
    if site.position is not None:
        raise SiteError(
            f"{site}: a steering site names no position; choose positions='all' or 'read' instead"
        )
    return site


def as_steering_sites(layer: Any, site: Component | str) -> tuple[Site, ...]:
    """Sites from ``layer`` (an int, a Site, shorthand like ``"L1H1"``, or a sequence of them);
    ints take the component ``site``. Order kept, duplicates dropped."""
    items = [layer] if isinstance(layer, (int, str, Site)) else layer
    try:
        items = list(items)
    except TypeError:
        raise SiteError(
            f"layer must be an int, a Site, a shorthand string or a sequence of them, not {layer!r}"
        ) from None
    if not items:
        raise SiteError("steering_vectors needs at least one layer or site, e.g. layer=1")
    comp = Component.coerce(site)
    if comp not in STEERABLE:
        known = ", ".join(c.value for c in STEERABLE)
        raise SiteError(f"site={comp.value!r}: steering takes one of {known}")
    out: list[Site] = []
    for item in items:
        if isinstance(item, Site):
            s = item
        elif isinstance(item, str):
            s = Site.parse(item)
        elif isinstance(item, bool) or not isinstance(item, int):
            raise SiteError(f"layer {item!r} is not an int, a Site or a shorthand string")
        elif comp is Component.HEAD_OUT:
            raise SiteError("site='head_out' needs a head: pass layer=Site('head_out', L, head=H)")
        else:
            s = Site(comp, item)
        out.append(_check_site(s))
    return tuple(dict.fromkeys(out))


def fit_split(n: int, fit: str, seed: int) -> tuple[int, ...]:
    """Indices of the prompts a vector is estimated on: a seeded random half (the first
    ``ceil(n / 2)`` of a permutation, sorted) or all of them."""
    if fit not in FITS:
        raise ConfigError(f"fit={fit!r}: use 'half' (held-out evaluation) or 'all'")
    if fit == "all":
        return tuple(range(n))
    if n < 2:
        raise ConfigError(
            f"fit='half' needs at least 2 prompts (got {n}): one to estimate, one to evaluate"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tuple(sorted(int(i) for i in perm[: (n + 1) // 2]))


@dataclass(frozen=True, eq=False)
class SteeringVectors:
    """Mean-difference vectors (intervened minus reference), one per site.

    Attributes:
        sites: where each vector was estimated and is added (no position; see ``positions``).
        vectors: ``[site, d_model]``, row i = mean over the fit prompts' ``positions`` of
            ``intervened activation - reference activation`` at ``sites[i]`` (float32).
        method: ``"mean_diff"``.
        positions: ``"all"`` (every real token) or ``"read"`` (the metric's read positions).
        fit: ``"half"`` or ``"all"``; ``fit_indices`` the prompts of the task estimated on.
        task_hash: prompt hash of the whole task (not only the fit half), so that
            :func:`~mechdelta.steering.steer.steer` on the same task evaluates on the others.
        n_tokens: how many (prompt, position) activations each mean is taken over.
        seed: seed of the fit split.
        provenance: versions, both models' hashes, the task.
    """

    sites: tuple[Site, ...]
    vectors: Float[Tensor, "site d_model"]
    method: str = "mean_diff"
    positions: str = "all"
    fit: str = "half"
    fit_indices: tuple[int, ...] = ()
    task_hash: str = ""
    n_tokens: int = 0
    seed: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sites:
            raise ConfigError("SteeringVectors needs at least one site")
        for s in self.sites:
            _check_site(s)
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.sites):
            raise ConfigError(
                f"vectors has shape {tuple(self.vectors.shape)}; it must be [site={len(self.sites)}, "
                "d_model]"
            )
        if not bool(torch.isfinite(self.vectors).all()):
            raise ConfigError("steering vectors hold NaN or inf")
        for name, value, allowed in (
            ("method", self.method, METHODS),
            ("positions", self.positions, POSITIONS),
            ("fit", self.fit, FITS),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")

    @property
    def norms(self) -> Float[Tensor, " site"]:
        """Euclidean norm of each vector (the random control's vectors have the same norms)."""
        return self.vectors.double().norm(dim=-1).float()

    def __len__(self) -> int:
        return len(self.sites)

    def index(self, site: Site | str | int) -> int:
        """Row of ``site`` (a Site, shorthand, or a layer when one site is at that layer)."""
        if isinstance(site, int) and not isinstance(site, bool):
            matches = [i for i, s in enumerate(self.sites) if s.layer == site]
            if len(matches) != 1:
                raise SiteError(f"{len(matches)} vectors at layer {site}; index by Site instead")
            return matches[0]
        key = site if isinstance(site, Site) else Site.parse(str(site))
        if key not in self.sites:
            raise SiteError(f"no steering vector at {key}; sites: {[str(s) for s in self.sites]}")
        return self.sites.index(key)

    def __getitem__(self, site: Site | str | int) -> Float[Tensor, " d_model"]:
        return self.vectors[self.index(site)]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per site: its norm, and how many activations the mean was taken over."""
        import pandas as pd

        return pd.DataFrame(
            {
                "site": [str(s) for s in self.sites],
                "norm": self.norms.tolist(),
                "n_tokens": [self.n_tokens] * len(self.sites),
            }
        )

    def __str__(self) -> str:
        body = ", ".join(
            f"{s} |v|={n:.3g}" for s, n in zip(self.sites, self.norms.tolist(), strict=True)
        )
        return (
            f"{self.method} steering vectors (intervened - reference) at {body}; positions "
            f"{self.positions!r}, fit on {len(self.fit_indices)} prompts ({self.fit})"
        )

    def _meta(self) -> dict[str, Any]:
        return {
            "sites": [str(s) for s in self.sites],
            "method": self.method,
            "positions": self.positions,
            "fit": self.fit,
            "fit_indices": list(self.fit_indices),
            "task_hash": self.task_hash,
            "n_tokens": self.n_tokens,
            "seed": self.seed,
            "provenance": self.provenance,
        }

    @classmethod
    def _from(cls, meta: dict[str, Any], vectors: Tensor) -> SteeringVectors:
        return cls(
            sites=tuple(Site.parse(s) for s in meta["sites"]),
            vectors=vectors,
            method=meta["method"],
            positions=meta["positions"],
            fit=meta["fit"],
            fit_indices=tuple(int(i) for i in meta["fit_indices"]),
            task_hash=str(meta["task_hash"]),
            n_tokens=int(meta["n_tokens"]),
            seed=int(meta["seed"]),
            provenance=meta.get("provenance", {}),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        save_result(path, "steering_vectors", self._meta(), {"vectors": self.vectors})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringVectors:
        meta, tensors = load_result(path, "steering_vectors")
        try:
            return cls._from(meta, tensors["vectors"])
        except (*_MALFORMED, ConfigError, SiteError) as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not valid steering vectors: {exc!r}"
            ) from exc


def position_mask(prepared: Any, positions: str) -> Tensor:
    """``[batch, pos]`` booleans: where a vector is estimated and added (see the module docs)."""
    batch, seq = prepared.batch_size, prepared.seq_len
    if positions == "all":
        return torch.arange(seq)[None, :] < prepared.lengths[:, None]
    inputs = prepared.inputs
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    rows = torch.arange(batch)[:, None].expand_as(inputs.positions)
    mask[rows[inputs.valid], inputs.positions[inputs.valid]] = True
    return mask


def steering_vectors(
    pair: ModelPair,
    task: Task,
    layer: int | Site | str | Sequence[int | Site | str],
    *,
    site: Component | str = "resid_post",
    method: str = "mean_diff",
    positions: str = "all",
    fit: str = "half",
    seed: int = 0,
) -> SteeringVectors:
    """Mean-difference steering vectors, intervened minus reference, at ``site`` of each layer.

    Args:
        pair: the two models.
        task: the prompts the activations are read on (the metric is not used, only its read
            positions when ``positions="read"``).
        layer: a layer, a sequence of layers (one vector per layer, at component ``site``), or
            located components as Sites / shorthand (``"L1H1"``, ``"L1.mlp_out"``), which carry
            their own component.
        site: ``"resid_post"`` (default), ``"resid_pre"``, ``"attn_out"`` or ``"mlp_out"``.
        method: ``"mean_diff"``: ``mean(intervened) - mean(reference)`` over the fit prompts'
            positions, each model's clean activation.
        positions: ``"all"`` (every real token; default) or ``"read"`` (the metric's read
            positions). :func:`~mechdelta.steering.steer.steer` adds the vector at the same
            positions.
        fit: ``"half"`` (default: a seeded random half of the prompts; ``steer`` on the same
            task evaluates on the other half) or ``"all"``.
        seed: seed of the half split.

    Raises SiteError for an unknown or unsupported component, a layer or head out of range;
    ConfigError for an unknown method, positions or fit.
    """
    from mechdelta.core.provenance import environment
    from mechdelta.patching._engine import PatchEngine

    sites = as_steering_sites(layer, site)
    for name, value, allowed in (
        ("method", method, METHODS),
        ("positions", positions, POSITIONS),
    ):
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")
    for s in sites:
        s.validate(pair.shape)
    cfg = pair.cfg
    whole = task.prepare(pair.tokenizer, n_ctx=int(cfg.n_ctx), d_vocab=int(cfg.d_vocab))
    indices = fit_split(whole.batch_size, fit, seed)
    fit_task = task if fit == "all" else task.subset(indices)
    engine = PatchEngine(pair, fit_task, sites=sites, prefix_reuse=False)
    mask = position_mask(engine.prepared, positions).to(engine.device)
    every = slice(0, engine.prepared.batch_size)
    rows = []
    for s in sites:
        ref = engine.read(engine.states["reference"], s, every).double()
        itv = engine.read(engine.states["intervened"], s, every).double()
        rows.append((itv - ref)[mask].mean(0))
    return SteeringVectors(
        sites=sites,
        vectors=torch.stack(rows).float().cpu(),
        method=method,
        positions=positions,
        fit=fit,
        fit_indices=indices,
        task_hash=whole.prompt_hash(),
        n_tokens=int(mask.sum()),
        seed=seed,
        provenance={
            **environment(),
            "models": pair.provenance_models(),
            "task": whole.info(),
            "fit_task": engine.prepared.info(),
        },
    )
