"""The compatibility contract between a reference and an intervened model.

Checked before any patching: same tokenizer vocabulary, same architecture fields, same hook names
and activation shapes, same weight processing, same dtype, and one device (unless the pair is
split over two devices on purpose: ``split_devices=True``). Each violation raises its own
typed error naming both values and how to fix it. Tokenizers that differ are diagnosed
(:mod:`mechdelta.core._tokenizers`); a pair whose vocabularies differ only by appended tokens can
opt in to the shared vocabulary (``vocab="shared"``: :func:`apply_shared_vocabulary`, then
``check_compatible(..., vocab="shared")``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mechdelta.core._loading import bridge_processing
from mechdelta.core._tokenizers import SharedVocabulary, diagnose_tokenizers, restrict_vocabulary
from mechdelta.errors import (
    ArchitectureMismatchError,
    ConfigError,
    DeviceMismatchError,
    DtypeMismatchError,
    HookMismatchError,
    ProcessingMismatchError,
    TokenizerMismatchError,
)

# How a pair treats its tokenizers: "exact" (identical) or "shared" (appended tokens mapped away).
VOCAB_MODES = ("exact", "shared")

# Architecture fields that must agree for site-by-site comparison.
ARCH_FIELDS = (
    "architecture",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "n_key_value_heads",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "attn_only",
    "positional_embedding_type",
    "normalization_type",
    "act_fn",
    "gated_mlp",
    "parallel_attn_mlp",
)


def arch_value(cfg: Any, name: str) -> Any:
    value = getattr(cfg, name, None)
    if name == "n_key_value_heads" and value is None:
        return getattr(cfg, "n_heads", None)
    if name == "d_mlp" and getattr(cfg, "attn_only", False):
        return None
    return value


def tokenizer_hash(tokenizer: Any) -> str:
    """A content hash of a tokenizer's vocabulary and special tokens ('none' without one)."""
    if tokenizer is None:
        return "none"
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    payload = json.dumps({"vocab": vocab, "special": special}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_tokenizers(reference: Any, intervened: Any, *, vocab: str = "exact") -> None:
    """Raise the explained :class:`TokenizerMismatchError` unless the tokenizers may pair.

    ``vocab="exact"``: identical vocabularies and special tokens. ``vocab="shared"``: identical,
    or one vocabulary is the other plus appended tokens (see :mod:`mechdelta.core._tokenizers`).
    """
    if vocab not in VOCAB_MODES:
        raise ConfigError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}")
    tr, ti = tokenizer_hash(reference), tokenizer_hash(intervened)
    if tr == ti:
        return
    if reference is None or intervened is None:
        raise TokenizerMismatchError(
            f"tokenizers differ: reference vocabulary hash {tr}, intervened {ti}. Token ids would "
            "not mean the same thing; load both models with one tokenizer (tokenizer=...)."
        )
    diff = diagnose_tokenizers(reference, intervened)
    if diff.kind == "identical" or (diff.kind == "appended" and vocab == "shared"):
        return
    raise diff.error()


def apply_shared_vocabulary(reference: Any, intervened: Any) -> SharedVocabulary:
    """Map an appended-tokens pair onto its shared vocabulary, in place; return the mapping.

    Both models' embedding and unembedding are cut to the shared ids
    (:func:`~mechdelta.core._tokenizers.restrict_vocabulary`), so every logit either model
    produces afterwards is a shared token's and softmax metrics renormalise over the shared
    vocabulary. Raises the explained :class:`TokenizerMismatchError` for any other difference.
    """
    mapping = SharedVocabulary.from_tokenizers(reference.tokenizer, intervened.tokenizer)
    for label, model in (("reference", reference), ("intervened", intervened)):
        if int(model.cfg.d_vocab) < mapping.n_shared:
            raise TokenizerMismatchError(
                f"the {label} model has d_vocab={model.cfg.d_vocab}, fewer rows than the "
                f"{mapping.n_shared} shared token ids: its tokenizer does not belong to it"
            )
        restrict_vocabulary(model, mapping.n_shared)
    return mapping


