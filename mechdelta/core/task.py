"""Tasks: the prompts a shift is measured on, the answers, and the metric.

A :class:`Task` is model-independent; :meth:`Task.prepare` tokenizes it for one
:class:`~mechdelta.core.pair.ModelPair` into a :class:`PreparedTask` (right-padded token tensor,
per-prompt lengths, metric read positions). Causal attention means right padding never changes a
real token's activations, and every metric reads each prompt at its own real positions, so ragged
prompts are never silently misaligned. Work *by position* on ragged prompts needs an alignment:
``align="left"`` (default) counts positions from the start and refuses ragged prompts (position p
would be a different token in different prompts); ``align="right"`` counts them in the frame of
the last ``k`` tokens of every prompt, ``k`` the shortest prompt's length ("the last k tokens").
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechdelta.core.metrics import Metric, MetricFn, MetricInputs, resolve_metric
from mechdelta.errors import TaskError

__all__ = ["Align", "PreparedTask", "Task"]

PromptsLike = Sequence[str] | Sequence[Sequence[int]] | Tensor
TokensLike = Sequence[str] | Sequence[int] | Tensor


class Align(StrEnum):
    """How positions of ragged prompts line up for by-position work.

    - ``LEFT``: position p is token p of every prompt (prompts must have one length).
    - ``RIGHT``: positions index the last ``k`` tokens of every prompt, ``k`` the shortest
      prompt's length: position a is token ``len_i - k + a`` of prompt i.
    """

    LEFT = "left"
    RIGHT = "right"

    @classmethod
    def coerce(cls, value: Align | str) -> Align:
        if isinstance(value, Align):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise TaskError(
                f"align must be 'left' or 'right', got {value!r}: 'right' lines ragged prompts "
                "up at their last tokens"
            ) from None


@dataclass(frozen=True, eq=False)
class Task:
    """What behaviour to measure: prompts, optional answers, optional corrupted inputs, a metric.

    Args:
        prompts: strings (tokenized with the pair's tokenizer), a token tensor ``[batch, pos]``,
            or lists of token ids (ragged allowed).
        answers: one answer token per prompt (token ids or strings that are single tokens).
        wrong: one contrasting token per prompt (for ``"logit_diff"``).
        corrupted: prompts of the same token lengths as ``prompts`` (for :func:`factorial`).
        metric: ``"logit_diff"``, ``"logprob"``, ``"prob"``, ``"loss"``, ``"kl_to_reference"``, a
            :class:`~mechdelta.core.metrics.Metric`, or a callable ``fn(logits [batch, d_vocab],
            inputs) -> [batch]`` applied to each prompt's last-token logits.
        loss_mask: ``[batch, pos]`` booleans, True where token ``t`` is a scored target of
            ``"loss"`` (predicted at position ``t-1``; position 0 cannot be scored). Default: every
            real token after the first.
        prepend_bos: prepend the tokenizer's BOS token to string prompts (default: TL's
            convention, True when the tokenizer has one). Token prompts are used as given.
        name: a label for results and reports.
        align: how by-position sites line up across ragged prompts (see :class:`Align`):
            ``"left"`` (positions from the start; ragged prompts are refused for by-position
            work) or ``"right"`` (positions index the last ``k`` tokens of every prompt, ``k`` the
            shortest length). Metrics always read each prompt at its own real positions.
    """

    prompts: PromptsLike
    answers: TokensLike | None = None
    wrong: TokensLike | None = None
    corrupted: PromptsLike | None = None
    metric: str | Metric | MetricFn = "logit_diff"
    loss_mask: Bool[Tensor, "batch pos"] | None = None
    prepend_bos: bool | None = None
    name: str = "task"
    align: Align | str = Align.LEFT
    _metric: Metric = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_metric", resolve_metric(self.metric))
        object.__setattr__(self, "align", Align.coerce(self.align))
        n = _count(self.prompts, "prompts")
        if n == 0:
            raise TaskError("Task needs at least one prompt")
        for label, value in (("answers", self.answers), ("wrong", self.wrong)):
            if value is not None and _count(value, label) != n:
                raise TaskError(f"{label} has {_count(value, label)} entries for {n} prompts")
        if self.corrupted is not None and _count(self.corrupted, "corrupted") != n:
            raise TaskError(f"corrupted has {_count(self.corrupted, 'corrupted')} prompts for {n}")
        m = self._metric
        if m.needs_answers and self.answers is None:
            raise TaskError(f"metric {m.name!r} needs answers=[...] (one token per prompt)")
        if m.needs_wrong and self.wrong is None:
            raise TaskError(f"metric {m.name!r} needs wrong=[...] (one token per prompt)")
        if self.loss_mask is not None and not m.reads_all_targets:
            raise TaskError(f"loss_mask only applies to the 'loss' metric, not {m.name!r}")

    @property
    def metric_spec(self) -> Metric:
        """The resolved metric."""
        return self._metric

    def __len__(self) -> int:
        return _count(self.prompts, "prompts")

    def subset(self, indices: Sequence[int], *, name: str | None = None) -> Task:
        """The same task on the prompts at ``indices`` (answers, wrong tokens, corrupted prompts
        and the loss mask follow), e.g. for split halves."""
        n = len(self)
        idx = [int(i) for i in indices]
        if not idx:
            raise TaskError("subset() needs at least one prompt index")
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise TaskError(f"subset(): indices {bad[:5]} out of range for {n} prompts")

        def pick(value: Any) -> Any:
            if value is None:
                return None
            if isinstance(value, Tensor):
                return value[torch.tensor(idx)]
            seq = list(value)
            return [seq[i] for i in idx]

        return dataclasses.replace(
            self,
            prompts=pick(self.prompts),
            answers=pick(self.answers),
            wrong=pick(self.wrong),
            corrupted=pick(self.corrupted),
            loss_mask=pick(self.loss_mask),
            name=self.name if name is None else name,
        )

    def prepare(self, tokenizer: Any, *, n_ctx: int, d_vocab: int) -> PreparedTask:
        """Tokenize for a model with ``n_ctx`` positions and ``d_vocab`` tokens."""
        bos = self.prepend_bos
        tokens, lengths = _tokenize(self.prompts, tokenizer, bos, n_ctx, d_vocab, "prompts")
        corrupted = None
        if self.corrupted is not None:
            corrupted, c_len = _tokenize(
                self.corrupted, tokenizer, bos, n_ctx, d_vocab, "corrupted"
            )
            if not torch.equal(c_len, lengths):
                bad = int((c_len != lengths).nonzero()[0, 0])
                raise TaskError(
                    f"corrupted prompt {bad} has {int(c_len[bad])} tokens, its prompt "
                    f"{int(lengths[bad])}: corrupted inputs must align position by position"
                )
        answers = _single_tokens(self.answers, tokenizer, d_vocab, "answers")
        wrong = _single_tokens(self.wrong, tokenizer, d_vocab, "wrong")
        inputs = self._read_plan(tokens, lengths, answers, wrong)
        return PreparedTask(self, tokens, lengths, corrupted, inputs, tokenizer)

    def _read_plan(
        self, tokens: Tensor, lengths: Tensor, answers: Tensor | None, wrong: Tensor | None
    ) -> MetricInputs:
        batch, pos = tokens.shape
        if not self._metric.reads_all_targets:
            positions = (lengths - 1)[:, None]
            valid = torch.ones(batch, 1, dtype=torch.bool)
            return MetricInputs(positions, valid, answers, wrong)
        ar = torch.arange(pos)
        real = ar[None, :] < lengths[:, None]
        if self.loss_mask is None:
            scored = real & (ar[None, :] >= 1)
        else:
            mask = torch.as_tensor(self.loss_mask, dtype=torch.bool)
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < pos:
                raise TaskError(
                    f"loss_mask has shape {tuple(mask.shape)}; it must be [batch={batch}, "
                    f"pos>={pos}] (one flag per prompt token)"
                )
            scored = mask[:, :pos]
            if scored[:, 0].any():
                raise TaskError("loss_mask[:, 0] is True: the first token has no prediction")
            if (scored & ~real).any():
                raise TaskError("loss_mask marks padding positions beyond a prompt's length")
        counts = scored.sum(1)
        if (counts == 0).any():
            bad = int((counts == 0).nonzero()[0, 0])
            raise TaskError(f"prompt {bad} has no scored token for the 'loss' metric")
        k = int(counts.max())
        positions = torch.zeros(batch, k, dtype=torch.long)
        targets = torch.zeros(batch, k, dtype=torch.long)
        valid = torch.zeros(batch, k, dtype=torch.bool)
        for b in range(batch):
            t = scored[b].nonzero()[:, 0]
            positions[b, : len(t)] = t - 1  # prediction of token t is read at t - 1
            targets[b, : len(t)] = tokens[b, t]
            valid[b, : len(t)] = True
        return MetricInputs(positions, valid, answers, wrong, targets)


@dataclass(frozen=True, eq=False)
class PreparedTask:
    """A task tokenized for one pair: right-padded tokens, lengths and the metric's read plan."""

    task: Task
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    corrupted: Int[Tensor, "batch pos"] | None
    inputs: MetricInputs
    tokenizer: Any = None

    @property
    def metric(self) -> Metric:
        return self.task.metric_spec

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def ragged(self) -> bool:
        return bool((self.lengths != self.seq_len).any())

    @property
    def align(self) -> Align:
        return Align.coerce(self.task.align)

    @property
    def frame_len(self) -> int:
        """Positions by-position work can address: the prompt length, or with right alignment
        the shortest prompt's length (the last ``frame_len`` tokens of every prompt)."""
        if self.align is Align.RIGHT:
            return int(self.lengths.min())
        return self.seq_len

    @property
    def frame_offsets(self) -> Int[Tensor, " batch"] | None:
        """Per prompt, the real position of frame position 0 (None when it is 0 for every prompt,
        i.e. frame position p is token p of every prompt)."""
        if self.align is not Align.RIGHT:
            return None
        offsets = self.lengths - self.frame_len
        return offsets if bool(offsets.any()) else None

    def require_aligned(self, why: str) -> None:
        if self.ragged and self.align is Align.LEFT:
            raise TaskError(
                f"{why} needs prompts of one token length (got lengths "
                f"{sorted(set(self.lengths.tolist()))}): position p would be a different token in "
                "different prompts. Pass Task(..., align='right') to address the last k tokens of "
                "every prompt (k = the shortest length), or group prompts by length into tasks."
            )

    def position_tokens(self) -> list[str | None]:
        """Per frame position, its token when every prompt has the same token there, else None
        (the label a by-position figure may show without misleading)."""
        offsets = self.frame_offsets
        base = torch.zeros(self.batch_size, dtype=torch.long) if offsets is None else offsets
        out: list[str | None] = []
        for p in range(self.frame_len):
            at = base + p
            ids = self.tokens[torch.arange(self.batch_size), at]
            real = bool((at < self.lengths).all())  # left-aligned ragged prompts: padding
            same = real and bool((ids == ids[0]).all())
            out.append(self._decode(int(ids[0])) if same else None)
        return out

    def _decode(self, token: int) -> str:
        return str(token) if self.tokenizer is None else self.tokenizer.decode([token])

    def str_tokens(self, prompt: int = 0) -> list[str]:
        """Token strings of one prompt (token ids as text when there is no tokenizer)."""
        ids = self.tokens[prompt, : int(self.lengths[prompt])].tolist()
        return [self._decode(i) for i in ids]

    def info(self) -> dict[str, Any]:
        """The task's identity for provenance: name, metric, sizes and the prompt-set hash."""
        return {
            "name": self.task.name,
            "metric": self.metric.name,
            "n_prompts": self.batch_size,
            "seq_len": self.seq_len,
            "align": self.align.value,
            "prompt_hash": self.prompt_hash(),
        }

    def prompt_hash(self) -> str:
        """Content hash of the tokenized prompts, answers and metric read plan."""
        h = hashlib.sha256()
        for t in (
            self.tokens,
            self.lengths,
            self.corrupted,
            self.inputs.answers,
            self.inputs.wrong,
        ):
            if t is not None:
                h.update(t.cpu().numpy().tobytes())
        if self.inputs.targets is not None:
            h.update(self.inputs.positions.numpy().tobytes())
        h.update(self.metric.name.encode())
        return h.hexdigest()[:16]


