"""ModelPair: a reference and an intervened checkpoint of one architecture.

The pair is the unit every analysis in mechdelta takes. Constructing one checks the compatibility
contract (architecture, hooks and activation shapes, tokenizer, weight processing, dtype, device)
and refuses identical weights, since there is then no shift to explain.
"""

from __future__ import annotations

import functools
import html
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from mechdelta.core._compat import (
    VOCAB_MODES,
    apply_shared_vocabulary,
    check_compatible,
    tokenizer_hash,
)
from mechdelta.core._layout import head_axes
from mechdelta.core._loading import (
    Processing,
    bridge_from_hf,
    bridge_processing,
    load_bridges,
    load_tokenizer,
    resolve_device,
    resolve_devices,
    resolve_dtype,
)
from mechdelta.core._revisions import check_revision, label, resolved_commit
from mechdelta.core.provenance import environment, weights_hash
from mechdelta.core.sites import ModelShape
from mechdelta.core.weights import WeightDiff, weight_diff
from mechdelta.errors import ConfigError, IdenticalModelsError

if TYPE_CHECKING:
    from mechdelta.core._adapters import AdapterInfo
    from mechdelta.core._tokenizers import SharedVocabulary

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
        vocab: ``"exact"`` (default): the tokenizers must be identical. ``"shared"``: a pair
            whose vocabularies differ only by tokens appended at the end (added chat or special
            tokens) runs on the shared vocabulary: both models' embedding and unembedding are cut
            to the shared ids *in place* (softmax metrics then renormalise over the shared
            vocabulary; logit differences are unchanged), and a task using an appended token is
            a :class:`~mechdelta.errors.TaskError`. Any other tokenizer difference raises an
            explained :class:`~mechdelta.errors.TokenizerMismatchError`.
        split_devices: accept the two models on different devices (a pair too large for one:
            the reference on one GPU, the intervened model on another; what
            ``ModelPair.load(..., device=("cuda:0", "cuda:1"))`` builds). ``sweep`` and ``patch``
            move what they splice between the devices; :attr:`device` is then the reference's,
            :attr:`devices` names both. Without it the models must share one device
            (:class:`~mechdelta.errors.DeviceMismatchError`).
    """

    def __init__(
        self,
        reference: Any,
        intervened: Any,
        *,
        allow_identical: bool = False,
        names: tuple[str, str] = ("reference", "intervened"),
        check_activations: bool = True,
        vocab: str = "exact",
        split_devices: bool = False,
    ) -> None:
        if vocab not in VOCAB_MODES:
            raise ConfigError(f"vocab must be one of {', '.join(VOCAB_MODES)}, got {vocab!r}")
        #: the shared-vocabulary mapping (``vocab="shared"`` on an appended-tokens pair).
        self.vocabulary: SharedVocabulary | None = None
        if vocab == "shared" and tokenizer_hash(reference.tokenizer) != tokenizer_hash(
            intervened.tokenizer
        ):
            self.vocabulary = apply_shared_vocabulary(reference, intervened)
        check_compatible(
            reference,
            intervened,
            check_activations=check_activations,
            vocab=vocab,
            split_devices=split_devices,
        )
        self.reference = reference.eval()
        self.intervened = intervened.eval()
        self.names = (str(names[0]), str(names[1]))
        #: how to load this pair again in another process (a picklable zero-argument callable,
        #: set by :meth:`load` and :func:`mechdelta.zoo.load`): what a
        #: :class:`~mechdelta.RayExecutor`'s actors call; None: the pair's weights travel instead.
        self.recipe: Callable[[], Any] | None = None
        #: the PEFT adapter merged into the intervened model (set by :meth:`from_adapter`).
        self.adapter: AdapterInfo | None = None
        if self.reference_hash == self.intervened_hash:
            msg = (
                f"reference {self.names[0]!r} and intervened {self.names[1]!r} have identical "
                f"weights (hash {self.reference_hash}): there is no shift to explain."
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
        reference_revision: str | None = None,
        intervened_revision: str | None = None,
        device: str | torch.device | Sequence[str | torch.device] | None = None,
        dtype: torch.dtype | str | None = None,
        processing: Processing | str = "raw",
        tokenizer: Any = None,
        allow_identical: bool = False,
        trust_remote_code: bool = False,
        vocab: str = "exact",
    ) -> ModelPair:
        """Load two checkpoints, each a local HF checkpoint directory or a hub name (at a revision).

        A string starting with ``/``, ``./``, ``../`` or ``~``, a path object, or anything that
        exists is a local directory (written by ``save_pretrained``; sharded safetensors too); any
        other name, such as ``"EleutherAI/pythia-160m"``, is loaded from the Hugging Face hub
        through the standard cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``), which with
        ``HF_HUB_OFFLINE=1`` means from that cache only.

        ``reference_revision`` / ``intervened_revision``: the hub revision (branch, tag or commit
        hash, e.g. Pythia's ``"step1000"``; ``None`` = ``main``) of each hub name; the common case is
        one name at two revisions, ``ModelPair.load(name, name, reference_revision="step1000",
        intervened_revision="step2000")``. The pair's names are then ``name@revision``. Offline, a
        revision the cache does not hold raises :class:`~mechdelta.errors.MissingRevisionError`
        listing the refs and snapshot commits that *are* cached; two revisions holding identical
        weights raise :class:`~mechdelta.errors.IdenticalModelsError` naming both revisions and
        the commits they resolve to (unless ``allow_identical``).

        ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or ``None``/``"auto"`` (the
        first GPU when one is visible, else the CPU); or two devices, ``(reference's,
        intervened's)``, e.g. ``("cuda:0", "cuda:1")`` for a pair too large for one GPU (each
        model on its own; ``sweep`` and ``patch`` support such a pair, ``pair.device`` is the
        reference's and ``pair.devices`` names both). A device that cannot work, or a tuple that
        is not two devices, raises :class:`~mechdelta.errors.DeviceError` before anything is
        loaded.
        ``dtype``: ``"float32"`` (default), ``"bfloat16"``/``"float16"`` (half the memory) or
        ``"float64"``. Numerical caveat of half precision: bfloat16 keeps 8 significant bits
        (relative rounding 2^-8 ~ 0.4% per operation, float16 2^-11), so activations, logits and
        the metric carry errors of that order against float32, and a score (a fraction of the
        shift) moves by about that rounding divided by the shift: large effects rank as in
        float32, small ones and near-ties can reorder, and a shift within ten rounding scales
        of the logits raises :class:`~mechdelta.patching.shift.PrecisionWarning`. Measured on the
        zoo pairs ``planted`` and ``induction`` (CPU): a bfloat16 head_out sweep ranks the heads
        as float32 does (Spearman 1.0, same top heads), its scores within 5e-4 of float32's (see
        ``tests/test_precision.py``). Confirm small effects in float32.
        ``processing="raw"`` keeps HF weights (logits match HF); ``"compat"`` applies
        TransformerLens's HookedTransformer-style processing to both models.
        ``trust_remote_code``: passed to ``from_pretrained`` (for architectures with custom code).
        ``vocab``: ``"shared"`` runs a pair whose tokenizers differ only by appended tokens on the
        shared vocabulary (see the class docstring; each model keeps its own tokenizer, so do not
        pass ``tokenizer=``).
        """
        proc = Processing.coerce(processing)
        dt = resolve_dtype(dtype)
        devs = resolve_devices(device)
        revs = (check_revision(reference_revision), check_revision(intervened_revision))
        sources = (reference, intervened)
        ref, itv = load_bridges(  # both checked before either load
            list(zip(sources, revs, devs, strict=True)),
            dtype=dt,
            processing=proc,
            tokenizer=tokenizer,
            trust_remote_code=trust_remote_code,
        )
        names = (label(os.fspath(reference), revs[0]), label(os.fspath(intervened), revs[1]))
        try:
            pair = cls(
                ref,
                itv,
                allow_identical=allow_identical,
                names=names,
                vocab=vocab,
                split_devices=devs[0] != devs[1],
            )
        except IdenticalModelsError as exc:
            if revs == (None, None):
                raise
            raise IdenticalModelsError(_same_revisions(sources, revs, exc)) from exc
        pair.recipe = functools.partial(
            ModelPair.load,
            reference,
            intervened,
            reference_revision=reference_revision,
            intervened_revision=intervened_revision,
            device="cpu",  # a worker moves the pair to its own device
            dtype=dt,
            processing=proc,
            tokenizer=tokenizer,
            allow_identical=allow_identical,
            trust_remote_code=trust_remote_code,
            vocab=vocab,
        )
        return pair

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
    def from_adapter(
        cls,
        base: str | os.PathLike[str],
        adapter: str | os.PathLike[str],
        *,
        merge: bool = True,
        base_revision: str | None = None,
        adapter_revision: str | None = None,
        tokenizer: Any = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        processing: Processing | str = "raw",
        allow_identical: bool = False,
        trust_remote_code: bool = False,
    ) -> ModelPair:
        """Reference = ``base``; intervened = ``base`` with the PEFT ``adapter`` merged into its
        weights (LoRA: each adapted weight becomes ``W + scale * B @ A``; likewise every adapter
        type PEFT's ``merge_and_unload`` merges: IA3, LoHa, LoKr, ...).

        ``base`` is a local directory or hub name (at ``base_revision``); ``adapter`` the
        directory ``PeftModel.save_pretrained`` wrote, or a hub name (at ``adapter_revision``).
        Only the adapted modules' weights differ, so ``pair.weight_diff()`` shows the change
        confined to them; ``pair.adapter`` (an ``AdapterInfo``) names the adapter, its PEFT
        type, its target modules and the HF parameters the merge changed.

        An adapter whose merged weights equal the base (e.g. a LoRA saved at PEFT's default
        initialisation, B = 0) raises :class:`~mechdelta.errors.IdenticalModelsError` naming the
        adapter (unless ``allow_identical``). ``merge=False`` (keeping the adapter as separate
        layers) is not supported: the bridge's hooks and weight comparison need plain weights,
        and merged and unmerged LoRA compute the same function. Needs the optional dependency
        ``peft`` (``pip install 'mechdelta[peft]'``), else
        :class:`~mechdelta.errors.MissingDependencyError`.
        """
        from mechdelta.core._adapters import adapter_info, changed_parameters, merged_adapter_model

        if merge is not True:
            raise ConfigError(
                "from_adapter(merge=False) is not supported: mechdelta compares plain weights "
                "and hooks plain modules, and a merged adapter computes the same function as the "
                "unmerged one; use merge=True (the default)"
            )
        proc = Processing.coerce(processing)
        dt = resolve_dtype(dtype)
        dev = resolve_device(device)
        base_model, merged = merged_adapter_model(
            base,
            adapter,
            dtype=dt,
            device=dev,
            base_revision=base_revision,
            adapter_revision=adapter_revision,
            trust_remote_code=trust_remote_code,
        )
        info = adapter_info(adapter, adapter_revision)
        info = replace(info, changed=changed_parameters(base_model, merged))
        base_name = label(os.fspath(base), base_revision)
        adapter_name = label(os.fspath(adapter), adapter_revision)
        if not info.changed and not allow_identical:
            raise IdenticalModelsError(
                f"PEFT adapter {adapter_name!r} ({info.peft_type}, targets "
                f"{list(info.target_modules)}) leaves base {base_name!r} unchanged: merged, every "
                "weight equals the base's, so there is no shift to explain. A LoRA saved at PEFT's "
                "default initialisation (lora_B = 0) does this: save the adapter after training, "
                "or pass allow_identical=True for a deliberate self-comparison"
            )
        if tokenizer is None:
            tokenizer = load_tokenizer(base, revision=base_revision)
        ref, itv = (
            bridge_from_hf(model, tokenizer=tokenizer, processing=proc, name=name)
            for model, name in ((base_model, "reference"), (merged, "intervened"))
        )
        pair = cls(
            ref,
            itv,
            allow_identical=allow_identical,
            names=(base_name, f"{base_name} + {adapter_name}"),
        )
        pair.adapter = info
        return pair

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
        """The earlier name of :meth:`from_adapter` (same arguments, same pair)."""
        return cls.from_adapter(
            base, adapter, tokenizer=tokenizer, dtype=dtype, device=device, processing=processing
        )

    # --- properties ---------------------------------------------------------------------------

    @property
    def cfg(self) -> Any:
        return self.reference.cfg

    @property
    def tokenizer(self) -> Any:
        """The tokenizer prompts are encoded with: the reference's, or under a shared vocabulary
        the larger one (so an appended token in a prompt is caught, not split into pieces)."""
        if self.vocabulary is not None:
            return getattr(self, self.vocabulary.extended).tokenizer
        return self.reference.tokenizer

    @cached_property
    def shape(self) -> ModelShape:
        return ModelShape.from_cfg(self.cfg)

    @property
    def device(self) -> torch.device:
        """The reference model's device: where engines keep prompts, metric inputs and logits.
        Both models' device unless the pair is split over two (see :attr:`devices`)."""
        return next(iter(self.reference.parameters())).device

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        """``(reference's device, intervened's device)``; the two differ only in a pair split
        over two devices (``ModelPair.load(..., device=("cuda:0", "cuda:1"))``)."""
        return self.device, next(iter(self.intervened.parameters())).device

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
        out = {
            "reference": {"name": self.names[0], "weights_hash": self.reference_hash},
            "intervened": {"name": self.names[1], "weights_hash": self.intervened_hash},
            "tokenizer_hash": self.tokenizer_hash,
            "processing": self.processing.value,
            "dtype": str(self.dtype),
        }
        ref_dev, itv_dev = self.devices
        if ref_dev != itv_dev:  # recorded only for a two-device pair (results do not depend on it)
            out["devices"] = [str(ref_dev), str(itv_dev)]
        if self.adapter is not None:
            out["adapter"] = self.adapter.as_dict()
        if self.vocabulary is not None:
            out["vocab"] = self.vocabulary.to_dict()
        return out

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
            ("dtype / device", f"{self.dtype} / {self._device_text()}"),
            ("tokenizer", self.tokenizer_hash),
        ]

    def _device_text(self) -> str:
        ref_dev, itv_dev = self.devices
        if ref_dev == itv_dev:
            return str(ref_dev)
        return f"reference on {ref_dev}, intervened on {itv_dev}"

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


def _same_revisions(
    sources: tuple[str | os.PathLike[str], str | os.PathLike[str]],
    revs: tuple[str | None, str | None],
    exc: IdenticalModelsError,
) -> str:
    """The IdenticalModelsError message for two revisions that hold the same weights."""
    parts = []
    for source, rev in zip(sources, revs, strict=True):
        name = os.fspath(source)
        commit = None if rev is None else resolved_commit(name, rev)
        at = f" (commit {commit})" if commit is not None and commit != rev else ""
        parts.append(f"{label(name, rev)!r}{at}")
    return (
        f"revisions {parts[0]} and {parts[1]} hold identical weights: {exc} (Some hub "
        "repositories hold the same weights under several revisions; pick revisions that differ.)"
    )
