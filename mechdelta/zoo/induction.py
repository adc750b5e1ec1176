"""The ``induction`` entry: a 2-layer attention-only model before and after the induction bump.

One training run on sequences with a repeated random segment (see :class:`RepeatData`); the
reference is the checkpoint at step 400, before the phase change, the intervened model the one at
step 1500, after it. The task is the loss on the predictable tokens of the second copy.

Ground truth: the heads whose attention function the phase change created, found by the zoo's own
attention scores on the task's prompts in the intervened model: induction heads (layers >= 1,
induction score >= :data:`INDUCTION_THRESHOLD`) and previous-token heads (layers below the last,
previous-token score >= :data:`PREVIOUS_TOKEN_THRESHOLD`), as ``head_out`` sites.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechdelta.core.sites import Site
from mechdelta.core.task import Task
from mechdelta.errors import ConfigError
from mechdelta.zoo._build import assemble, stage_of
from mechdelta.zoo._entry import ZooEntry
from mechdelta.zoo._induction_data import RepeatData
from mechdelta.zoo._models import build_model, load_weights
from mechdelta.zoo._scores import induction_scores, previous_token_scores
from mechdelta.zoo._training import TrainSpec, train

__all__ = [
    "DATA",
    "INDUCTION_THRESHOLD",
    "MODEL",
    "PREVIOUS_TOKEN_THRESHOLD",
    "build",
    "eval_batch",
    "ground_truth_heads",
    "task",
]

DESCRIPTION = (
    "Training dynamics: a 2-layer attention-only transformer before (reference) and after "
    "(intervened) the induction-head phase change, on sequences with a repeated random segment."
)
MODEL: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_vocab": 300,
    "n_ctx": 64,
    "act_fn": "gelu",
    "attn_only": True,
    "model_name": "mechdelta-zoo-induction",
}
DATA = RepeatData(d_vocab=300, n_ctx=64, min_len=8, max_len=31)
DEFAULT_STEPS = 1500
DEFAULT_REFERENCE_STEPS = 400
N_EVAL = 32
EVAL_SEED = 10_000
INDUCTION_THRESHOLD = 0.5
PREVIOUS_TOKEN_THRESHOLD = 0.3


def eval_batch(seed: int = 0) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """The task's fixed prompts (``N_EVAL`` sequences of ``n_ctx`` tokens) and predictable mask."""
    return DATA.sample(torch.Generator().manual_seed(EVAL_SEED + seed), N_EVAL)


def task(seed: int = 0) -> Task:
    """Mean loss on the predictable second-copy tokens of the fixed evaluation batch."""
    tokens, mask = eval_batch(seed)
    return Task(tokens, metric="loss", loss_mask=mask, name="second_copy_loss")


def ground_truth_heads(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    *,
    induction_threshold: float = INDUCTION_THRESHOLD,
    previous_token_threshold: float = PREVIOUS_TOKEN_THRESHOLD,
) -> frozenset[Site]:
    """Induction heads (layers >= 1) and previous-token heads (below the last layer) by score."""
    ind = induction_scores(model, tokens, mask)
    prev = previous_token_scores(model, tokens)
    n_layers, n_heads = ind.shape
    sites = set()
    for layer in range(n_layers):
        for head in range(n_heads):
            if layer >= 1 and float(ind[layer, head]) >= induction_threshold:
                sites.add(Site("head_out", layer, head=head))
            if layer < n_layers - 1 and float(prev[layer, head]) >= previous_token_threshold:
                sites.add(Site("head_out", layer, head=head))
    return frozenset(sites)


def _rounded(t: Tensor) -> list[list[float]]:
    return [[round(float(x), 4) for x in row] for row in t]


