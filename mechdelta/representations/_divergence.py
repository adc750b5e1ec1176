"""Pure divergence functions between the two models' activations and distributions (float64).

Every function takes the reference's value first and the intervened model's second, with the same
rows (token positions) in both.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["js_divergence", "kl_from_logits", "relative_delta"]


def relative_delta(reference: Float[Tensor, "n d"], intervened: Float[Tensor, "n d"]) -> float:
    """``||a_int - a_ref||_F / ||a_ref||_F``: Frobenius norms over all rows and features at once
    (the root of the summed squared L2 norms of the rows), so rows with large activations weigh
    more and no row's small norm inflates the ratio. 0 when the activations are equal; inf when
    the reference is all zeros and the intervened model's is not."""
    ref = reference.detach().to(torch.float64)
    delta = float((intervened.detach().to(torch.float64) - ref).square().sum().sqrt())
    if delta == 0.0:
        return 0.0
    base = float(ref.square().sum().sqrt())
    return math.inf if base == 0.0 else delta / base


def kl_from_logits(
    reference: Float[Tensor, "n d_vocab"], intervened: Float[Tensor, "n d_vocab"]
) -> Float[Tensor, " n"]:
    """Per row ``KL(p_ref || p_int) = Σ_v p_ref(v) (log p_ref(v) - log p_int(v))`` of the softmax
    distributions of two logit rows, in nats (float64). Exactly 0 for equal logits."""
    lp = torch.log_softmax(reference.detach().to(torch.float64), dim=-1)
    lq = torch.log_softmax(intervened.detach().to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def js_divergence(
    p: Float[Tensor, "*batch k"], q: Float[Tensor, "*batch k"]
) -> Float[Tensor, "*batch"]:
    """Jensen-Shannon divergence ``½ KL(p || m) + ½ KL(q || m)``, ``m = (p + q) / 2``, over the
    last axis, in nats (float64, in [0, ln 2]); terms with zero probability count 0. Exactly 0
    for equal distributions."""
    p64, q64 = p.detach().to(torch.float64), q.detach().to(torch.float64)
    m = (p64 + q64) / 2
    kl_p = torch.xlogy(p64, p64) - torch.xlogy(p64, m)
    kl_q = torch.xlogy(q64, q64) - torch.xlogy(q64, m)
    return (0.5 * (kl_p + kl_q)).sum(-1).clamp_min(0.0)
