"""Attention-pattern scores that identify induction and previous-token heads.

Both scores are means of attention probabilities read from ``blocks.L.attn.hook_pattern``
(``[batch, head, query_pos, key_pos]``), so they lie in [0, 1]:

- previous-token score of a head: mean attention from each position ``q >= 1`` to ``q - 1``;
- induction score: for each scored target token ``t`` (predicted at query ``q = t - 1``), the
  attention from ``q`` to the *induction key* — the latest earlier position ``j + 1 < t`` whose
  token equals the target and whose predecessor ``j`` holds the query's token. That is the token an
  induction head copies ("A B ... A -> B").
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechdelta.errors import TaskError

__all__ = ["induction_keys", "induction_scores", "previous_token_scores"]


def induction_keys(
    tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> Int[Tensor, "batch pos"]:
    """For each target ``t`` marked in ``mask``, the induction key position, else -1."""
    tokens = torch.as_tensor(tokens)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if tokens.shape != mask.shape or tokens.dim() != 2:
        raise TaskError(
            f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be [batch, pos]"
        )
    keys = torch.full(tokens.shape, -1, dtype=torch.long)
    for b, t in mask.nonzero().tolist():
        if t < 2:
            continue
        q_tok, target = tokens[b, t - 1], tokens[b, t]
        # candidates k in [1, t-1]: tokens[k] == target and tokens[k-1] == query token
        hits = ((tokens[b, 1:t] == target) & (tokens[b, : t - 1] == q_tok)).nonzero()
        if len(hits):
            keys[b, t] = int(hits[-1, 0]) + 1
    return keys


@torch.no_grad()
def _patterns(model: Any, tokens: Tensor) -> list[Tensor]:
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[n].float() for n in names]


@torch.no_grad()
def previous_token_scores(
    model: Any, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer head"]:
    """Mean attention from each position to the one before it, per head."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise TaskError("previous_token_scores needs tokens [batch, pos] with pos >= 2")
    out = []
    for pattern in _patterns(model, tokens):
        diag = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, pos-1]
        out.append(diag.mean(dim=(0, 2)))
    return torch.stack(out)


@torch.no_grad()
def induction_scores(
    model: Any, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "layer head"]:
    """Mean attention from each scored target's query position to its induction key, per head.

    ``mask`` marks target tokens (as a Task's ``loss_mask``); targets with no induction key (no
    earlier "A B" for the current "A") are skipped. Raises TaskError when none has one.
    """
    tokens = torch.as_tensor(tokens)
    keys = induction_keys(tokens, mask)
    b_idx, t_idx = (keys >= 0).nonzero(as_tuple=True)
    if len(b_idx) == 0:
        raise TaskError("no scored target has an earlier 'A B' to induct from")
    q_idx, k_idx = t_idx - 1, keys[b_idx, t_idx]
    out = []
    for pattern in _patterns(model, tokens):
        vals = pattern[b_idx, :, q_idx, k_idx]  # [n, head]
        out.append(vals.mean(0))
    return torch.stack(out)
