"""Behaviour metrics, read only at the positions they need.

A metric turns logits at a few positions per prompt into one number per prompt. The engine never
materialises ``[batch, pos, d_vocab]`` logits for a whole sequence: it gathers the residual stream
at the positions a metric asks for (:meth:`Metric.positions`) and unembeds only those.

Built-ins (by name in :class:`~mechdelta.core.task.Task`):

- ``"logit_diff"``: ``logit[answer] - logit[wrong]`` at each prompt's last token.
- ``"logprob"`` / ``"prob"``: log-probability / probability of ``answer`` at the last token.
- ``"loss"``: mean next-token cross-entropy over the targets marked in ``Task.loss_mask``
  (all real tokens after the first when no mask is given).
- ``"kl_to_reference"``: ``KL(reference || model)`` of the next-token distribution at the last
  token; 0 for the reference model by construction.

A plain callable ``fn(logits, inputs) -> values`` is vectorised over the batch: it gets the last
token's logits ``[batch, d_vocab]`` and the :class:`MetricInputs`, and returns ``[batch]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechdelta.errors import MetricError

__all__ = ["BuiltinMetric", "Metric", "MetricInputs", "resolve_metric"]


class BuiltinMetric(StrEnum):
    LOGIT_DIFF = "logit_diff"
    LOGPROB = "logprob"
    PROB = "prob"
    LOSS = "loss"
    KL_TO_REFERENCE = "kl_to_reference"


@dataclass(frozen=True)
class MetricInputs:
    """What a metric may read besides logits, aligned with the gathered positions.

    ``positions[b, k]`` is the k-th position read for prompt b, ``valid[b, k]`` whether it is a
    real read (prompts read different numbers of positions for ``"loss"``), ``targets[b, k]`` the
    next token at that position (for ``"loss"``).
    """

    positions: Int[Tensor, "batch k"]
    valid: Bool[Tensor, "batch k"]
    answers: Int[Tensor, " batch"] | None = None
    wrong: Int[Tensor, " batch"] | None = None
    targets: Int[Tensor, "batch k"] | None = None
    reference_logprobs: Float[Tensor, "batch k d_vocab"] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> MetricInputs:
        changes: dict[str, Any] = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **changes)

    def select(self, index: Tensor | slice) -> MetricInputs:
        """The inputs of a subset of prompts (``index`` into the batch axis)."""
        return self._map(lambda v: v[index])

    def repeat(self, n: int) -> MetricInputs:
        """Stack ``n`` copies along the batch (variant-major: copy i is rows i*B..(i+1)*B)."""
        if n == 1:
            return self
        return self._map(lambda v: v.repeat(n, *([1] * (v.dim() - 1))))

    def with_reference(self, logprobs: Float[Tensor, "batch k d_vocab"]) -> MetricInputs:
        return replace(self, reference_logprobs=logprobs)

    def to(self, device: torch.device) -> MetricInputs:
        return self._map(lambda v: v.to(device))


MetricFn = Callable[[Tensor, MetricInputs], Tensor]


@dataclass(frozen=True)
class Metric:
    """A metric: a name, which positions it reads, and the function of the gathered logits.

    ``fn(logits [batch, k, d_vocab], inputs) -> [batch]``. ``reads_all_targets`` marks the loss
    metric, which reads every scored position instead of the last token.
    """

    name: str
    fn: Callable[[Tensor, MetricInputs], Tensor]
    reads_all_targets: bool = False
    needs_reference: bool = False
    needs_answers: bool = False
    needs_wrong: bool = False
    higher_is: str = "better"

    def __call__(
        self, logits: Float[Tensor, "batch k d_vocab"], inputs: MetricInputs
    ) -> Float[Tensor, " batch"]:
        out = self.fn(logits, inputs)
        n = logits.shape[0]
        if not isinstance(out, Tensor) or out.shape != (n,):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise MetricError(
                f"metric {self.name!r} returned {got}; it must return one value per prompt, a "
                f"tensor of shape ({n},). Reduce over vocabulary/positions inside the metric."
            )
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise MetricError(
                f"metric {self.name!r} returned {bad} non-finite value(s) (NaN or inf); check "
                "the metric for log(0) or division by zero, or the model for overflow (dtype)."
            )
        return out.float()


def _last(logits: Tensor) -> Tensor:
    return logits[:, 0, :]


def _need(value: Tensor | None, name: str, metric: str) -> Tensor:
    if value is None:
        raise MetricError(f"metric {metric!r} needs Task({name}=...), one token per prompt")
    return value


def _logit_diff(logits: Tensor, inputs: MetricInputs) -> Tensor:
    last = _last(logits).float()
    ans = _need(inputs.answers, "answers", "logit_diff")
    wrong = _need(inputs.wrong, "wrong", "logit_diff")
    return last.gather(1, ans[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]


def _logprob(logits: Tensor, inputs: MetricInputs) -> Tensor:
    lp = _last(logits).float().log_softmax(-1)
    return lp.gather(1, _need(inputs.answers, "answers", "logprob")[:, None])[:, 0]


def _prob(logits: Tensor, inputs: MetricInputs) -> Tensor:
    return _logprob(logits, inputs).exp()


def _loss(logits: Tensor, inputs: MetricInputs) -> Tensor:
    if inputs.targets is None:
        raise MetricError("metric 'loss' needs next-token targets (the Task provides them)")
    lp = logits.float().log_softmax(-1)
    nll = -lp.gather(2, inputs.targets[..., None])[..., 0]
    valid = inputs.valid.to(nll.dtype)
    return (nll * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def _kl(logits: Tensor, inputs: MetricInputs) -> Tensor:
    if inputs.reference_logprobs is None:
        raise MetricError("metric 'kl_to_reference' needs the reference run's log-probabilities")
    lp = _last(logits).float().log_softmax(-1)
    ref = inputs.reference_logprobs[:, 0, :].float()
    return (ref.exp() * (ref - lp)).sum(-1).clamp_min(0.0)


_BUILTINS: dict[BuiltinMetric, Metric] = {
    BuiltinMetric.LOGIT_DIFF: Metric(
        "logit_diff", _logit_diff, needs_answers=True, needs_wrong=True
    ),
    BuiltinMetric.LOGPROB: Metric("logprob", _logprob, needs_answers=True),
    BuiltinMetric.PROB: Metric("prob", _prob, needs_answers=True),
    BuiltinMetric.LOSS: Metric("loss", _loss, reads_all_targets=True, higher_is="worse"),
    BuiltinMetric.KL_TO_REFERENCE: Metric(
        "kl_to_reference", _kl, needs_reference=True, higher_is="worse"
    ),
}


def resolve_metric(metric: str | Metric | MetricFn) -> Metric:
    """A built-in name, a :class:`Metric`, or a vectorised callable on last-token logits."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return _BUILTINS[BuiltinMetric(metric)]
        except ValueError:
            known = ", ".join(m.value for m in BuiltinMetric)
            raise MetricError(
                f"unknown metric {metric!r}; use one of {known} or a callable "
                "fn(logits [batch, d_vocab], inputs) -> [batch]"
            ) from None
    if callable(metric):
        user = metric
        name = getattr(user, "__name__", type(user).__name__)

        def call_last(logits: Tensor, inputs: MetricInputs) -> Tensor:
            return user(_last(logits), inputs)

        return Metric(name, call_last)
    raise MetricError(f"metric must be a name or a callable, got {type(metric).__name__}")
