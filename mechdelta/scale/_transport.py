"""How a remote worker gets the driver's :class:`~mechdelta.ModelPair`.

TransformerLens bridges do not pickle (their hooks close over local functions), so a worker
rebuilds the pair itself, from the first of:

1. ``pair_loader``: a zero-argument picklable callable returning a ``ModelPair`` (the user's, e.g.
   ``functools.partial(mechdelta.ModelPair.load, "ref/dir", "itv/dir")``);
2. the pair's ``recipe`` (set by the loaders that know how to load the pair again: a zero-argument
   picklable callable returning the pair, or an object with a ``.pair``, such as a zoo entry);
3. a *payload* put in the cluster's object store once: per model, how the bridge was built (a
   TransformerLens-native bridge: its ``TransformerBridgeConfig``; a HuggingFace-backed bridge:
   the HF model class and config), its TL-style state dict (CPU tensors), its weight processing,
   and its tokenizer's saved files; plus the pair's names and vocabulary mode.

Whatever the route, the worker's pair must have the driver's weight hashes
(:func:`check_hashes`: a mismatch raises :class:`~mechdelta.errors.PatchingError`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechdelta.errors import ConfigError, PatchingError

__all__ = ["BridgeSpec", "PairPayload", "build_pair", "check_hashes", "pair_payload", "pair_route"]

_FIX = "pass RayExecutor(pair_loader=...) (a picklable zero-argument callable returning the pair)"


@dataclass(frozen=True)
class BridgeSpec:
    """One model of a payload: ``kind`` ``"native"`` (``config`` a ``TransformerBridgeConfig``)
    or ``"hf"`` (``config`` the HF config, ``hf_class`` the HF model class); the bridge's TL-style
    ``state`` (CPU tensors); ``processing`` (``"raw"``/``"compat"``); ``tokenizer_files``
    (file name -> bytes of ``save_pretrained``; empty for none); ``dtype``."""

    kind: str
    config: Any
    state: dict[str, torch.Tensor]
    processing: str
    dtype: torch.dtype
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    hf_class: Any = None

    def __post_init__(self) -> None:
        if self.kind not in ("native", "hf"):
            raise ConfigError(f"a bridge spec's kind is 'native' or 'hf', not {self.kind!r}")
        if self.kind == "hf" and self.hf_class is None:
            raise ConfigError("an 'hf' bridge spec needs the HF model class (hf_class)")


@dataclass(frozen=True)
class PairPayload:
    """Everything a worker needs to rebuild a pair without the driver's files."""

    reference: BridgeSpec
    intervened: BridgeSpec
    names: tuple[str, str]
    vocab: str
    hashes: tuple[str, str]


def pair_route(pair: Any, pair_loader: Callable[[], Any] | None) -> Callable[[], Any] | None:
    """The loader a worker calls (``pair_loader``, else the pair's ``recipe``), or None when the
    pair must travel as a payload."""
    if pair_loader is not None:
        if not callable(pair_loader):
            raise ConfigError(f"pair_loader must be a zero-argument callable, not {pair_loader!r}")
        return pair_loader
    recipe = getattr(pair, "recipe", None)
    return recipe if recipe is not None else None


def pair_payload(pair: Any) -> PairPayload:
    """The payload of ``pair`` (see the module docstring); ConfigError for a bridge of a kind
    the payload cannot rebuild."""
    return PairPayload(
        reference=_bridge_spec(pair.reference, "reference"),
        intervened=_bridge_spec(pair.intervened, "intervened"),
        names=(str(pair.names[0]), str(pair.names[1])),
        vocab="exact" if getattr(pair, "vocabulary", None) is None else "shared",
        hashes=(str(pair.reference_hash), str(pair.intervened_hash)),
    )


