"""The result of :func:`~mechdelta.steering.steer.steer`: :class:`SteeringResult`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.core.directions import Direction
from mechdelta.errors import ConfigError, ResultFormatError, SiteError
from mechdelta.patching.results import fraction_explained
from mechdelta.patching.shift import ShiftResult
from mechdelta.steering.vectors import SteeringVectors

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from mechdelta.core.sites import Site

__all__ = ["RUNS", "SteeringResult"]

_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)

#: How the evaluation prompts relate to the prompts the vectors were estimated on.
EVALUATIONS = ("held-out prompts", "separate task", "in-sample")

#: The two steered runs: label, the model run, what its fraction measures, and the patching
#: direction whose score formula it shares.
RUNS = (
    ("reference + alpha*v", "reference", "reproduced", Direction.INTERVENED_TO_REFERENCE),
    ("intervened - alpha*v", "intervened", "removed", Direction.REFERENCE_TO_INTERVENED),
)


@dataclass(frozen=True, eq=False)
class SteeringResult:
    """Dose-response of steering with mean-difference vectors, with a random-direction control.

    Every number is the task's metric on the evaluation prompts (``eval_indices`` of the task
    given to :func:`~mechdelta.steering.steer.steer`; ``evaluation`` says whether they are
    held out from the vectors' fit prompts).

    Attributes:
        vectors: the steering vectors (sites, ``v`` per site, how they were estimated).
        alphas: the coefficients, ascending.
        shift: both models' clean metric per evaluation prompt and the shift with its CI.
        steered_reference: ``[site, alpha, batch]``, the metric of the reference model with
            ``alpha * v`` added at the site (at the vectors' positions).
        steered_intervened: ``[site, alpha, batch]``, the intervened model with ``alpha * v``
            subtracted there.
        ci_reproduced / ci_removed: ``[site, alpha, 2]``, paired bootstrap intervals (prompts
            resampled jointly with both clean runs) of :attr:`reproduced` / :attr:`removed`.
        control_reference / control_intervened: ``[site, alpha, random, batch]``, the same runs
            with ``alpha * r_j`` instead of ``alpha * v``: ``r_j`` seeded random directions
            (isotropic Gaussian, normalised) scaled to ``|v|``, the same ``r_j`` for every site.
        eval_indices: the task's prompts evaluated on.
        evaluation: ``"held-out prompts"``, ``"separate task"`` or ``"in-sample"``.
        n_random, seed: control directions and the seed of them and of the bootstrap.
        provenance: versions, both models' hashes, the evaluation task, the seed.
    """

    vectors: SteeringVectors
    alphas: tuple[float, ...]
    shift: ShiftResult
    steered_reference: Float[Tensor, "site alpha batch"]
    steered_intervened: Float[Tensor, "site alpha batch"]
    ci_reproduced: Float[Tensor, "site alpha 2"]
    ci_removed: Float[Tensor, "site alpha 2"]
    control_reference: Float[Tensor, "site alpha random batch"]
    control_intervened: Float[Tensor, "site alpha random batch"]
    eval_indices: tuple[int, ...] = ()
    evaluation: str = "held-out prompts"
    n_random: int = 0
    seed: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_s, n_a, n_b = len(self.vectors.sites), len(self.alphas), len(self.shift.reference)
        want = {
            "steered_reference": (n_s, n_a, n_b),
            "steered_intervened": (n_s, n_a, n_b),
            "ci_reproduced": (n_s, n_a, 2),
            "ci_removed": (n_s, n_a, 2),
            "control_reference": (n_s, n_a, self.n_random, n_b),
            "control_intervened": (n_s, n_a, self.n_random, n_b),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ConfigError(f"SteeringResult.{name} has shape {got}, expected {shape}")
        if self.evaluation not in EVALUATIONS:
            raise ConfigError(f"evaluation={self.evaluation!r}: use one of {EVALUATIONS}")
        if list(self.alphas) != sorted(set(self.alphas)):
            raise ConfigError(f"alphas {self.alphas} must be distinct and ascending")

    @property
    def sites(self) -> tuple[Site, ...]:
        return self.vectors.sites

    # --- fractions of the shift ------------------------------------------------------------

    def _fraction(self, direction: Direction, patched: Tensor) -> Tensor:
        return fraction_explained(direction, self.shift, patched.double().mean(-1)).float()

    @property
    def reproduced(self) -> Float[Tensor, "site alpha"]:
        """``(m(ref + alpha v) - m_ref) / (m_int - m_ref)``: the fraction of the shift that
        adding the vector to the reference reproduces (means over prompts; NaN if no shift)."""
        return self._fraction(Direction.INTERVENED_TO_REFERENCE, self.steered_reference)

    @property
    def removed(self) -> Float[Tensor, "site alpha"]:
        """``(m_int - m(int - alpha v)) / (m_int - m_ref)``: the fraction of the shift that
        subtracting the vector from the intervened model removes."""
        return self._fraction(Direction.REFERENCE_TO_INTERVENED, self.steered_intervened)

    @property
    def control_reproduced(self) -> Float[Tensor, "site alpha random"]:
        """:attr:`reproduced` with each random direction in place of ``v``."""
        return self._fraction(Direction.INTERVENED_TO_REFERENCE, self.control_reference)

    @property
    def control_removed(self) -> Float[Tensor, "site alpha random"]:
        """:attr:`removed` with each random direction in place of ``v``."""
        return self._fraction(Direction.REFERENCE_TO_INTERVENED, self.control_intervened)

    def _index(self, site: Site | str | int | None, alpha: float) -> tuple[int, int]:
        if site is None:
            if len(self.sites) != 1:
                raise SiteError(f"{len(self.sites)} sites were steered: name one")
            i = 0
        else:
            i = self.vectors.index(site)
        if float(alpha) not in self.alphas:
            raise ConfigError(f"alpha {alpha} was not run; alphas: {list(self.alphas)}")
        return i, self.alphas.index(float(alpha))

    def beats_control(
        self, site: Site | str | int | None = None, alpha: float = 1.0, run: str = "reference"
    ) -> bool:
        """Whether steering with ``v`` at ``alpha`` does more than every random direction: the
        lower end of the fraction's interval exceeds the largest control fraction.

        ``run="reference"`` compares fractions reproduced, ``"intervened"`` fractions removed.
        False without control directions or with a NaN interval (too few prompts).
        """
        i, a = self._index(site, alpha)
        if run not in ("reference", "intervened"):
            raise ConfigError(f"run={run!r}: use 'reference' (reproduce) or 'intervened' (remove)")
        ci = self.ci_reproduced if run == "reference" else self.ci_removed
        ctrl = self.control_reproduced if run == "reference" else self.control_removed
        if self.n_random == 0:
            return False
        return bool(ci[i, a, 0] > ctrl[i, a].max())

    # --- tables, figures ---------------------------------------------------------------------

    def to_dataframe(self) -> pd.DataFrame:
        """Long format, one row per (site, run, alpha): ``fraction`` of the shift reproduced
        (run ``"reference + alpha*v"``) or removed (``"intervened - alpha*v"``), its interval
        ``ci_low``/``ci_high``, the steered mean metric ``steered``, and over the random
        directions the mean, standard deviation, min and max of their fractions,
        ``control_p`` = ``(1 + #{j: fraction_j >= fraction}) / (1 + n_random)`` (the Monte Carlo
        p-value of "v does no more than a random direction of its norm": with 19 directions,
        0.05 when v beats every one) and ``beats`` (``ci_low`` above the control's max)."""
        import pandas as pd

        rows = []
        for label, which, measure, _ in RUNS:
            frac = self.reproduced if which == "reference" else self.removed
            ci = self.ci_reproduced if which == "reference" else self.ci_removed
            ctrl = self.control_reproduced if which == "reference" else self.control_removed
            steered = self.steered_reference if which == "reference" else self.steered_intervened
            means = steered.double().mean(-1)
            for i, s in enumerate(self.sites):
                for a, alpha in enumerate(self.alphas):
                    c = ctrl[i, a].double()
                    has = c.numel() > 0
                    nan = float("nan")
                    rows.append(
                        {
                            "site": str(s),
                            "run": label,
                            "measure": measure,
                            "alpha": alpha,
                            "fraction": float(frac[i, a]),
                            "ci_low": float(ci[i, a, 0]),
                            "ci_high": float(ci[i, a, 1]),
                            "steered": float(means[i, a]),
                            "control_mean": float(c.mean()) if has else nan,
                            "control_std": float(c.std(unbiased=False)) if has else nan,
                            "control_min": float(c.min()) if has else nan,
                            "control_max": float(c.max()) if has else nan,
                            "control_p": (
                                (1 + int((c >= float(frac[i, a])).sum())) / (1 + c.numel())
                                if has
                                else nan
                            ),
                            "beats": bool(has and float(ci[i, a, 0]) > float(c.max())),
                        }
                    )
        return pd.DataFrame(rows)

    def figure(self) -> go.Figure:
        from mechdelta.plotting._steering import steering_figure

        return steering_figure(self)

    def __str__(self) -> str:
        level = round(100 * (1 - self.shift.alpha))
        alpha = 1.0 if 1.0 in self.alphas else self.alphas[-1]
        a = self.alphas.index(alpha)
        lines = [
            f"steering with {self.vectors.method} vectors on {len(self.shift.reference)} "
            f"{self.evaluation}: {self.shift.metric} shift {self.shift.shift:+.4g}; at "
            f"alpha={alpha:g} ({level}% CI; control = mean of {self.n_random} random directions "
            "of the same norm):"
        ]
        for i, s in enumerate(self.sites):
            parts = []
            for _, which, measure, _ in RUNS:
                frac = (self.reproduced if which == "reference" else self.removed)[i, a]
                ci = (self.ci_reproduced if which == "reference" else self.ci_removed)[i, a]
                ctrl = self.control_reproduced if which == "reference" else self.control_removed
                cm = float(ctrl[i, a].double().mean()) if self.n_random else float("nan")
                parts.append(
                    f"{measure} {float(frac):+.3f} [{float(ci[0]):+.3f}, {float(ci[1]):+.3f}] "
                    f"(control {cm:+.3f})"
                )
            lines.append(f"  {s!s:>14}  " + "; ".join(parts))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"

    # --- storage -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {
            "vectors": self.vectors.vectors,
            "steered_reference": self.steered_reference,
            "steered_intervened": self.steered_intervened,
            "ci_reproduced": self.ci_reproduced,
            "ci_removed": self.ci_removed,
            "control_reference": self.control_reference,
            "control_intervened": self.control_intervened,
            **self.shift._tensors("shift."),
        }
        meta = {
            "vectors": self.vectors._meta(),
            "alphas": list(self.alphas),
            "shift": self.shift._meta(),
            "eval_indices": list(self.eval_indices),
            "evaluation": self.evaluation,
            "n_random": self.n_random,
            "seed": self.seed,
            "provenance": self.provenance,
        }
        save_result(path, "steering", meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringResult:
        meta, tensors = load_result(path, "steering")
        try:
            return cls(
                vectors=SteeringVectors._from(meta["vectors"], tensors["vectors"]),
                alphas=tuple(float(a) for a in meta["alphas"]),
                shift=ShiftResult._from(meta["shift"], tensors, "shift."),
                steered_reference=tensors["steered_reference"],
                steered_intervened=tensors["steered_intervened"],
                ci_reproduced=tensors["ci_reproduced"],
                ci_removed=tensors["ci_removed"],
                control_reference=tensors["control_reference"],
                control_intervened=tensors["control_intervened"],
                eval_indices=tuple(int(i) for i in meta["eval_indices"]),
                evaluation=str(meta["evaluation"]),
                n_random=int(meta["n_random"]),
                seed=int(meta["seed"]),
                provenance=meta.get("provenance", {}),
            )
        except (*_MALFORMED, ConfigError, SiteError) as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid steering result: {exc!r}"
            ) from exc
