"""Tokenizer differences between the two checkpoints of a pair, and the shared-vocabulary mapping.

A pair compares two models token by token, so a token id must mean the same string in both.
:func:`diagnose_tokenizers` compares two Hugging Face tokenizers and says how they differ:

- ``"identical"``: same id -> token table and same special-token roles;
- ``"appended"``: one vocabulary is the other plus tokens appended at the end (ids ``n_shared``
  and up; typically chat tokens such as ``<|im_start|>`` added by an instruct fine-tune), every
  shared id is the same token and the special-token roles agree;
- ``"special_tokens"``: the shared ids agree but a special-token role changed (``eos_token``
  became ``<|im_end|>``, a special token stopped being special, ...);
- ``"different"``: some id names a different token in the two vocabularies.

Only ``"identical"`` and ``"appended"`` pairs can run. An appended pair runs on the **shared
vocabulary** (:class:`SharedVocabulary`, opt-in): ids ``0 .. n_shared - 1``. Prompts, answers and
corrupted prompts may use shared ids only (a task with an appended token raises
:class:`~mechdelta.errors.TaskError` naming it), and both models' embedding and unembedding are
cut to the shared rows (:func:`restrict_vocabulary`): the logits of both models have
``d_vocab = n_shared`` entries, one per shared token. The unembedding rows of the appended tokens
(and any padding rows past the shared vocabulary) are dropped, so softmax-based metrics
(``logprob``, ``prob``, ``loss``, ``kl_to_reference``) renormalise over the shared vocabulary:
a probability is the probability of the token *among the shared tokens*, in both models alike.
Logit-difference metrics are unchanged by the cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechdelta.errors import ConfigError, TaskError, TokenizerMismatchError

DiffKind = Literal["identical", "appended", "special_tokens", "different"]
Side = Literal["reference", "intervened"]
_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)
_EXAMPLES = 5


def _id_table(tokenizer: Any) -> dict[int, str]:
    return {int(i): str(t) for t, i in tokenizer.get_vocab().items()}


def _special_roles(tokenizer: Any) -> dict[str, str | None]:
    return {role: getattr(tokenizer, role, None) for role in _ROLES}


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of every token the tokenizer treats as special (named roles and added specials)."""
    ids = {
        int(i)
        for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if getattr(tok, "special", False)
    }
    for role in _ROLES:
        value = getattr(tokenizer, f"{role}_id", None)
        if isinstance(value, int):
            ids.add(value)
    return ids


