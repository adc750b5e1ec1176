"""The behavioural shift between the two models, and the 2x2 model x input factorial design."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.core._io import load_result, save_result
from mechdelta.errors import ResultFormatError, TaskError
from mechdelta.stats.bootstrap import Bootstrap, min_prompts, paired_shift_ci

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = [
    "FactorialResult",
    "PrecisionWarning",
    "ShiftNotSignificantWarning",
    "ShiftResult",
    "TooFewPromptsWarning",
    "factorial",
    "measure_shift",
]


# What reading a result.json with missing or mistyped fields raises (turned into ResultFormatError).
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


class ShiftNotSignificantWarning(UserWarning):
    """The shift's confidence interval contains zero: scores relative to it are not meaningful."""


class PrecisionWarning(UserWarning):
    """A half-precision pair's shift is small against the rounding of its logits: scores (fractions
    of the shift) may differ from a float32 run by a tenth or more."""


class TooFewPromptsWarning(ShiftNotSignificantWarning):
    """Fewer prompts than a bootstrap interval needs (:func:`~mechdelta.stats.bootstrap.min_prompts`:
    4 at ``alpha=0.05``): intervals are NaN and no shift is called significant."""


@dataclass(frozen=True, eq=False)
class ShiftResult:
    """The metric on both models, per prompt, and the shift ``intervened - reference`` with a CI."""

    metric: str
    reference: Float[Tensor, " batch"]
    intervened: Float[Tensor, " batch"]
    ci: tuple[float, float]
    alpha: float = 0.05
    n_boot: int = 2000
    task: str = "task"
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_mean(self) -> float:
        return float(self.reference.double().mean())

    @property
    def intervened_mean(self) -> float:
        return float(self.intervened.double().mean())

    @property
    def shift(self) -> float:
        """``mean(intervened) - mean(reference)``."""
        return self.intervened_mean - self.reference_mean

    @property
    def per_prompt_shift(self) -> Float[Tensor, " batch"]:
        return self.intervened - self.reference

    @property
    def significant(self) -> bool:
        """Whether the ``1 - alpha`` interval of the shift excludes zero (never with fewer than
        :func:`~mechdelta.stats.bootstrap.min_prompts` prompts: the interval is then NaN)."""
        lo, hi = self.ci
        return len(self.reference) >= min_prompts(self.alpha) and (lo > 0 or hi < 0)

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {
                "prompt": range(len(self.reference)),
                "reference": self.reference.tolist(),
                "intervened": self.intervened.tolist(),
                "shift": self.per_prompt_shift.tolist(),
            }
        )

    def figure(self) -> go.Figure:
        from mechdelta.plotting import shift_figure

        return shift_figure(self)

    def __str__(self) -> str:
        lo, hi = self.ci
        level = round(100 * (1 - self.alpha))
        if len(self.reference) < min_prompts(self.alpha):
            flag = f"  (too few prompts for an interval: {min_prompts(self.alpha)} or more needed)"
        else:
            flag = "" if self.significant else "  (not distinguishable from 0)"
        return (
            f"{self.metric} on {len(self.reference)} prompts: reference {self.reference_mean:.4g}, "
            f"intervened {self.intervened_mean:.4g}, shift {self.shift:+.4g} "
            f"[{level}% CI {lo:+.4g}, {hi:+.4g}]{flag}"
        )

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"

    # --- storage ----------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "ci": list(self.ci),
            "alpha": self.alpha,
            "n_boot": self.n_boot,
            "task": self.task,
            "provenance": self.provenance,
        }

    def _tensors(self, prefix: str = "") -> dict[str, Tensor]:
        return {f"{prefix}reference": self.reference, f"{prefix}intervened": self.intervened}

    @classmethod
    def _from(
        cls, meta: dict[str, Any], tensors: dict[str, Tensor], prefix: str = ""
    ) -> ShiftResult:
        return cls(
            metric=meta["metric"],
            reference=tensors[f"{prefix}reference"],
            intervened=tensors[f"{prefix}intervened"],
            ci=(float(meta["ci"][0]), float(meta["ci"][1])),
            alpha=float(meta["alpha"]),
            n_boot=int(meta["n_boot"]),
            task=meta.get("task", "task"),
            provenance=meta.get("provenance", {}),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = self._tensors()
        save_result(path, "shift", self._meta(), tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShiftResult:
        meta, tensors = load_result(path, "shift")
        try:
            return cls._from(meta, tensors)
        except _MALFORMED as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid shift result: {exc!r}"
            ) from exc


def make_shift(
    metric: str,
    reference: Tensor,
    intervened: Tensor,
    boot: Bootstrap,
    *,
    task: str,
    provenance: dict[str, Any],
    warn: bool = True,
) -> ShiftResult:
    ci = paired_shift_ci(reference, intervened, boot)
    result = ShiftResult(
        metric=metric,
        reference=reference.float().cpu(),
        intervened=intervened.float().cpu(),
        ci=(float(ci[0]), float(ci[1])),
        alpha=boot.alpha,
        n_boot=boot.n_boot,
        task=task,
        provenance=provenance,
    )
    if warn and len(reference) < min_prompts(boot.alpha):
        warnings.warn(
            f"{len(reference)} prompt(s) are too few for a bootstrap interval "
            f"({min_prompts(boot.alpha)} or "
            f"more needed): {result}. Intervals are NaN and the shift is not called significant; "
            "add prompts.",
            TooFewPromptsWarning,
            stacklevel=4,
        )
    elif warn and not result.significant:
        warnings.warn(
            f"the shift is not distinguishable from zero ({result}); patching scores are "
            "fractions of it and will be noise. Use more prompts or a metric the intervention moves.",
            ShiftNotSignificantWarning,
            stacklevel=4,
        )
    return result


def measure_shift(
    pair: ModelPair,
    task: Task,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    warn: bool = True,
) -> ShiftResult:
    """The task's metric on reference and intervened, per prompt, and the shift with a CI.

    Warns (:class:`ShiftNotSignificantWarning`) when the ``1 - alpha`` bootstrap interval of the
    mean shift contains zero.
    """
    from mechdelta.patching._engine import PatchEngine

    engine = PatchEngine(pair, task)
    return engine_shift(engine, Bootstrap(n_boot, alpha, seed), warn=warn)


def engine_shift(engine: Any, boot: Bootstrap, *, warn: bool = True) -> ShiftResult:
    result = _engine_shift(engine, boot, warn=warn)
    if warn:
        _check_precision(engine, result)
    return result


def _check_precision(engine: Any, result: ShiftResult) -> None:
    """Warn when a half-precision pair's shift is within ten rounding scales of its logits.

    The rounding scale is the dtype's machine epsilon times the mean (over prompts, both models)
    of the largest |logit| the metric reads: one rounding of a logit of that size. A score is a
    difference of metrics divided by the shift, so with ``|shift| < 10 x scale`` rounding alone can
    move scores by 0.1 or more against float32 (measured: up to 0.1 for bf16 pairs).
    """
    dtype = engine.pair.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return
    scales = [
        float(state.logits.float().abs().amax(dim=(1, 2)).mean())
        for state in engine.states.values()
        if state.logits is not None
    ]
    scale = torch.finfo(dtype).eps * max(scales, default=0.0)
    if abs(result.shift) < 10 * scale:
        warnings.warn(
            f"the shift ({result.shift:+.4g}) is within ten rounding scales ({scale:.3g}) of this "
            f"{str(dtype).removeprefix('torch.')} pair's logits: scores may move by "
            f"{scale / max(abs(result.shift), 1e-12):.2g} of the shift or more against float32. "
            "Load the pair with dtype='float32' for small shifts.",
            PrecisionWarning,
            stacklevel=3,
        )


def _engine_shift(engine: Any, boot: Bootstrap, *, warn: bool) -> ShiftResult:
    return make_shift(
        engine.prepared.metric.name,
        engine.metric_of("reference"),
        engine.metric_of("intervened"),
        boot,
        task=engine.prepared.task.name,
        provenance=engine.provenance(),
        warn=warn,
    )


@dataclass(frozen=True, eq=False)
class FactorialResult:
    """Metric per prompt for each (model, input) cell of the 2x2 design.

    ``interaction = (I_clean - I_corrupted) - (R_clean - R_corrupted)``: non-zero when the
    intervention changed how the model responds to the input manipulation (the mechanism), zero
    when it moved the metric uniformly (a main effect of the model).
    """

    metric: str
    cells: dict[str, Float[Tensor, " batch"]]  # keys: reference/clean, reference/corrupted, ...
    interaction_ci: tuple[float, float]
    alpha: float = 0.05
    provenance: dict[str, Any] = field(default_factory=dict)

    def mean(self, model: str, inputs: str) -> float:
        return float(self.cells[f"{model}/{inputs}"].double().mean())

    @property
    def model_effect(self) -> float:
        """Shift on clean inputs (intervened - reference)."""
        return self.mean("intervened", "clean") - self.mean("reference", "clean")

    @property
    def input_effect(self) -> float:
        """Effect of corrupting the input on the reference model (clean - corrupted)."""
        return self.mean("reference", "clean") - self.mean("reference", "corrupted")

    @property
    def interaction(self) -> float:
        return (self.mean("intervened", "clean") - self.mean("intervened", "corrupted")) - (
            self.mean("reference", "clean") - self.mean("reference", "corrupted")
        )

    def table(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {
                inp: [self.mean("reference", inp), self.mean("intervened", inp)]
                for inp in ("clean", "corrupted")
            },
            index=pd.Index(["reference", "intervened"], name="model"),
        )

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        rows = []
        for key, values in self.cells.items():
            model, inputs = key.split("/")
            for i, v in enumerate(values.tolist()):
                rows.append({"model": model, "inputs": inputs, "prompt": i, "metric": v})
        return pd.DataFrame(rows)

    def figure(self) -> go.Figure:
        from mechdelta.plotting import factorial_figure

        return factorial_figure(self)

    def __str__(self) -> str:
        lo, hi = self.interaction_ci
        return (
            f"{self.metric}: model effect {self.model_effect:+.4g}, input effect "
            f"{self.input_effect:+.4g}, interaction {self.interaction:+.4g} [CI {lo:+.4g}, {hi:+.4g}]"
            f"\n{self.table().to_string()}"
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {k.replace("/", "."): v for k, v in self.cells.items()}
        meta = {
            "metric": self.metric,
            "interaction_ci": list(self.interaction_ci),
            "alpha": self.alpha,
            "provenance": self.provenance,
        }
        save_result(path, "factorial", meta, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactorialResult:
        meta, tensors = load_result(path, "factorial")
        try:
            return cls(
                metric=meta["metric"],
                cells={k.replace(".", "/"): v for k, v in tensors.items()},
                interaction_ci=(
                    float(meta["interaction_ci"][0]),
                    float(meta["interaction_ci"][1]),
                ),
                alpha=float(meta["alpha"]),
                provenance=meta.get("provenance", {}),
            )
        except _MALFORMED as exc:
            raise ResultFormatError(
                f"{os.fspath(path)!r} is not a valid factorial result: {exc!r}"
            ) from exc


def factorial(
    pair: ModelPair, task: Task, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> FactorialResult:
    """Run both models on clean and corrupted prompts: the 2x2 metrics and their interaction."""
    from dataclasses import replace

    from mechdelta.patching._engine import PatchEngine

    if task.corrupted is None:
        raise TaskError("factorial needs Task(corrupted=[...]): prompts with the input manipulated")
    clean = PatchEngine(pair, task)
    # Same read positions (corrupted prompts align token by token); the corrupted run is a task
    # whose prompts are the corrupted ones.
    corrupted = PatchEngine(pair, replace(task, prompts=task.corrupted, corrupted=None))
    cells = {
        f"{model}/{inp}": engine.metric_of(model)
        for inp, engine in (("clean", clean), ("corrupted", corrupted))
        for model in ("reference", "intervened")
    }
    inter = (cells["intervened/clean"] - cells["intervened/corrupted"]) - (
        cells["reference/clean"] - cells["reference/corrupted"]
    )
    boot = Bootstrap(n_boot, alpha, seed)
    ci = paired_shift_ci(torch.zeros_like(inter), inter, boot)
    if not all(math.isfinite(float(x)) for x in ci):
        raise TaskError("the interaction interval is not finite")
    return FactorialResult(
        metric=clean.prepared.metric.name,
        cells={k: v.float().cpu() for k, v in cells.items()},
        interaction_ci=(float(ci[0]), float(ci[1])),
        alpha=alpha,
        provenance=clean.provenance(),
    )