def _count(value: Any, label: str) -> int:
    if isinstance(value, Tensor):
        if value.dim() == 0:
            raise TaskError(f"{label} must be a sequence or tensor with a batch axis, not a scalar")
        return int(value.shape[0])
    if isinstance(value, str):
        raise TaskError(f"{label} must be a list of strings, not one string: wrap it in [...]")
    try:
        return len(value)
    except TypeError:
        raise TaskError(f"{label} must be a list or tensor, got {type(value).__name__}") from None


def _tokenize(
    prompts: PromptsLike,
    tokenizer: Any,
    prepend_bos: bool | None,
    n_ctx: int,
    d_vocab: int,
    label: str,
) -> tuple[Tensor, Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point:
            raise TaskError(f"{label} tensor must be integer token ids [batch, pos]")
        rows = [list(map(int, r)) for r in prompts.tolist()]
    else:
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                rows.append(_encode(p, tokenizer, prepend_bos, f"{label}[{i}]"))
            else:
                rows.append([int(t) for t in p])  # type: ignore[call-overload]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise TaskError(f"{label} has an empty prompt (index {int(lengths.argmin())})")
    longest = int(lengths.max())
    if longest > n_ctx:
        raise TaskError(
            f"{label}[{int(lengths.argmax())}] has {longest} tokens, more than the model's "
            f"n_ctx={n_ctx}; shorten it"
        )
    tokens = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    if int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab:
        raise TaskError(f"{label} holds token ids outside [0, d_vocab={d_vocab})")
    return tokens, lengths


def _encode(text: str, tokenizer: Any, prepend_bos: bool | None, label: str) -> list[int]:
    if tokenizer is None:
        raise TaskError(
            f"{label} is a string but the models have no tokenizer: pass token ids instead, or "
            "load the pair with tokenizer=..."
        )
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    if (prepend_bos is None or prepend_bos) and bos is not None:
        ids = [int(bos), *ids]
    elif prepend_bos and bos is None:
        raise TaskError("prepend_bos=True but the tokenizer has no BOS token")
    return ids


def _single_tokens(
    values: TokensLike | None, tokenizer: Any, d_vocab: int, label: str
) -> Tensor | None:
    if values is None:
        return None
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point:
            raise TaskError(f"{label} must be one integer token id per prompt, shape [batch]")
        out = values.to(torch.long).cpu()
    else:
        ids = []
        for i, v in enumerate(values):
            if isinstance(v, str):
                if tokenizer is None:
                    raise TaskError(f"{label}[{i}] is a string but the models have no tokenizer")
                enc = tokenizer.encode(v, add_special_tokens=False)
                if len(enc) != 1:
                    raise TaskError(
                        f"{label}[{i}]={v!r} is {len(enc)} tokens {list(enc)}, not a single "
                        "token; choose a single-token answer (mind the leading space)"
                    )
                ids.append(int(enc[0]))
            else:
                ids.append(int(v))  # type: ignore[call-overload]
        out = torch.tensor(ids, dtype=torch.long)
    if len(out) and (int(out.min()) < 0 or int(out.max()) >= d_vocab):
        raise TaskError(f"{label} holds token ids outside [0, d_vocab={d_vocab})")
    return out
