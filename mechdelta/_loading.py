"""Turning hub names, local checkpoint directories and in-memory HF models into bridges.

Private: users go through :meth:`mechdelta.ModelPair.load` and friends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from mechdelta.errors import (
    ConfigError,
    MissingDependencyError,
    MissingTokenizerError,
    ModelLoadError,
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


class Processing(StrEnum):
    """How a model's weights are processed after loading. Both models of a pair must match.

    - ``RAW``: HuggingFace weights as stored (logits match HF).
    - ``COMPAT``: TransformerLens's HookedTransformer-style processing (fold layer norms, centre
      the residual writers and the unembedding), via ``enable_compatibility_mode()``.
    """

    RAW = "raw"
    COMPAT = "compat"

    @classmethod
    def coerce(cls, value: Processing | str) -> Processing:
        if isinstance(value, Processing):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(f"processing must be 'raw' or 'compat', got {value!r}") from None


def bridge_processing(bridge: Any) -> Processing:
    """The weight processing a bridge was put through."""
    return Processing.COMPAT if getattr(bridge, "compatibility_mode", False) else Processing.RAW


def _quiet_transformers() -> None:
    with contextlib.suppress(Exception):  # only cosmetic
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
    }
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(table)}") from None


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """``None`` means the GPU when one is visible, else the CPU."""
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """Raise MissingTokenizerError when a bridge came up without a usable tokenizer."""
    if tokenizer is None:
        raise MissingTokenizerError(
            f"{where} has no tokenizer. Save one next to the checkpoint "
            "(tokenizer.save_pretrained(dir)) or pass tokenizer=... when loading."
        )
    try:
        size = len(tokenizer)
    except TypeError:
        size = len(tokenizer.get_vocab())
    if size <= 1:
        raise MissingTokenizerError(
            f"{where} loaded an empty tokenizer (vocabulary of {size}); every string would become "
            "the same token. Save the tokenizer files next to the checkpoint "
            "(tokenizer.save_pretrained(dir)) or pass tokenizer=..."
        )


@contextlib.contextmanager
def _loadable_tokenizer(tokenizer: Any) -> Iterator[Any]:
    """Yield a tokenizer TransformerLens can re-load by ``name_or_path``.

    TL rebuilds the tokenizer from ``init_kwargs["name_or_path"]`` (to set ``add_bos_token``); a
    tokenizer built in memory has none, so it is saved to a temporary directory for the boot.
    """
    if tokenizer is None or tokenizer.init_kwargs.get("name_or_path"):
        yield tokenizer
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mechdelta-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield AutoTokenizer.from_pretrained(tmp)


def _looks_local(source: str) -> bool:
    return os.path.sep in source or source.startswith(".") or Path(source).exists()


def load_bridge(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: Processing,
    tokenizer: Any = None,
) -> Any:
    """Load a TransformerBridge from a hub name or a local HF checkpoint directory."""
    from transformer_lens.model_bridge import TransformerBridge

    _quiet_transformers()
    name = os.fspath(source)
    path = Path(name)
    if _looks_local(name):
        if not path.is_dir():
            raise ModelLoadError(
                f"{name!r} looks like a local path but is not a directory; give a checkpoint "
                "directory written by save_pretrained, or a hub name such as 'gpt2'"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name!r} has no config.json: not a HuggingFace checkpoint")
        if tokenizer is None and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise MissingTokenizerError(
                f"checkpoint directory {name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                "without them it loads with an empty tokenizer. Save one there "
                "(tokenizer.save_pretrained(dir)) or pass tokenizer=..."
            )
    try:
        with _loadable_tokenizer(tokenizer) as tok:
            bridge = TransformerBridge.boot_transformers(
                name, device=device, dtype=dtype, tokenizer=tok
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            " HF_HUB_OFFLINE=1 is set, so hub names cannot be fetched: use a local checkpoint "
            "directory, or unset HF_HUB_OFFLINE on a machine with internet."
            if offline and not path.exists()
            else ""
        )
        raise ModelLoadError(f"could not load {name!r}: {exc}.{hint}") from exc
    return finish_bridge(bridge, where=repr(name), processing=processing)


def bridge_from_hf(
    hf_model: Any,
    *,
    tokenizer: Any,
    processing: Processing,
    name: str = "in-memory",
) -> Any:
    """Wrap an in-memory HuggingFace causal LM (it is modified in place, as TL does)."""
    from transformer_lens.model_bridge import TransformerBridge

    _quiet_transformers()
    if tokenizer is None:
        raise MissingTokenizerError(
            f"an in-memory model ({type(hf_model).__name__}) needs tokenizer=... "
            "(there is no directory to read one from)"
        )
    param = next(hf_model.parameters())
    try:
        with _loadable_tokenizer(tokenizer) as tok:
            bridge = TransformerBridge.boot_transformers(
                name, hf_model=hf_model, tokenizer=tok, device=param.device, dtype=param.dtype
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not wrap {type(hf_model).__name__}: {exc}") from exc
    return finish_bridge(
        bridge, where=f"in-memory {type(hf_model).__name__}", processing=processing
    )


def merged_peft_model(
    base: str | os.PathLike[str], adapter_dir: str | os.PathLike[str], dtype: torch.dtype
) -> Any:
    """Load a base HF model and merge a local PEFT/LoRA adapter onto it."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise MissingDependencyError(
            "loading a PEFT/LoRA adapter needs the optional dependency 'peft': "
            "pip install 'mechdelta[peft]'"
        ) from exc
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{os.fspath(adapter)!r} has no adapter_config.json: not a PEFT adapter"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype=dtype)
        merged = PeftModel.from_pretrained(model, os.fspath(adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not merge adapter {os.fspath(adapter)!r}: {exc}") from exc
    return merged


def finish_bridge(bridge: Any, *, where: str, processing: Processing) -> Any:
    check_tokenizer(bridge.tokenizer, where)
    if processing is Processing.COMPAT:
        bridge.enable_compatibility_mode()
    bridge.eval()
    return bridge
