"""Low-level forward passes on a TransformerLens bridge: cached clean runs and fast patched runs.

Three measured tricks make patched runs cheaper than TL's one-full-forward-per-site loop, all
are exact (the engine's tests check them against full forwards per model family):

- **Prefix reuse.** A patch at layer ``L`` cannot change blocks ``0..L-1``, so a patched run
  starts from the target's cached ``hook_resid_pre`` of block ``L``. The bridge's
  ``start_at_layer`` injects that residual but still executes the earlier blocks; here those
  blocks get an identity ``forward`` for the duration of the call, so they cost nothing while HF
  still builds rotary embeddings and masks at model level (no per-family code).
- **Position reuse.** For a by-position patch, positions before the earliest patched position
  ``p0`` are unchanged in every layer, so a run covers positions ``p0..`` only and attends to the
  clean run's keys/values for positions ``< p0``. HF-backed bridges use the HF model's own KV
  cache (:class:`DynamicCache`); TL-native bridges (``boot_native``) keep none, so for them the
  runner records each layer's keys/values (after rotary, before the grouped-query repeat) in a
  clean run and, during a patched run, gives every ``NativeAttention`` an instance-level forward
  that prepends them, offsets the causal mask and the rotary positions by ``p0``. The bridge's
  hooks (``hook_q/k/v``, ``hook_pattern``, ``hook_z``) fire on the shortened run as usual;
  ``hook_pattern`` covers all ``p0 + n`` key positions. (Prepending inside ``hook_k``/``hook_v``
  cannot work: ``NativeAttention`` reshapes them to the query length, and slices its causal
  mask as a square.)
- **Reading only what the metric needs.** The run stops with an exception from the last block's
  ``hook_resid_post``; ``ln_final`` and ``unembed`` are applied only at the metric's positions.

The engine checks every shortcut against the clean run once per model before using it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechdelta.errors import PatchingError

__all__ = [
    "CacheHooks",
    "Hook",
    "KeyValues",
    "ModelRunner",
    "NativeKeyValues",
    "NativePast",
    "prefix_cache",
]

Hook = tuple[str, Callable[..., Any]]
# Per layer (keys, values) ``[batch, kv_head, pos, d_head]`` of a clean run.
KeyValues = list[tuple[Tensor, Tensor]]


# What each model's blocks return (learned once per model object, forgotten with it).
_BLOCK_OUTPUT: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


_MISSING = object()


class _Stop(Exception):
    def __init__(self, resid: Tensor) -> None:
        super().__init__("stop")
        self.resid = resid


@dataclass
class ModelRunner:
    """Runs one bridge with hooks, optionally from a cached residual, returning logits at positions."""

    model: Any
    prefix_reuse: bool = True

    def __post_init__(self) -> None:
        self.n_layers = int(self.model.cfg.n_layers)
        self._last_hook = f"blocks.{self.n_layers - 1}.hook_resid_post"
        self._recorded = self.model in _BLOCK_OUTPUT
        self._block_output = _BLOCK_OUTPUT.get(self.model)  # None: tensor; k: tuple of length k
        self._native = _native_attentions(self.model)  # None unless a TL-native bridge

    # --- public --------------------------------------------------------------------------

    def logits_at(
        self,
        positions: Int[Tensor, "batch k"],
        *,
        tokens: Int[Tensor, "batch pos"] | None = None,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
        start_layer: int = 0,
        hooks: Sequence[Hook] = (),
        past_key_values: Any = None,
    ) -> Float[Tensor, "batch k d_vocab"]:
        """Logits at ``positions`` (per row) of a run from ``tokens``, or from ``resid`` entering
        block ``start_layer`` (blocks before it are skipped). With ``past_key_values`` (an HF
        cache of the first ``p0`` positions), ``resid`` holds positions ``p0..`` only and
        ``positions`` count from ``p0``; for a TL-native model the cache is a :class:`NativePast`
        (see :func:`prefix_cache`)."""

        def stop(x: Tensor, hook: Any) -> None:
            raise _Stop(x)

        all_hooks = [*hooks, (self._last_hook, stop)]
        try:
            with torch.no_grad():
                if resid is None:
                    if tokens is None:
                        raise PatchingError("logits_at needs tokens or a residual")
                    self._run(tokens, all_hooks, None)
                elif isinstance(past_key_values, NativePast):
                    with self._skip_blocks(start_layer), self._native_attention(past_key_values):
                        self._run(resid, all_hooks, start_layer)
                else:
                    with self._skip_blocks(start_layer):
                        self._run(resid, all_hooks, start_layer, past_key_values)
        except _Stop as stopped:
            final = stopped.resid
        else:
            raise PatchingError(
                f"the model never reached {self._last_hook}: is it a standard decoder-only stack?"
            )
        return self.unembed_at(final, positions)

    def unembed_at(
        self, resid: Float[Tensor, "batch pos d_model"], positions: Int[Tensor, "batch k"]
    ) -> Float[Tensor, "batch k d_vocab"]:
        idx = positions.to(resid.device)[..., None].expand(-1, -1, resid.shape[-1])
        picked = resid.gather(1, idx)
        with torch.no_grad():
            return self.model.unembed(self.model.ln_final(picked))

    def full_logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """The bridge's own forward (the reference the fast path is checked against)."""
        with torch.no_grad():
            return self.model(tokens)

    def record_block_convention(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Learn what a block returns (a tensor or a tuple) from one real forward."""
        if self._recorded:
            return
        seen: list[Any] = []

        def grab(module: Any, args: Any, output: Any) -> None:
            seen.append(output)

        handle = self.model.blocks[0].register_forward_hook(grab)
        try:
            with torch.no_grad():
                self.model(tokens[:1, :2])
        finally:
            handle.remove()
        out = seen[0]
        self._block_output = len(out) if isinstance(out, tuple) else None
        _BLOCK_OUTPUT[self.model] = self._block_output
        self._recorded = True

    # --- internals -----------------------------------------------------------------------

    def _run(
        self, inp: Tensor, hooks: list[Hook], start_layer: int | None, past: Any = None
    ) -> None:
        kwargs: dict[str, Any] = {"fwd_hooks": hooks}
        if start_layer is not None:
            kwargs["start_at_layer"] = start_layer
        if past is not None:
            kwargs["past_key_values"] = past
        self.model.run_with_hooks(inp, **kwargs)

    @contextmanager
    def _skip_blocks(self, start_layer: int) -> Iterator[None]:
        if not self.prefix_reuse or start_layer == 0:
            yield
            return
        if not self._recorded:
            raise PatchingError("record_block_convention must run before prefix reuse")
        n_out = self._block_output

        def identity(*args: Any, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            return x if n_out is None else (x, *([None] * (n_out - 1)))

        blocks = [self.model.blocks[i] for i in range(start_layer)]
        with _instance_forwards(blocks, [identity] * len(blocks)):
            yield

    def key_values(self, tokens: Int[Tensor, "batch pos"]) -> KeyValues | None:
        """Per-layer (keys, values) ``[batch, kv_head, pos, d_head]`` of a clean run: for a
        TL-native model recorded inside its attention (keys after rotary, before the grouped-query
        repeat), else from the HF model's own KV cache; None when neither is available."""
        if self._native is not None:
            return self._native_key_values(tokens)
        try:
            with torch.no_grad():
                out = self.model(tokens, return_type="logits_and_cache")
        except (TypeError, ValueError, NotImplementedError, AttributeError):
            return None
        cache = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != self.n_layers:
            return None
        kv: KeyValues = []
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, Tensor) or not isinstance(v, Tensor):
                return None  # some transformers releases (5.24) return the cache unfilled
            kv.append((k, v))
        return kv

    def _native_key_values(self, tokens: Int[Tensor, "batch pos"]) -> KeyValues | None:
        record: dict[int, tuple[Tensor, Tensor]] = {}
        try:
            with torch.no_grad(), self._native_attention(NativePast(0, None), record):
                self.model(tokens)
        except PatchingError:
            return None  # an attention mask or non-causal attention: no reuse
        if sorted(record) != list(range(self.n_layers)):
            return None
        return NativeKeyValues(record[layer] for layer in range(self.n_layers))

    @contextmanager
    def _native_attention(
        self, past: NativePast, record: dict[int, tuple[Tensor, Tensor]] | None = None
    ) -> Iterator[None]:
        """Give each ``NativeAttention`` a forward that records and/or prepends keys/values."""
        if self._native is None:
            raise PatchingError("this model has no TL-native attention to give a KV cache")
        modules = self._native
        forwards = [_native_forward(m, layer, past, record) for layer, m in enumerate(modules)]
        with _instance_forwards(modules, forwards):
            yield


