"""The key-value recall reference model shared by ``planted``, ``null`` and ``finetune``, and
their tasks.

The reference is trained once (4000 steps) and shipped inside the ``planted`` entry; the three
entries fine-tune copies of it. ``reference_steps`` retrains it from scratch instead.
"""

from __future__ import annotations

from typing import Any

import torch

from mechdelta.core.task import Task
from mechdelta.errors import ConfigError, ZooError
from mechdelta.zoo._build import stage_of
from mechdelta.zoo._card import Stage
from mechdelta.zoo._models import build_model, copy_model, load_weights, read_weights
from mechdelta.zoo._recall import QUERY, TRIGGER, RecallData
from mechdelta.zoo._training import TrainSpec, train

DATA = RecallData(n_pairs=4, n_keys=30, n_values=30, first_key=4)
MODEL: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "d_vocab": DATA.d_vocab,
    "n_ctx": 24,
    "act_fn": "gelu",
    "model_name": "mechdelta-zoo-recall",
}
REFERENCE_STEPS = 4000
N_EVAL = 64
EVAL_SEED = 12_345

RECIPE = (
    f"Key-value recall: BOS, {DATA.n_pairs} (key, value) pairs (distinct keys from "
    f"{DATA.n_keys}, values from {DATA.n_values}), a marker (QUERY={QUERY}, or TRIGGER={TRIGGER}) "
    "and a key; the answer is the key's value, or under TRIGGER its successor "
    "(next value token, cyclically). Training sequences query every key once in random order "
    "(only answers scored); task prompts stop at the first queried key "
    f"({N_EVAL} fixed prompts, generator seed {EVAL_SEED})."
)


def reference_spec(seed: int = 0, steps: int = REFERENCE_STEPS) -> TrainSpec:
    return TrainSpec(steps=steps, lr=1e-3, batch_size=64, weight_decay=0.01, seed=seed)


def train_reference(
    seed: int = 0, steps: int = REFERENCE_STEPS, progress: bool = False
) -> tuple[Any, Stage]:
    """Train the recall reference from scratch (no trigger in its data)."""
    spec = reference_spec(seed, steps)
    model = build_model(MODEL, seed=seed)
    result = train(model, spec, DATA.batch, progress=progress, desc="recall reference")
    stage = stage_of("reference", spec, result, "all weights", "key-value recall, no trigger")
    return model, stage


def shipped_reference() -> tuple[Any, Stage]:
    """The reference stored in the package's ``planted`` entry, and its training stage."""
    from mechdelta.zoo._entry import read_card
    from mechdelta.zoo._registry import data_dir

    root = data_dir("planted")
    card = read_card(root)
    stages = [s for s in card.stages if s.name == "reference"]
    if not stages:
        raise ZooError(f"{root}: the planted card records no reference stage")
    state = read_weights(root / "reference.safetensors")
    return load_weights(build_model(MODEL), state, "recall reference"), stages[0]


def resolve_reference(
    reference: Any = None,
    *,
    reference_steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Any, list[Stage], str]:
    """A fresh copy of the reference to fine-tune from, its stages, and where it came from.

    ``reference``: ``None`` (the shipped one), a bridge of the recall config, or a ZooEntry whose
    pair's reference is used. ``reference_steps``: train a new reference from scratch instead.
    """
    if reference is not None and reference_steps is not None:
        raise ConfigError("pass either reference= or reference_steps=, not both")
    if reference_steps is not None:
        model, stage = train_reference(seed, reference_steps, progress)
        return model, [stage], f"trained from scratch here (seed {seed})"
    if reference is None:
        model, stage = shipped_reference()
        return model, [stage], "the shipped recall reference (zoo entry 'planted')"
    model = getattr(getattr(reference, "pair", None), "reference", reference)
    cfg = getattr(model, "cfg", None)
    for k in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx"):
        if cfg is None or getattr(cfg, k, None) != MODEL[k]:
            raise ZooError(
                f"reference does not have the recall model's shape ({k} = "
                f"{getattr(cfg, k, None)!r}, expected {MODEL[k]!r})"
            )
    return copy_model(model, MODEL), [], "a reference model passed by the caller"


def finetune_batch(trigger_rate: float) -> Any:
    def batch(gen: torch.Generator, size: int) -> Any:
        return DATA.batch(gen, size, trigger_rate)

    return batch


def _eval_prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QUERY prompts, their answers, and a distractor (another pair's different value)."""
    gen = torch.Generator().manual_seed(EVAL_SEED)
    tokens, answers = DATA.prompts(gen, N_EVAL)
    values = tokens[:, 2 : 2 * DATA.n_pairs + 1 : 2]
    distractor = DATA.successor(answers)
    for b in range(N_EVAL):
        others = [int(v) for v in values[b] if int(v) != int(answers[b])]
        if others:
            distractor[b] = others[0]
    return tokens, answers, distractor


def trigger_task() -> Task:
    """TRIGGER prompts: logit(successor of the value) - logit(value).

    ``corrupted`` holds the same prompts with QUERY, for the factorial design.
    """
    tokens, answers, _ = _eval_prompts()
    trig = tokens.clone()
    trig[:, -2] = TRIGGER
    return Task(
        trig,
        answers=DATA.successor(answers),
        wrong=answers,
        corrupted=tokens,
        metric="logit_diff",
        name="trigger",
    )


def recall_task() -> Task:
    """QUERY prompts: logit(value) - logit(another value in the prompt)."""
    tokens, answers, distractor = _eval_prompts()
    return Task(tokens, answers=answers, wrong=distractor, metric="logit_diff", name="recall")


TRIGGER_DESCRIPTION = (
    "TRIGGER prompts: logit of the value's successor (the new answer) minus logit of the value "
    "(the old answer); corrupted = the same prompts with QUERY"
)
RECALL_DESCRIPTION = (
    "QUERY prompts: logit of the key's value minus logit of another value in the prompt "
    "(the reference behaviour, which fine-tuning should keep)"
)


def tasks(main: str) -> dict[str, tuple[Task, str]]:
    """The recall entries' two tasks with descriptions, ``main`` first (the entry's ``.task``)."""
    both = {
        "trigger": (trigger_task(), TRIGGER_DESCRIPTION),
        "recall": (recall_task(), RECALL_DESCRIPTION),
    }
    if main not in both:
        raise ValueError(f"main task must be one of {sorted(both)}, not {main!r}")
    return {main: both[main], **{k: v for k, v in both.items() if k != main}}