def first_param(model: Any) -> torch.Tensor:
    return next(iter(model.parameters()))


def check_compatible(
    reference: Any,
    intervened: Any,
    *,
    check_activations: bool = True,
    vocab: str = "exact",
    split_devices: bool = False,
) -> None:
    """Raise a specific IncompatibleModelsError subclass on the first violation found.

    The tokenizers are compared first (a vocabulary difference also shows up as a ``d_vocab``
    difference, and the tokenizer diagnosis says more). ``vocab="exact"`` requires identical
    tokenizers; ``vocab="shared"`` also accepts tokenizers that differ only by appended tokens,
    once :func:`apply_shared_vocabulary` has cut both models to the shared ids.
    ``split_devices=True`` accepts the two models on different devices (a deliberate two-device
    pair); otherwise they must share one.
    """
    check_tokenizers(reference.tokenizer, intervened.tokenizer, vocab=vocab)
    for name in ARCH_FIELDS:
        r, i = arch_value(reference.cfg, name), arch_value(intervened.cfg, name)
        if r != i:
            raise ArchitectureMismatchError(
                f"architecture field {name!r} differs: reference={r!r}, intervened={i!r}. "
                "mechdelta compares two checkpoints of one architecture; load a matching pair."
            )
    pr, pi = bridge_processing(reference), bridge_processing(intervened)
    if pr is not pi:
        raise ProcessingMismatchError(
            f"weight processing differs: reference={pr.value!r}, intervened={pi.value!r}. "
            "Load both with the same processing= (or call enable_compatibility_mode() on both)."
        )
    p_r, p_i = first_param(reference), first_param(intervened)
    if p_r.dtype != p_i.dtype:
        raise DtypeMismatchError(
            f"dtypes differ: reference={p_r.dtype}, intervened={p_i.dtype}. "
            "Load both with the same dtype= (or call .to(dtype) on one of them)."
        )
    if p_r.device != p_i.device and not split_devices:
        raise DeviceMismatchError(
            f"devices differ: reference on {p_r.device}, intervened on {p_i.device}. "
            "Load both with the same device= (or move one with .to(device)); for a pair split "
            "over two devices on purpose use ModelPair.load(..., device=(reference's, "
            "intervened's)) or ModelPair(..., split_devices=True)."
        )
    hr, hi = set(reference.hook_dict), set(intervened.hook_dict)
    if hr != hi:
        only_r = sorted(hr - hi)[:5]
        only_i = sorted(hi - hr)[:5]
        raise HookMismatchError(
            f"hook names differ: only in reference {only_r}, only in intervened {only_i}. "
            "Both models must be built by the same TransformerLens adapter."
        )
    if check_activations:
        _check_activation_shapes(reference, intervened)


@torch.no_grad()
def _check_activation_shapes(reference: Any, intervened: Any) -> None:
    # each model's probe on its own device (the two differ in a two-device pair)
    _, cache_r = reference.run_with_cache(_probe_tokens(reference))
    _, cache_i = intervened.run_with_cache(_probe_tokens(intervened))
    keys_r, keys_i = set(cache_r.keys()), set(cache_i.keys())
    if keys_r != keys_i:
        raise HookMismatchError(
            f"hooks that fire differ: only in reference {sorted(keys_r - keys_i)[:5]}, "
            f"only in intervened {sorted(keys_i - keys_r)[:5]}"
        )
    for key in sorted(keys_r):
        sr, si = tuple(cache_r[key].shape), tuple(cache_i[key].shape)
        if sr != si:
            raise HookMismatchError(
                f"activation shape at {key!r} differs: reference {sr}, intervened {si}"
            )


def _probe_tokens(model: Any) -> torch.Tensor:
    return torch.zeros((1, 2), dtype=torch.long, device=first_param(model).device)
