"""Native TransformerLens models for the zoo: build from a config dict, save and load weights.

A zoo model is a ``TransformerBridge.boot_native`` model described by a small JSON-able config
(layers, widths, heads, vocabulary, context). Weights are stored as float32 safetensors keyed by the
bridge's TL-style state-dict names (``blocks.L.attn.q.weight`` ...); loading builds the model from
the config and ``load_state_dict``\\ s them, strictly. No pickle anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechdelta.core._io import atomic_write_bytes
from mechdelta.errors import ZooError

# Fields a zoo model config may set (all passed to ``TransformerBridgeConfig``).
_INT_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx")
_OPTIONAL_FIELDS = {
    "d_mlp": int,
    "act_fn": str,
    "attn_only": bool,
    "normalization_type": str,
    "positional_embedding_type": str,
    "model_name": str,
}


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a zoo model config and return a plain copy; raise ZooError on a bad field."""
    out: dict[str, Any] = {}
    for name in _INT_FIELDS:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ZooError(f"model config field {name!r} must be a positive int, got {value!r}")
        out[name] = value
    for name, kind in _OPTIONAL_FIELDS.items():
        if name in config and config[name] is not None:
            value = config[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ZooError(
                    f"model config field {name!r} must be {kind.__name__}, got {value!r}"
                )
            out[name] = value
    unknown = sorted(set(config) - set(_INT_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise ZooError(f"unknown model config fields {unknown}")
    return out


def build_model(config: Mapping[str, Any], seed: int = 0) -> Any:
    """A seeded native ``TransformerBridge`` of ``config``, in eval mode.

    The global RNG is left untouched (construction runs inside ``torch.random.fork_rng``).
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = validate_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bridge = TransformerBridge.boot_native(  # type: ignore[attr-defined]
            TransformerBridgeConfig(**cfg, seed=seed)
        )
    return bridge.eval()


def state_dict_of(model: Any) -> dict[str, torch.Tensor]:
    """A detached float32 CPU copy of the model's TL-style state dict."""
    return {
        k: v.detach().to("cpu", torch.float32).clone().contiguous()
        for k, v in model.state_dict().items()
    }


def save_weights(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write the model's state dict to ``path`` as float32 safetensors (atomically)."""
    from safetensors.torch import save

    out = Path(path)
    data = save(state_dict_of(model), metadata={"format": "mechdelta-zoo"})
    atomic_write_bytes(out, data)
    return out


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; raise ZooError when missing or corrupt."""
    src = Path(path)
    if not src.is_file():
        raise ZooError(f"zoo checkpoint {os.fspath(src)!r} is missing")
    try:
        return load_file(os.fspath(src))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ZooError(f"zoo checkpoint {os.fspath(src)!r} is corrupt: {exc}") from exc


def load_weights(model: Any, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> Any:
    """Load ``state`` into ``model`` strictly; raise ZooError on missing/unexpected/shape errors."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ZooError(f"{what} does not fit the model config: {exc}") from exc
    return model.eval()


def copy_model(model: Any, config: Mapping[str, Any]) -> Any:
    """A new bridge of ``config`` holding a copy of ``model``'s weights."""
    return load_weights(build_model(config), state_dict_of(model), "copied state")


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write named tensors (task prompts, masks) as safetensors."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(tmp))
    os.replace(tmp, out)
    return out