@contextmanager
def _instance_forwards(
    modules: Sequence[Any], forwards: Sequence[Callable[..., Any]]
) -> Iterator[None]:
    """Give each module an instance-level ``forward`` for the duration of the block.

    Set in ``__dict__``: the bridge's ``__setattr__`` swallows plain sets. A module may already
    carry an instance-level forward (e.g. accelerate's hooks): whatever was there is restored,
    not just ours deleted."""
    before = [m.__dict__.get("forward", _MISSING) for m in modules]
    for module, forward in zip(modules, forwards, strict=True):
        module.__dict__["forward"] = forward
    try:
        yield
    finally:
        for module, old in zip(modules, before, strict=True):
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old


class NativeKeyValues(list[tuple[Tensor, Tensor]]):
    """:data:`KeyValues` recorded inside a TL-native model's attention (keys after rotary,
    before the grouped-query repeat); :func:`prefix_cache` turns them into a :class:`NativePast`."""


@dataclass(frozen=True)
class NativePast:
    """Keys/values of the first ``p0`` positions for a TL-native model's shortened run: per layer
    ``[batch, kv_head, p0, d_head]`` (``layers`` None: record only, nothing to prepend)."""

    p0: int
    layers: KeyValues | None

    def __post_init__(self) -> None:
        if self.p0 < 0:
            raise PatchingError(f"a KV prefix cannot have negative length ({self.p0})")
        if self.layers is None and self.p0:
            raise PatchingError("a KV prefix of length > 0 needs keys/values for every layer")