@dataclass(frozen=True)
class TokenizerDiff:
    """How the intervened model's tokenizer differs from the reference model's.

    Attributes:
        kind: ``"identical"``, ``"appended"``, ``"special_tokens"`` or ``"different"`` (module
            docstring).
        reference_size, intervened_size: number of ids in each vocabulary (``len(tokenizer)``).
        n_shared: ids ``0 .. n_shared - 1`` exist in both vocabularies (the smaller size).
        extended: which side holds the appended tokens (None when the sizes are equal).
        appended: ``(id, token)`` of every id past ``n_shared`` on the extended side.
        special_changes: ``(what, reference value, intervened value)`` for each special-token
            role whose token changed (``"eos_token"``, ...) and each shared id that is special
            in one tokenizer only (``"special id 7"``).
        n_differing: number of shared ids whose token string differs.
        examples: up to 5 ``(id, reference token, intervened token)`` of those ids.
    """

    kind: DiffKind
    reference_size: int
    intervened_size: int
    n_shared: int
    extended: Side | None = None
    appended: tuple[tuple[int, str], ...] = ()
    special_changes: tuple[tuple[str, str | None, str | None], ...] = ()
    n_differing: int = 0
    examples: tuple[tuple[int, str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.n_shared != min(self.reference_size, self.intervened_size):
            raise ConfigError(
                f"n_shared={self.n_shared} must be the smaller vocabulary size "
                f"({self.reference_size}, {self.intervened_size})"
            )
        if (self.extended is None) != (self.reference_size == self.intervened_size):
            raise ConfigError("extended names the larger vocabulary (None when sizes are equal)")

    @property
    def runnable(self) -> bool:
        """True when the pair can run as is (identical) or on the shared vocabulary (appended)."""
        return self.kind in ("identical", "appended")

    def explain(self) -> str:
        """What differs between the two tokenizers and what to do about it, in words."""
        sizes = f"reference {self.reference_size} ids, intervened {self.intervened_size} ids"
        if self.kind == "identical":
            return f"the tokenizers are identical ({sizes})."
        lines: list[str] = []
        if self.kind == "different":
            shown = ", ".join(f"id {i}: {r!r} vs {v!r}" for i, r, v in self.examples)
            lines.append(
                f"the vocabularies differ: {self.n_differing} of the {self.n_shared} shared ids "
                f"name different tokens ({sizes}; e.g. {shown}). Token ids do not mean the same "
                "thing in the two models, so activations at a position cannot be compared. "
                "These are not two checkpoints of one model with one tokenizer: load a pair that "
                "shares a tokenizer (or pass tokenizer=... if both models were in fact trained "
                "with the same one)."
            )
        if self.special_changes:
            shown = ", ".join(f"{w}: {r!r} -> {v!r}" for w, r, v in self.special_changes)
            lines.append(
                f"special tokens changed ({shown}). The shared ids name the same tokens, but a "
                "role such as BOS, EOS or padding means a different token in each model, and "
                "mechdelta uses one tokenizer's roles for both runs. If the change does not "
                "matter to your prompts, give both models one tokenizer (tokenizer=..., or set "
                "the role on one tokenizer to match the other); otherwise this pair cannot be "
                "compared token by token."
            )
        if self.appended:
            shown = ", ".join(f"{t!r} (id {i})" for i, t in self.appended[:10])
            more = f" and {len(self.appended) - 10} more" if len(self.appended) > 10 else ""
            lines.append(
                f"the {self.extended} tokenizer appends {len(self.appended)} token(s) after the "
                f"{self.n_shared} shared ids: {shown}{more}."
            )
            if self.kind == "appended":
                lines.append(
                    "Every shared id is the same token in both, so the pair can run on the "
                    'shared vocabulary: load it with vocab="shared" (prompts must then use '
                    "shared tokens only; logits of both models are cut to the shared ids, so "
                    "softmax metrics renormalise over the shared vocabulary)."
                )
        return " ".join(lines)

    def error(self) -> TokenizerMismatchError:
        """The typed error a pair with these tokenizers raises (message: :meth:`explain`)."""
        return TokenizerMismatchError("tokenizers differ: " + self.explain())


def diagnose_tokenizers(reference: Any, intervened: Any) -> TokenizerDiff:
    """Compare two Hugging Face tokenizers id by id (pure: neither tokenizer is modified).

    Args:
        reference: the reference model's tokenizer.
        intervened: the intervened model's tokenizer.
    """
    if reference is None or intervened is None:
        raise TokenizerMismatchError(
            "a tokenizer is missing (reference has one: "
            f"{reference is not None}, intervened: {intervened is not None}); pass tokenizer=..."
        )
    ref, itv = _id_table(reference), _id_table(intervened)
    n_ref, n_itv = len(ref), len(itv)
    for label, table in (("reference", ref), ("intervened", itv)):
        if set(table) != set(range(len(table))):
            raise TokenizerMismatchError(
                f"the {label} tokenizer's ids are not contiguous 0..{len(table) - 1}; mechdelta "
                "cannot map it onto another vocabulary"
            )
    n_shared = min(n_ref, n_itv)
    differing = [(i, ref[i], itv[i]) for i in range(n_shared) if ref[i] != itv[i]]
    extended: Side | None = None
    appended: tuple[tuple[int, str], ...] = ()
    if n_itv != n_ref:
        extended = "intervened" if n_itv > n_ref else "reference"
        longer = itv if n_itv > n_ref else ref
        appended = tuple((i, longer[i]) for i in range(n_shared, len(longer)))
    changes: list[tuple[str, str | None, str | None]] = []
    roles_r, roles_i = _special_roles(reference), _special_roles(intervened)
    changes += [(r, roles_r[r], roles_i[r]) for r in _ROLES if roles_r[r] != roles_i[r]]
    sp_r, sp_i = _special_ids(reference), _special_ids(intervened)
    for i in sorted((sp_r ^ sp_i) - {i for i, _ in appended}):
        if i < n_shared:
            changes.append(
                (f"special id {i}", ref[i] if i in sp_r else None, itv[i] if i in sp_i else None)
            )
    kind: DiffKind
    if differing:
        kind = "different"
    elif changes:
        kind = "special_tokens"
    elif appended:
        kind = "appended"
    else:
        kind = "identical"
    return TokenizerDiff(
        kind=kind,
        reference_size=n_ref,
        intervened_size=n_itv,
        n_shared=n_shared,
        extended=extended,
        appended=appended,
        special_changes=tuple(changes),
        n_differing=len(differing),
        examples=tuple(differing[:_EXAMPLES]),
    )


@dataclass(frozen=True)
class SharedVocabulary:
    """The mapping of an appended-tokens pair onto the ids both tokenizers share.

    Shared id ``i`` (``0 <= i < n_shared``) is the same token in both models and keeps its id;
    the appended ids have no counterpart and are excluded: tasks may not use them
    (:meth:`check_task`), and both models' logits are cut to the shared ids
    (:meth:`restrict_logits`, :func:`restrict_vocabulary`), which makes softmax metrics
    renormalise over the shared vocabulary.

    Attributes:
        n_shared: number of shared ids.
        extended: the side whose tokenizer holds the appended tokens.
        appended: ``(id, token)`` of the appended tokens.
        extended_tokenizer: that side's tokenizer, used to find appended tokens in text prompts
            (the shared side's tokenizer would silently split ``"<|im_end|>"`` into pieces).
    """

    n_shared: int
    extended: Side
    appended: tuple[tuple[int, str], ...]
    extended_tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.n_shared < 1:
            raise ConfigError(f"n_shared must be >= 1, got {self.n_shared}")
        if not self.appended:
            raise ConfigError("a shared vocabulary needs at least one appended token")

    @classmethod
    def from_tokenizers(cls, reference: Any, intervened: Any) -> SharedVocabulary:
        """The mapping for two tokenizers; the explained ``TokenizerMismatchError`` otherwise."""
        diff = diagnose_tokenizers(reference, intervened)
        if diff.kind != "appended" or diff.extended is None:
            if diff.kind == "identical":
                raise TokenizerMismatchError(
                    'vocab="shared" was asked for, but the tokenizers are identical: there is no '
                    'appended token to map away; load the pair with the default vocab="exact".'
                )
            raise diff.error()
        tok = intervened if diff.extended == "intervened" else reference
        return cls(diff.n_shared, diff.extended, diff.appended, tok)

    def _name(self, token_id: int) -> str:
        table = dict(self.appended)
        token = table.get(token_id)
        return f"{token!r} (id {token_id})" if token is not None else f"id {token_id}"

    def check_ids(self, ids: Tensor | list[int], label: str) -> None:
        """Raise :class:`~mechdelta.errors.TaskError` if ``ids`` holds a non-shared id."""
        values = ids.flatten().tolist() if isinstance(ids, Tensor) else list(ids)
        bad = sorted({int(v) for v in values if not 0 <= int(v) < self.n_shared})
        if bad:
            names = ", ".join(self._name(i) for i in bad[:5])
            raise TaskError(
                f"{label} uses token(s) outside the shared vocabulary: {names}. The pair runs on "
                f"the {self.n_shared} ids both tokenizers share; the {self.extended} tokenizer's "
                "appended tokens have no counterpart in the other model. Remove them from the "
                'task, or load the pair with vocab="exact" and one tokenizer.'
            )

    def check_text(self, text: str, label: str) -> None:
        """Raise ``TaskError`` if the extended tokenizer encodes ``text`` with an appended id."""
        if self.extended_tokenizer is None:
            return
        self.check_ids(self.extended_tokenizer.encode(text, add_special_tokens=False), label)

    def check_task(self, task: Any) -> None:
        """Check a :class:`~mechdelta.core.task.Task`'s prompts, corrupted prompts and answers."""
        for field in ("prompts", "corrupted", "answers", "wrong"):
            values = getattr(task, field, None)
            if values is None:
                continue
            if isinstance(values, Tensor):
                self.check_ids(values, field)
                continue
            for i, value in enumerate(values):
                label = f"{field}[{i}]"
                if isinstance(value, str):
                    self.check_text(value, label)
                elif isinstance(value, Tensor):
                    self.check_ids(value, label)
                elif isinstance(value, int):
                    self.check_ids([value], label)
                else:
                    self.check_ids([int(v) for v in value], label)

    def restrict_logits(
        self, logits: Float[Tensor, "... d_vocab"]
    ) -> Float[Tensor, "... d_vocab_shared"]:
        """The logits of the shared ids (the last axis cut to ``n_shared``)."""
        if logits.shape[-1] < self.n_shared:
            raise ConfigError(
                f"logits have {logits.shape[-1]} entries, fewer than the {self.n_shared} shared ids"
            )
        return logits[..., : self.n_shared]

    def to_dict(self) -> dict[str, Any]:
        """Provenance: the mapping as JSON-ready values."""
        return {
            "vocab": "shared",
            "n_shared": self.n_shared,
            "extended": self.extended,
            "appended": [[i, t] for i, t in self.appended],
        }


def _cut(tensor: Tensor, old: int, n: int, where: str) -> Tensor:
    axes = [a for a, s in enumerate(tensor.shape) if s == old]
    if len(axes) != 1:
        raise ConfigError(
            f"cannot tell the vocabulary axis of {where} (shape {tuple(tensor.shape)}, "
            f"d_vocab={old}); the shared-vocabulary mapping needs d_vocab to differ from the "
            "other dimensions"
        )
    return tensor.narrow(axes[0], 0, n).detach().clone()


@torch.no_grad()
def restrict_vocabulary(model: Any, n_shared: int) -> None:
    """Cut a TransformerLens bridge's embedding and unembedding to ids ``0 .. n_shared - 1``.

    In place: every parameter and buffer of ``model.embed`` and ``model.unembed`` with a
    ``d_vocab`` axis (embedding rows, unembedding rows or columns, output bias) keeps its first
    ``n_shared`` entries; tied weights stay tied; ``cfg.d_vocab`` (and ``d_vocab_out``) become
    ``n_shared``. The model's logits are then exactly the first ``n_shared`` logits it computed
    before (the cut rows only ever fed their own logits).
    """
    old = int(model.cfg.d_vocab)
    if not 1 <= n_shared <= old:
        raise ConfigError(f"n_shared must be in [1, d_vocab={old}], got {n_shared}")
    if n_shared == old:
        return
    # Old parameter id -> replacement; the old parameters are kept alive in ``originals`` so that
    # no new object can reuse a freed id and be mistaken for one of them.
    replaced: dict[int, torch.nn.Parameter] = {}
    originals: list[torch.nn.Parameter] = []
    for part in ("embed", "unembed"):
        root = getattr(model, part, None)
        if root is None:
            raise ConfigError(f"model has no {part!r} component to restrict")
        for module in root.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if old not in param.shape:
                    continue
                if id(param) not in replaced:
                    cut = _cut(param.data, old, n_shared, f"{part}.{name}")
                    replaced[id(param)] = torch.nn.Parameter(cut, param.requires_grad)
                    originals.append(param)
                setattr(module, name, replaced[id(param)])
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and old in buf.shape:
                    module.register_buffer(name, _cut(buf, old, n_shared, f"{part}.{name}"))
            for attr in ("num_embeddings", "out_features"):
                if getattr(module, attr, None) == old:
                    setattr(module, attr, n_shared)
    # Weights tied outside embed/unembed (e.g. HF's lm_head tied to the input embedding).
    original = getattr(model, "original_model", None)
    if original is not None:
        for module in original.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) in replaced:
                    setattr(module, name, replaced[id(param)])
        if getattr(getattr(original, "config", None), "vocab_size", None) == old:
            original.config.vocab_size = n_shared
    model.cfg.d_vocab = n_shared
    if getattr(model.cfg, "d_vocab_out", None) == old:
        model.cfg.d_vocab_out = n_shared
    originals.clear()
