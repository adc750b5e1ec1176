"""Linear centred kernel alignment (CKA) between two sets of activations on the same inputs.

Both functions take two matrices whose rows are the same ``n`` inputs (here: token positions) and
whose columns are features (``d_x`` and ``d_y`` may differ), and compute in float64.

- :func:`linear_cka` (Kornblith et al. 2019, eq. 5): with column-centred ``X`` and ``Y``,
  ``CKA = ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)``. This is the biased HSIC estimator
  ``tr(K H L H)`` with linear kernels ``K = X Xᵀ``, ``L = Y Yᵀ`` normalised by its value for each
  matrix with itself; the ``(n - 1)²`` factors cancel. It is 1 for identical activations and
  invariant to orthogonal transforms and isotropic scaling of either side, in [0, 1].
- :func:`debiased_linear_cka`: the same ratio with the unbiased HSIC estimator of Song et al.
  (2012), as in Kornblith et al. (2019) (``feature_space_linear_cka(debiased=True)``), which
  removes the upward bias plain CKA has when the number of features is not small against ``n``.
  It needs ``n >= 4`` and can be slightly negative; NaN when ``n < 4`` or when the unbiased HSIC of
  a matrix with itself is not positive.

Both return NaN when either side has no variance (a constant activation: CKA is undefined).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.errors import ConfigError

__all__ = ["debiased_linear_cka", "linear_cka"]


def _centred(x: Tensor) -> Tensor:
    x = x.detach().to(torch.float64)
    return x - x.mean(0, keepdim=True)


def _check(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"CKA needs two [n, d] matrices with the same rows, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise ConfigError(f"CKA needs at least 2 rows (inputs), got {x.shape[0]}")


def _dots(xc: Tensor, yc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(||Yᵀ X||², ||Xᵀ X||², ||Yᵀ Y||²)``, via the cheaper of the feature or the Gram form."""
    n = xc.shape[0]
    if n < min(xc.shape[1], yc.shape[1]):
        k, lg = xc @ xc.T, yc @ yc.T  # tr(K L) = ||Yᵀ X||²_F
        return (k * lg).sum(), (k * k).sum(), (lg * lg).sum()
    return (yc.T @ xc).square().sum(), (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum()


def linear_cka(x: Float[Tensor, "n d_x"], y: Float[Tensor, "n d_y"]) -> float:
    """Linear CKA between ``x`` and ``y`` (rows: the same inputs), in float64; see the module
    docstring. NaN when either side is constant over the rows."""
    _check(x, y)
    xc, yc = _centred(x), _centred(y)
    cross, xx, yy = _dots(xc, yc)
    denom = math.sqrt(float(xx)) * math.sqrt(float(yy))
    if denom == 0.0:
        return math.nan
    return float(cross) / denom


def _unbiased(dot: Tensor, rows_a: Tensor, rows_b: Tensor, n: int) -> float:
    """Song et al.'s unbiased HSIC times ``n (n - 3)`` (which cancels in CKA), from the squared
    Frobenius norm ``dot`` of the cross-covariance and the rows' squared norms (centred features;
    the estimator is invariant to centring)."""
    return float(
        dot - n / (n - 2) * (rows_a @ rows_b) + rows_a.sum() * rows_b.sum() / ((n - 1) * (n - 2))
    )


def debiased_linear_cka(x: Float[Tensor, "n d_x"], y: Float[Tensor, "n d_y"]) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Kornblith et al. 2019),
    in float64. NaN for fewer than 4 rows or a non-positive self-similarity."""
    _check(x, y)
    n = x.shape[0]
    if n < 4:
        return math.nan
    xc, yc = _centred(x), _centred(y)
    cross, xx, yy = _dots(xc, yc)
    rx, ry = xc.square().sum(1), yc.square().sum(1)
    hxy = _unbiased(cross, rx, ry, n)
    hxx = _unbiased(xx, rx, rx, n)
    hyy = _unbiased(yy, ry, ry, n)
    if not (hxx > 0.0 and hyy > 0.0):
        return math.nan
    return hxy / math.sqrt(hxx * hyy)