def _native_attentions(model: Any) -> list[Any] | None:
    """Each block's wrapped ``NativeAttention`` (exactly that class), or None if any is not."""
    try:
        from transformer_lens.model_bridge.sources.native.model import NativeAttention
    except ImportError:  # pragma: no cover - a TL without native models
        return None
    try:
        modules = [block.attn.original_component for block in model.blocks]
    except (AttributeError, TypeError):
        return None
    if not modules or any(type(m) is not NativeAttention for m in modules):
        return None
    return modules


def _native_forward(
    module: Any, layer: int, past: NativePast, record: dict[int, tuple[Tensor, Tensor]] | None
) -> Callable[..., tuple[Tensor, Tensor]]:
    """``NativeAttention.forward`` for queries at absolute positions ``p0..``, attending to the
    given keys/values of positions ``< p0`` and its own; with ``record``, stores its own keys
    (after rotary) and values. For ``p0 = 0`` it computes what the original forward computes."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    def forward(
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        pattern_fn: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        if attention_mask is not None or not module.causal:
            raise PatchingError(
                "position reuse needs causal attention without an attention mask; "
                "pass prefix_reuse=False"
            )
        batch, seq, _ = hidden_states.shape
        p0 = past.p0
        q = module.q(hidden_states).view(batch, seq, module.n_heads, module.d_head).transpose(1, 2)
        shape = (batch, seq, module.n_kv_heads, module.d_head)
        k = module.k(hidden_states).view(shape).transpose(1, 2)
        v = module.v(hidden_states).view(shape).transpose(1, 2)
        if module.rotary is not None:
            if p0:
                base = torch.arange(seq, device=q.device).expand(batch, -1)
                position_ids = (base if position_ids is None else position_ids) + p0
            q, k = module.rotary.apply_rope(q, k, position_ids=position_ids)
        if record is not None:
            record[layer] = (k.detach().clone(), v.detach().clone())
        if past.layers is not None and p0:
            past_k, past_v = past.layers[layer]
            k = torch.cat([past_k.to(k.dtype), k], dim=2)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
        if module.kv_repeats > 1:
            k = k.repeat_interleave(module.kv_repeats, dim=1)
            v = v.repeat_interleave(module.kv_repeats, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / module.scale
        scores = apply_softcap(scores, module.attn_scores_soft_cap)
        # query i sits at absolute position p0 + i and sees keys 0 .. p0 + i
        block_mask = module.causal_mask[p0 : p0 + seq, : k.shape[-2]]
        scores = scores.masked_fill(block_mask, float("-inf"))
        pattern = torch.softmax(scores, dim=-1).masked_fill(block_mask, 0.0)
        if pattern_fn is not None:
            pattern = pattern_fn(pattern)
        attn = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(batch, seq, -1)
        return module.o(attn), pattern

    return forward


def prefix_cache(kv: KeyValues, rows: slice, p0: int, copies: int) -> Any:
    """The cache :meth:`ModelRunner.logits_at` takes as ``past_key_values``: positions ``< p0``
    of prompts ``rows`` of ``kv`` (from :meth:`ModelRunner.key_values`), stacked ``copies`` times
    along the batch (variant-major, like the engine's stacked rows). An HF ``DynamicCache``, or a
    :class:`NativePast` for keys/values recorded in a TL-native model."""
    layers = [
        (k[rows, :, :p0].repeat(copies, 1, 1, 1), v[rows, :, :p0].repeat(copies, 1, 1, 1))
        for k, v in kv
    ]
    if isinstance(kv, NativeKeyValues):
        return NativePast(p0, layers)
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(layers):
        cache.update(k, v, layer)
    return cache


class CacheHooks:
    """Hooks that store activations by name (detached, on the model's device)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(dict.fromkeys(names))
        self.store: dict[str, Tensor] = {}

    def hooks(self) -> list[Hook]:
        # Keyed by the requested name: the bridge calls aliased hooks (hook_resid_pre) under
        # their canonical name (hook_in).
        def saver(name: str) -> Callable[..., None]:
            def save(x: Tensor, hook: Any) -> None:
                self.store[name] = x.detach().clone()

            return save

        return [(name, saver(name)) for name in self.names]

    def check(self) -> None:
        missing = [n for n in self.names if n not in self.store]
        if missing:
            raise PatchingError(f"hooks never fired while caching: {missing}")
