"""Two-device pairs: the reference on one device, the intervened model on another.

``ModelPair.load(..., device=("cuda:0", "cuda:1"))`` builds such a pair. The patching engine keeps
each model's cached activations on that model's device and its prompts, metric inputs and
logits on the pair's *home* device (the reference's, ``pair.device``):
:class:`DeviceRunner` moves tokens to its model's device and the logits it returns back home, and
the engine moves every activation it splices from the source model onto the target's device.
Modules that do not support it call :func:`require_one_device`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechdelta.errors import DeviceError
from mechdelta.patching._runner import ModelRunner

__all__ = ["DeviceRunner", "model_device", "pair_devices", "require_one_device"]


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter."""
    return next(iter(model.parameters())).device


def pair_devices(pair: Any) -> tuple[torch.device, torch.device]:
    """``(reference's device, intervened's device)`` of a pair (both ``pair.device`` when the
    pair object does not say)."""
    devices = getattr(pair, "devices", None)
    if devices is None:
        return pair.device, pair.device
    return devices[0], devices[1]


def require_one_device(pair: Any, what: str) -> None:
    """Raise :class:`~mechdelta.errors.DeviceError` for a two-device pair, where ``what`` (e.g.
    ``"attribute"``) supports one device only."""
    ref, itv = pair_devices(pair)
    if ref != itv:
        raise DeviceError(
            f"{what} needs both models on one device, but the reference is on {ref} and the "
            f"intervened model on {itv}: two-device pairs are supported by sweep and patch; load "
            "the pair on one device (ModelPair.load(..., device='cuda:0')) for this analysis"
        )


def _to(x: Tensor | None, device: torch.device) -> Tensor | None:
    return None if x is None else x.to(device)


@dataclass
class DeviceRunner(ModelRunner):
    """A :class:`~mechdelta.patching._runner.ModelRunner` whose inputs may live elsewhere.

    Tokens and residuals given to it are moved to its model's device (:attr:`device`); the
    logits it returns are moved to ``home`` (the engine's device; ``None``: left on the model's).
    On one device every move is a no-op (``Tensor.to`` returns the tensor itself).
    """

    home: torch.device | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.device = model_device(self.model)

    def _home(self, x: Tensor) -> Tensor:
        return x if self.home is None else x.to(self.home)

    def logits_at(
        self,
        positions: Int[Tensor, "batch k"],
        *,
        tokens: Int[Tensor, "batch pos"] | None = None,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
        **kwargs: Any,
    ) -> Float[Tensor, "batch k d_vocab"]:
        """:meth:`ModelRunner.logits_at` with ``tokens`` / ``resid`` moved to the model's device
        and the logits moved home (the other arguments pass through unchanged)."""
        logits = super().logits_at(
            positions, tokens=_to(tokens, self.device), resid=_to(resid, self.device), **kwargs
        )
        return self._home(logits)

    def full_logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self._home(super().full_logits(tokens.to(self.device)))

    def record_block_convention(self, tokens: Int[Tensor, "batch pos"]) -> None:
        super().record_block_convention(tokens.to(self.device))

    def key_values(self, tokens: Int[Tensor, "batch pos"]) -> Any:
        """The model's clean keys/values (on its own device) for tokens from anywhere."""
        return super().key_values(tokens.to(self.device))
