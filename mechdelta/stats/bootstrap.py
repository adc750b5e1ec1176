"""Bootstrap statistics over prompts.

Every interval in mechdelta resamples *prompts* (the unit the claim generalises over) with a
seeded generator, so a result and its interval are reproducible. Resamples are drawn once as a
weight matrix ``[n_boot, batch]`` (counts / batch) and applied by matrix products, so intervals for
thousands of sites cost one matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.errors import ConfigError

__all__ = ["Bootstrap", "min_prompts", "paired_shift_ci", "score_ci"]


def min_prompts(alpha: float) -> int:
    """Fewest prompts a percentile bootstrap interval at level ``1 - alpha`` is built from.

    A resample drawing one prompt n times has probability ``n**-n``; while that exceeds
    ``alpha / 2`` the interval's ends are the smallest and largest prompt values themselves (for
    ``alpha = 0.05``: 1, 2 and 3 prompts), not an interval of the mean. Below this count intervals
    are NaN and nothing is called significant: 4 prompts for ``alpha = 0.05``, 5 for 0.001.
    """
    n = 2
    while n**-n >= alpha / 2:
        n += 1
    return n


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap over prompts: ``n_boot`` resamples, ``1 - alpha`` coverage, seeded."""

    n_boot: int = 2000
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_boot < 100:
            raise ConfigError(f"n_boot={self.n_boot} is too few for a percentile interval (>=100)")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha={self.alpha} must lie in (0, 1), e.g. 0.05 for a 95% CI")

    def weights(self, batch: int) -> Float[Tensor, "n_boot batch"]:
        """Resampling weights: row r holds how often each prompt is drawn, divided by ``batch``."""
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randint(0, batch, (self.n_boot, batch), generator=gen)
        counts = torch.zeros(self.n_boot, batch, dtype=torch.float64)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        return counts / batch

    def interval(self, samples: Float[Tensor, "... n_boot"]) -> Float[Tensor, "... 2"]:
        """Percentile interval of bootstrap samples (NaN-aware: NaN samples are ignored)."""
        q = torch.tensor([self.alpha / 2, 1 - self.alpha / 2], dtype=samples.dtype)
        if samples.numel() == 0 or bool(torch.isnan(samples).any()):
            return torch.nanquantile(samples, q, dim=-1).movedim(0, -1)
        # torch.quantile's linear interpolation between order statistics, taken from the few
        # smallest/largest samples (topk) instead of a full sort: the same numbers, ~7x faster
        # for grids of hundreds of sites x 2000 resamples
        n = samples.shape[-1]
        ends = []
        for p in q.tolist():
            at = p * (n - 1)
            lo = math.floor(at)
            hi = min(lo + 1, n - 1)
            if p <= 0.5:
                vals = samples.topk(hi + 1, dim=-1, largest=False).values  # ascending
                v_lo, v_hi = vals[..., lo], vals[..., hi]
            else:
                vals = samples.topk(n - lo, dim=-1, largest=True).values  # descending
                v_lo, v_hi = vals[..., n - 1 - lo], vals[..., n - 1 - hi]
            ends.append(v_lo + (at - lo) * (v_hi - v_lo))
        return torch.stack(ends, dim=-1)


def paired_shift_ci(
    reference: Float[Tensor, " batch"], intervened: Float[Tensor, " batch"], boot: Bootstrap
) -> Float[Tensor, " 2"]:
    """Interval of ``mean(intervened - reference)``, resampling prompts (paired); NaN with
    fewer than :func:`min_prompts` prompts."""
    if reference.shape[0] < min_prompts(boot.alpha):
        return torch.full((2,), float("nan"))
    diff = (intervened - reference).double()
    w = boot.weights(diff.shape[0])
    return boot.interval(w @ diff).float()


def score_ci(
    reference: Float[Tensor, " batch"],
    intervened: Float[Tensor, " batch"],
    patched: Float[Tensor, "site batch"],
    boot: Bootstrap,
    *,
    toward_reference: bool,
) -> Float[Tensor, "site 2"]:
    """Interval of the fraction of the shift explained, per site, resampling prompts jointly.

    ``toward_reference`` (reference -> intervened patching): ``(m_I - m_P) / (m_I - m_R)``;
    otherwise ``(m_P - m_R) / (m_I - m_R)``. Resamples whose shift is exactly 0 are dropped.
    NaN with fewer than :func:`min_prompts` prompts.
    """
    if reference.shape[0] < min_prompts(boot.alpha):
        return torch.full((patched.shape[0], 2), float("nan"))
    w = boot.weights(reference.shape[0])
    m_r = w @ reference.double()
    m_i = w @ intervened.double()
    m_p = patched.double() @ w.T  # [site, n_boot]
    shift = m_i - m_r
    num = (m_i - m_p) if toward_reference else (m_p - m_r)
    score = num / shift
    score = torch.where(shift == 0, torch.full_like(score, float("nan")), score)
    return boot.interval(score).float()
