"""ModelPair: a reference and an intervened checkpoint of one architecture.

The pair is the unit every analysis in mechdelta takes. Constructing one checks the compatibility
contract (architecture, hooks and activation shapes, tokenizer, weight processing, dtype, device)
and refuses identical weights, since there is then no shift to explain.
"""

from __future__ import annotations

import html
import os
import warnings
from functools import cached_property
from typing import Any

import torch

from mechdelta.core._compat import check_compatible, tokenizer_hash
from mechdelta.core._layout import head_axes
from mechdelta.core._loading import (
    Processing,
    bridge_from_hf,
    bridge_processing,
    load_bridge,
    load_tokenizer,
    merged_peft_model,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from mechdelta.core.provenance import environment, weights_hash
from mechdelta.core.sites import ModelShape
from mechdelta.core.weights import WeightDiff, weight_diff
from mechdelta.errors import IdenticalModelsError

__all__ = ["ModelPair"]


class ModelPair:
    """A ``reference`` and an ``intervened`` TransformerLens bridge of one architecture.

    Args:
        reference: the model before the intervention (a ``TransformerBridge``, or any TL hooked
            model with ``run_with_hooks`` / ``run_with_cache`` / ``cfg``).
        intervened: the model after it.
        allow_identical: accept identical weights (warns) instead of raising
            :class:`~mechdelta.errors.IdenticalModelsError`; useful for self-patch checks.
        names: display names of the two models (e.g. checkpoint paths or hub ids).
        check_activations: run a 2-token probe through both models to compare every cached
            activation shape (cheap; disable only for huge models on slow devices).
    """

    def __init__(
        self,
        reference: Any,
        intervened: Any,
        *,
        allow_identical: bool = False,
        names: tuple[str, str] = ("reference", "intervened"),
        check_activations: bool = True,
    ) -> None:
        check_compatible(reference, intervened, check_activations=check_activations)
        self.reference = reference.eval()
        self.intervened = intervened.eval()
        self.names = (str(names[0]), str(names[1]))
        if self.reference_hash == self.intervened_hash:
            msg = (
                f"reference and intervened have identical weights (hash {self.reference_hash}): "
                "there is no shift to explain."
            )
            if not allow_identical:
                raise IdenticalModelsError(
                    msg + " Pass allow_identical=True for deliberate self-comparisons."
                )
            warnings.warn(msg, UserWarning, stacklevel=2)

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        reference: str | os.PathLike[str],
        intervened: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        processing: Processing | str = "raw",
        tokenizer: Any = None,
        allow_identical: bool = False,
    ) -> ModelPair:
        """Load two checkpoints, each a local HF checkpoint directory or a hub name.

        A string starting with ``/``, ``./``, ``../`` or ``~``, a path object, or anything that
        exists is a local directory (written by ``save_pretrained``); any other name, such as
        ``"EleutherAI/pythia-160m"``, is loaded from the Hugging Face hub, which with
        ``HF_HUB_OFFLINE=1`` means from the local cache (``$HF_HOME/hub``) only.

        ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or ``None``/``"auto"`` (the
        first GPU when one is visible, else the CPU); a device that cannot work raises
        :class:`~mechdelta.errors.DeviceError` before anything is loaded.
        ``processing="raw"`` keeps HF weights (logits match HF); ``"compat"`` applies
        TransformerLens's HookedTransformer-style processing to both models.
        """
        proc = Processing.coerce(processing)
        dt = resolve_dtype(dtype)
        dev = resolve_device(device)
        for source in (reference, intervened):  # both checked before either (slow) load
            resolve_source(source, need_tokenizer=tokenizer is None)
        ref = load_bridge(reference, device=dev, dtype=dt, processing=proc, tokenizer=tokenizer)
        itv = load_bridge(intervened, device=dev, dtype=dt, processing=proc, tokenizer=tokenizer)
        return cls(
            ref,
            itv,
            allow_identical=allow_identical,
            names=(os.fspath(reference), os.fspath(intervened)),
        )

    @classmethod
    def from_hf(
        cls,
        reference: Any,
        intervened: Any,
        *,
        tokenizer: Any,
        processing: Processing | str = "raw",
        allow_identical: bool = False,
        device: str | torch.device | None = None,
    ) -> ModelPair:
        """Wrap two in-memory HuggingFace causal LMs (modified in place by the bridge).

        ``device`` moves both models there first; ``None`` leaves them where they are.
        """
        proc = Processing.coerce(processing)
        dev = None if device is None else resolve_device(device)
        ref = bridge_from_hf(
            reference, tokenizer=tokenizer, processing=proc, name="reference", device=dev
        )
        itv = bridge_from_hf(
            intervened, tokenizer=tokenizer, processing=proc, name="intervened", device=dev
        )
        return cls(
            ref,
            itv,
            allow_identical=allow_identical,
            names=(
                f"in-memory {type(reference).__name__}",
                f"in-memory {type(intervened).__name__}",
            ),
        )

    @classmethod
    def from_peft(
        cls,
        base: str | os.PathLike[str],
        adapter: str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        processing: Processing | str = "raw",
    ) -> ModelPair:
        """Reference = ``base``; intervened = ``base`` with the PEFT/LoRA ``adapter`` merged in.

        Needs the optional dependency ``peft`` (``pip install 'mechdelta[peft]'``).
        """
        proc = Processing.coerce(processing)
        dt = resolve_dtype(dtype)
        dev = resolve_device(device)
        merged = merged_peft_model(base, adapter, dt, dev)
        if tokenizer is None:
            tokenizer = load_tokenizer(base)
        ref = load_bridge(base, device=dev, dtype=dt, processing=proc, tokenizer=tokenizer)
        itv = bridge_from_hf(merged, tokenizer=tokenizer, processing=proc, name="intervened")
        return cls(ref, itv, names=(os.fspath(base), f"{os.fspath(base)} + {os.fspath(adapter)}"))

    # --- properties ---------------------------------------------------------------------------

    @property
    def cfg(self) -> Any:
        return self.reference.cfg

    @property
    def tokenizer(self) -> Any:
        return self.reference.tokenizer

    @cached_property
    def shape(self) -> ModelShape:
        return ModelShape.from_cfg(self.cfg)

    @property
    def device(self) -> torch.device:
        return next(iter(self.reference.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.reference.parameters())).dtype

    @property
    def processing(self) -> Processing:
        return bridge_processing(self.reference)

    @cached_property
    def reference_hash(self) -> str:
        """Content hash of the reference model's weights (recomputed only via a new pair)."""
        return weights_hash(self.reference.state_dict())

    @cached_property
    def intervened_hash(self) -> str:
        return weights_hash(self.intervened.state_dict())

    @cached_property
    def tokenizer_hash(self) -> str:
        return tokenizer_hash(self.tokenizer)

    def model(self, which: str) -> Any:
        """``pair.model("reference")`` or ``pair.model("intervened")``."""
        if which == "reference":
            return self.reference
        if which == "intervened":
            return self.intervened
        raise ValueError(f"which must be 'reference' or 'intervened', got {which!r}")

    # --- analyses -----------------------------------------------------------------------------

    def weight_diff(self) -> WeightDiff:
        """Per-component relative weight change ||ΔW||/||W_reference||."""
        return weight_diff(
            self.reference.state_dict(),
            self.intervened.state_dict(),
            self.cfg,
            self.reference_hash,
            self.intervened_hash,
            provenance={**environment(), "models": self.provenance_models()},
            head_axes=head_axes(self.reference),
        )

    def provenance_models(self) -> dict[str, Any]:
        return {
            "reference": {"name": self.names[0], "weights_hash": self.reference_hash},
            "intervened": {"name": self.names[1], "weights_hash": self.intervened_hash},
            "tokenizer_hash": self.tokenizer_hash,
            "processing": self.processing.value,
            "dtype": str(self.dtype),
        }

    # --- display ------------------------------------------------------------------------------

    def _summary_fields(self) -> list[tuple[str, str]]:
        c = self.cfg
        s = self.shape
        arch = getattr(c, "architecture", None) or type(self.reference).__name__
        kv = f" ({s.n_kv_heads} kv heads)" if s.n_kv_heads != s.n_heads else ""
        mlp = "attention-only" if s.d_mlp is None else f"d_mlp {s.d_mlp}"
        return [
            ("reference", f"{self.names[0]}  [{self.reference_hash}]"),
            ("intervened", f"{self.names[1]}  [{self.intervened_hash}]"),
            ("architecture", str(arch)),
            (
                "shape",
                f"{s.n_layers} layers, d_model {c.d_model}, {s.n_heads} heads{kv} x d_head {c.d_head}, "
                f"{mlp}, vocab {c.d_vocab}, n_ctx {s.n_ctx}",
            ),
            ("processing", self.processing.value),
            ("dtype / device", f"{self.dtype} / {self.device}"),
            ("tokenizer", self.tokenizer_hash),
        ]

    def summary(self, top: int = 5) -> str:
        """A plain-text summary: the two models, the architecture, the largest weight changes."""
        lines = ["ModelPair"]
        lines += [f"  {k:<15}{v}" for k, v in self._summary_fields()]
        wd = self.weight_diff()
        changed = wd.changed()
        lines.append(f"  {'changed':<15}{len(changed)} of {len(wd.rows)} weight components")
        for r in sorted(changed, key=lambda r: -r.relative)[:top]:
            lines.append(f"    {r.label:<24}||ΔW||/||W|| = {r.relative:.4g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.shape
        return (
            f"ModelPair(reference={self.names[0]!r}, intervened={self.names[1]!r}, "
            f"layers={s.n_layers}, heads={s.n_heads}, processing={self.processing.value!r})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in self._summary_fields()
        )
        return f"<b>ModelPair</b><table>{rows}</table>"