def build(
    out: str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    reference_steps: int | None = None,
    progress: bool = False,
) -> ZooEntry:
    """Train from scratch; reference = the checkpoint at ``reference_steps``, intervened = end.

    Args:
        out: write the entry here (``None``: keep it in memory).
        steps: total training steps (default 1500).
        seed: model-initialisation and data seed.
        reference_steps: the reference checkpoint's step (default 400, or ``steps // 3`` when
            ``steps`` is below 1200).
        progress: show a progress bar.
    """
    total = DEFAULT_STEPS if steps is None else steps
    if reference_steps is None:
        reference_steps = DEFAULT_REFERENCE_STEPS if total >= 1200 else total // 3
    if not 0 <= reference_steps < total:
        raise ConfigError(
            f"reference_steps={reference_steps} must lie in [0, steps={total}): the reference is "
            "an earlier checkpoint of the same run"
        )
    spec = TrainSpec(steps=total, lr=1e-3, batch_size=32, weight_decay=0.01, seed=seed)
    model = build_model(MODEL, seed=seed)
    result = train(
        model,
        spec,
        DATA.train_batch,
        snapshots=[reference_steps],
        progress=progress,
        desc="induction",
    )
    reference = load_weights(build_model(MODEL), result.snapshots[reference_steps], "snapshot")
    tokens, mask = eval_batch(seed)
    scores = {
        which: {
            "induction": _rounded(induction_scores(m, tokens, mask)),
            "previous_token": _rounded(previous_token_scores(m, tokens)),
        }
        for which, m in (("reference", reference), ("intervened", model))
    }
    heads = ground_truth_heads(model, tokens, mask)
    listed = ", ".join(sorted(map(str, heads)))
    rule = (
        f"attention scores on the task's prompts in the intervened model: induction heads = "
        f"heads in layers >= 1 with induction score >= {INDUCTION_THRESHOLD}; previous-token "
        f"heads = heads below the last layer with previous-token score >= "
        f"{PREVIOUS_TOKEN_THRESHOLD} (scores in measurements['attention_scores'])"
    )
    if heads:
        gt: frozenset[Site] | None = heads
        reason = f"Determined by {rule}. Found: {listed}."
    else:
        gt = None
        reason = (
            f"No head passed the thresholds of the rule ({rule}): this run was too short for "
            "the induction phase change, so no ground truth is given."
        )
    stage = stage_of(
        "training",
        spec,
        result,
        "all weights",
        f"repeated random segment, lengths {DATA.min_len}-{DATA.max_len}, vocab {DATA.d_vocab}",
    )
    return assemble(
        name="induction",
        description=DESCRIPTION,
        model=MODEL,
        seed=seed,
        stages=[stage],
        data_recipe=(
            f"{DATA.n_ctx} uniform random tokens from {DATA.d_vocab}, in which a random segment "
            f"of random length L in [{DATA.min_len}, {DATA.max_len}] appears twice: at a random "
            "offset, and again after a random gap. Training scores every next token; the task "
            f"is {N_EVAL} fixed sequences (generator seed {EVAL_SEED + seed}) scored on the "
            "second copy's tokens after its first (loss_mask). Reference = checkpoint at step "
            f"{reference_steps}, intervened = step {total} of the same run."
        ),
        reference=reference,
        intervened=model,
        tasks={
            "second_copy_loss": (
                Task(tokens, metric="loss", loss_mask=mask, name="second_copy_loss"),
                "mean cross-entropy on the predictable tokens of the repeated segment",
            )
        },
        ground_truth=gt,
        ground_truth_reason=reason,
        known=(
            "Reference and intervened are checkpoints of one run: every weight differs "
            "between them.",
            "The ground truth names the heads whose attention function the phase change "
            "created (by the score rule), as head_out sites.",
        ),
        unknown=(
            "Whether weight changes outside the ground-truth heads (embeddings, unembedding, "
            "other heads) also carry part of the loss shift; patching measures that.",
            "How much of the shift each ground-truth head carries individually.",
        ),
        measurements={
            "attention_scores": scores,
            "thresholds": {
                "induction": INDUCTION_THRESHOLD,
                "previous_token": PREVIOUS_TOKEN_THRESHOLD,
            },
            "reference_step": reference_steps,
        },
        out=out,
    )