def _bridge_spec(bridge: Any, which: str) -> BridgeSpec:
    from mechdelta.core._loading import bridge_processing

    original = getattr(bridge, "original_model", None)
    cfg = getattr(bridge, "cfg", None)
    if getattr(cfg, "architecture", None) == "TransformerLensNative":
        kind, config, hf_class = "native", copy.deepcopy(cfg), None
    elif original is not None and _is_hf_model(original):
        kind, config, hf_class = "hf", copy.deepcopy(original.config), type(original)
    else:
        raise ConfigError(
            f"the {which} model ({type(bridge).__name__} around "
            f"{type(original).__name__}) is neither a TransformerLens-native bridge nor a "
            f"HuggingFace-backed one, so it cannot be sent to remote workers; {_FIX}"
        )
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in bridge.state_dict().items()}
    dtype = next(iter(bridge.parameters())).dtype
    return BridgeSpec(
        kind=kind,
        config=config,
        state=state,
        processing=bridge_processing(bridge).value,
        dtype=dtype,
        tokenizer_files=_tokenizer_files(getattr(bridge, "tokenizer", None)),
        hf_class=hf_class,
    )


def _is_hf_model(module: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of TransformerLens
        return False
    return isinstance(module, PreTrainedModel)


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="mechdelta-send-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


@contextlib.contextmanager
def _tokenizer_from(files: dict[str, bytes]) -> Iterator[Any]:
    """The tokenizer saved as ``files``, loaded from a temporary directory that lives while the
    block runs (TransformerLens re-reads a tokenizer by its path while booting)."""
    if not files:
        yield None
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mechdelta-recv-tok-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        yield AutoTokenizer.from_pretrained(tmp)


def _build_bridge(spec: BridgeSpec, device: torch.device, which: str) -> Any:
    from mechdelta.core._loading import Processing, bridge_from_hf

    processing = Processing.coerce(spec.processing)
    with _tokenizer_from(spec.tokenizer_files) as tok:
        if spec.kind == "native":
            from transformer_lens.model_bridge import TransformerBridge

            bridge = TransformerBridge.boot_native(  # type: ignore[attr-defined]
                copy.deepcopy(spec.config), tokenizer=tok, device=device, dtype=spec.dtype
            )
            if processing is Processing.COMPAT:
                bridge.enable_compatibility_mode()
            bridge.eval()
        else:
            hf = spec.hf_class(copy.deepcopy(spec.config)).to(device=device, dtype=spec.dtype)
            bridge = bridge_from_hf(hf.eval(), tokenizer=tok, processing=processing, name=which)
    try:
        bridge.load_state_dict(spec.state, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(
            f"the {which} model could not be rebuilt on a worker (its state dict does not load "
            f"into a fresh {spec.kind} bridge: {' '.join(str(exc).split())[:300]}); {_FIX}"
        ) from exc
    return bridge.eval()


def build_pair(route: Callable[[], Any] | PairPayload, device: str | torch.device = "cpu") -> Any:
    """The pair a worker works on: from the loader / recipe, or rebuilt from a payload, on
    ``device`` (a loader's pair on another device is moved there)."""
    from mechdelta.core.pair import ModelPair

    dev = torch.device(device)
    if isinstance(route, PairPayload):
        ref = _build_bridge(route.reference, dev, "reference")
        itv = _build_bridge(route.intervened, dev, "intervened")
        with warnings.catch_warnings():  # allow_identical's warning was the driver's to show
            warnings.simplefilter("ignore")
            pair = ModelPair(
                ref,
                itv,
                allow_identical=route.hashes[0] == route.hashes[1],
                names=route.names,
                check_activations=False,
                vocab=route.vocab,
            )
        return pair
    got = route()
    pair = getattr(got, "pair", got)  # a zoo entry's pair
    if not isinstance(pair, ModelPair):
        raise ConfigError(
            f"a worker's pair loader returned {type(got).__name__}, not a ModelPair (or an object "
            "with a .pair); pass pair_loader=... returning the pair"
        )
    if pair.device != dev:
        pair.reference.to(dev)
        pair.intervened.to(dev)
    return pair


def check_hashes(pair: Any, expected: tuple[str, str]) -> None:
    """Raise PatchingError unless ``pair`` has the driver's weight hashes ``expected``."""
    got = (str(pair.reference_hash), str(pair.intervened_hash))
    if got != tuple(expected):
        raise PatchingError(
            f"a worker's pair has weight hashes {got}, the driver's {tuple(expected)} (host "
            f"{os.uname().nodename}): the worker loaded other checkpoints (a hub name resolving to "
            "another revision, a changed local file, a loader building other weights); pin the "
            "revisions or load the pair from the same files"
        )
