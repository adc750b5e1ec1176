"""Gradient passes: one model's forward with zero *probes* added at chosen hooks, and the gradient
of the summed per-prompt metric with respect to each probe.

A probe ``p = 0`` (requiring grad) added to the activation ``x`` at a hook leaves every value
unchanged, and ``d metric / d p`` is the total derivative of the metric with respect to ``x``:
every downstream path, including through other probed hooks, whatever the parameters'
``requires_grad``. Prompts are independent in a forward pass, so the gradient of the *sum* over
prompts holds each prompt's own gradient in its row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechdelta.core.metrics import Metric, MetricInputs
from mechdelta.errors import AttributionError

__all__ = ["Edit", "grad_pass"]

#: A function applied to a hook's activation before the probe (e.g. an interpolation).
Edit = Callable[[Tensor], Tensor]


def grad_pass(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, "batch k"],
    inputs: MetricInputs,
    metric: Metric,
    names: Sequence[str],
    *,
    edits: dict[str, Edit] | None = None,
    values: bool = False,
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor], dict[str, Tensor]]:
    """Metric per prompt, and per hook ``name`` the gradient of ``sum(metric)`` with respect to
    the activation there (zeros where the metric does not depend on it); with ``values=True``
    also the activations as they were in this pass (after ``edits``), detached. ``edits`` may
    name hooks outside ``names`` (e.g. a stop-gradient), which get no probe."""
    if torch.is_inference_mode_enabled():
        raise AttributionError(
            "attribution needs gradients, but torch.inference_mode() is active: call it outside "
            "the inference_mode() block"
        )
    probes: dict[str, Tensor] = {}
    seen: dict[str, Tensor] = {}
    edits = edits or {}

    probed = set(names)

    def hook_for(name: str) -> Callable[..., Tensor]:
        def hook(x: Tensor, hook: Any) -> Tensor:
            if name in edits:
                x = edits[name](x)
            if name not in probed:
                fired.add(name)
                return x
            if values:
                seen[name] = x.detach()
            probe = torch.zeros_like(x, requires_grad=True)
            probes[name] = probe
            return x + probe

        return hook

    fired: set[str] = set()
    hooks = [(name, hook_for(name)) for name in dict.fromkeys([*names, *edits])]
    try:
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            idx = positions.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])
            per_prompt = metric(logits.gather(1, idx), inputs)
            missing = [n for n, _ in hooks if n not in probes and n not in fired]
            if missing:
                raise AttributionError(
                    f"hooks {missing} never fired in the gradient pass: this bridge does not route "
                    "those activations through its hooks"
                )
            order = list(probes)
            grads = torch.autograd.grad(
                per_prompt.sum(), [probes[n] for n in order], allow_unused=True
            )
    except RuntimeError as exc:
        if "nference" in str(exc):
            raise AttributionError(
                "the models' tensors were created under torch.inference_mode() and cannot take "
                "part in a backward pass: load the pair outside inference_mode() (or clone its "
                f"parameters) to attribute ({exc})"
            ) from exc
        raise
    out = {
        n: torch.zeros_like(probes[n]) if g is None else g.detach()
        for n, g in zip(order, grads, strict=True)
    }
    return per_prompt.detach(), out, seen
