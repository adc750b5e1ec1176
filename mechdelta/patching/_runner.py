"""Low-level forward passes on a TransformerLens bridge: cached clean runs and fast patched runs.

Two measured tricks make patched runs cheaper than TL's one-full-forward-per-site loop, and both
are exact (the engine's tests check them against full forwards per model family):

- **Prefix reuse.** A patch at layer ``L`` cannot change blocks ``0..L-1``, so a patched run
  starts from the target's cached ``hook_resid_pre`` of block ``L``. The bridge's
  ``start_at_layer`` injects that residual but still executes the earlier blocks; here those
  blocks get an identity ``forward`` for the duration of the call, so they cost nothing while HF
  still builds rotary embeddings and masks at model level (no per-family code).
- **Reading only what the metric needs.** The run stops with an exception from the last block's
  ``hook_resid_post``; ``ln_final`` and ``unembed`` are applied only at the metric's positions.
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

__all__ = ["CacheHooks", "Hook", "ModelRunner", "prefix_cache"]

Hook = tuple[str, Callable[..., Any]]


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
        ``positions`` count from ``p0``."""

        def stop(x: Tensor, hook: Any) -> None:
            raise _Stop(x)

        all_hooks = [*hooks, (self._last_hook, stop)]
        try:
            with torch.no_grad():
                if resid is None:
                    if tokens is None:
                        raise PatchingError("logits_at needs tokens or a residual")
                    self._run(tokens, all_hooks, None)
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
        # A block may already carry an instance-level forward (e.g. accelerate's hooks): restore
        # whatever was there, not just delete ours.
        before = [block.__dict__.get("forward", _MISSING) for block in blocks]
        for block in blocks:
            block.__dict__["forward"] = identity  # the bridge's __setattr__ swallows plain sets
        try:
            yield
        finally:
            for block, old in zip(blocks, before, strict=True):
                if old is _MISSING:
                    block.__dict__.pop("forward", None)
                else:
                    block.__dict__["forward"] = old

    def key_values(self, tokens: Int[Tensor, "batch pos"]) -> list[tuple[Tensor, Tensor]] | None:
        """Per-layer (keys, values) ``[batch, kv_head, pos, d_head]`` of a clean run, from the HF
        model's own KV cache; None when the model keeps none (e.g. TL-native models)."""
        try:
            with torch.no_grad():
                out = self.model(tokens, return_type="logits_and_cache")
        except (TypeError, ValueError, NotImplementedError, AttributeError):
            return None
        cache = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != self.n_layers:
            return None
        kv: list[tuple[Tensor, Tensor]] = []
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, Tensor) or not isinstance(v, Tensor):
                return None  # some transformers releases (5.24) return the cache unfilled
            kv.append((k, v))
        return kv


def prefix_cache(kv: list[tuple[Tensor, Tensor]], rows: slice, p0: int, copies: int) -> Any:
    """An HF ``DynamicCache`` holding positions ``< p0`` of ``rows``, stacked ``copies`` times."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(
            k[rows, :, :p0].repeat(copies, 1, 1, 1), v[rows, :, :p0].repeat(copies, 1, 1, 1), layer
        )
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
