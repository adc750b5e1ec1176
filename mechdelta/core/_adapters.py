"""PEFT adapters (LoRA and the other adapter types PEFT can merge) merged onto their base model.

Private: users go through :meth:`mechdelta.ModelPair.from_adapter`. Needs the optional dependency
``peft`` (``pip install 'mechdelta[peft]'``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechdelta.core._loading import (
    _quiet_transformers,
    is_local_path,
    out_of_memory_as_error,
    resolve_device,
    resolve_source,
)
from mechdelta.errors import ConfigError, MissingDependencyError, ModelLoadError

__all__ = ["AdapterInfo", "adapter_info", "changed_parameters", "merged_adapter_model"]


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is and what merging it changed.

    ``name``: the adapter as given (a directory or hub name); ``peft_type``: PEFT's name for the
    method (``"LORA"``, ``"IA3"``, ...); ``target_modules``: the module names (or pattern) the
    adapter config targets; ``base``: the base model the adapter config names (informational);
    ``changed``: the HuggingFace parameter names whose merged values differ from the base (filled
    in after merging; empty before).
    """

    name: str
    peft_type: str
    target_modules: tuple[str, ...]
    base: str | None = None
    changed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("AdapterInfo needs the adapter's name")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peft_type": self.peft_type,
            "target_modules": list(self.target_modules),
            "base": self.base,
            "changed": list(self.changed),
        }


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence the deprecation PEFT triggers in transformers 5 (``is_gradient_checkpointing``:
    PEFT reads the old name while wrapping a model); nothing of mechdelta's own is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise MissingDependencyError(
            "loading a PEFT/LoRA adapter needs the optional dependency 'peft': "
            "pip install 'mechdelta[peft]'"
        ) from exc
    return peft


def _adapter_config_path(adapter: str | os.PathLike[str], revision: str | None) -> Path:
    """``adapter_config.json`` of a local adapter directory or a (cached, when offline) hub adapter."""
    name = os.fspath(adapter)
    if is_local_path(adapter):
        path = Path(name).expanduser() / "adapter_config.json"
        if not path.is_file():
            raise ModelLoadError(
                f"{name!r} has no adapter_config.json: not a PEFT adapter (give the directory "
                "PeftModel.save_pretrained wrote)"
            )
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "adapter_config.json", revision=revision))
    except Exception as exc:  # offline miss, unknown repo, network: all the same to the user
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelLoadError(
            f"could not find the PEFT adapter {name!r} (its adapter_config.json): {detail}. Fix: "
            "give the directory PeftModel.save_pretrained wrote, or download the adapter once "
            f"with network (`hf download {name}`)"
        ) from exc


def adapter_info(adapter: str | os.PathLike[str], revision: str | None = None) -> AdapterInfo:
    """Read an adapter's ``adapter_config.json`` (nothing is loaded)."""
    path = _adapter_config_path(adapter, revision)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    targets = cfg.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
    return AdapterInfo(
        name=os.fspath(adapter),
        peft_type=str(cfg.get("peft_type", "unknown")),
        target_modules=targets,
        base=cfg.get("base_model_name_or_path"),
    )


def merged_adapter_model(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    device: str | torch.device | None = None,
    base_revision: str | None = None,
    adapter_revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load the base HF causal LM once and return ``(base, merged)`` on ``device``: the base
    model as stored, and a copy of it with ``adapter`` merged into its weights.

    The merge is PEFT's ``merge_and_unload()``: each adapted weight becomes base + adapter delta
    (for LoRA ``W + scale * B @ A``) and the adapter layers are removed, leaving a plain model of
    the base's architecture. An adapter type PEFT cannot merge (prompt tuning, ...) raises
    :class:`~mechdelta.errors.ModelLoadError`.
    """
    peft = _require_peft()
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    dev = resolve_device(device)
    _adapter_config_path(adapter, adapter_revision)
    src = resolve_source(base, need_tokenizer=False, revision=base_revision)
    what = f"{src.label!r} + adapter {os.fspath(adapter)!r}"
    try:
        with out_of_memory_as_error(what, dev, dtype), _quiet_peft():
            model: Any = AutoModelForCausalLM.from_pretrained(
                src.target,
                dtype=dtype,
                revision=src.revision,
                trust_remote_code=trust_remote_code,
            )
            model.to(dev)
            wrapped = peft.PeftModel.from_pretrained(
                copy.deepcopy(model), os.fspath(adapter), revision=adapter_revision
            )
            if not hasattr(wrapped, "merge_and_unload"):
                raise ModelLoadError(
                    f"adapter {os.fspath(adapter)!r} ({type(wrapped).__name__}) is of a kind PEFT "
                    "cannot merge into the weights (prompt or prefix tuning adds virtual tokens); "
                    "from_adapter compares weight changes, so it needs a mergeable adapter (LoRA, "
                    "IA3, LoHa, LoKr, ...)"
                )
            merged = wrapped.merge_and_unload().to(dev)
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError) as exc:
        detail = " ".join(str(exc).split())
        raise ModelLoadError(f"could not merge {what}: {detail}") from exc
    return model.eval(), merged.eval()


@torch.no_grad()
def changed_parameters(base_model: Any, merged_model: Any) -> tuple[str, ...]:
    """The HuggingFace parameter names whose values differ between two models of one
    architecture (exact comparison; both must have the same parameter names)."""
    base_sd = base_model.state_dict()
    merged_sd = merged_model.state_dict()
    if set(base_sd) != set(merged_sd):
        extra = sorted(set(base_sd) ^ set(merged_sd))[:5]
        raise ModelLoadError(
            f"the merged adapter model and its base have different parameters (e.g. {extra}); "
            "the adapter was not fully merged"
        )
    return tuple(
        k
        for k in sorted(base_sd)
        if base_sd[k].shape != merged_sd[k].shape
        or not torch.equal(base_sd[k].to(merged_sd[k].device), merged_sd[k])
    )
