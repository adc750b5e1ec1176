"""Turning hub names, local checkpoint directories and in-memory HF models into bridges.

Private: users go through :meth:`mechdelta.ModelPair.load` and friends.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from mechdelta.core._revisions import cached_snapshot, check_revision, label
from mechdelta.errors import (
    ConfigError,
    DeviceError,
    DeviceOutOfMemoryError,
    MissingTokenizerError,
    ModelLoadError,
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_DEVICE_HELP = (
    "use 'cpu', 'cuda', 'cuda:N' (N = GPU index), 'mps' (Apple silicon), 'xpu' (Intel) or 'auto' "
    "(the first GPU when one is visible, else the CPU)"
)
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


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


# --- devices ------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate ``device`` and return it as a ``torch.device``; the one place devices are checked.

    ``None`` (or ``"auto"``) means the first GPU when one is visible, else the CPU. Anything that
    cannot work (not a device name, no CUDA in this torch build, no GPU visible, a GPU index
    beyond those visible) raises :class:`~mechdelta.errors.DeviceError` saying how to fix it.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(device)
    _check_device_available(dev)
    return dev


def resolve_devices(
    device: str | torch.device | Sequence[str | torch.device] | None,
) -> tuple[torch.device, torch.device]:
    """``(reference's device, intervened's device)`` from a ``device=`` argument.

    One device (anything :func:`resolve_device` takes) holds both models; a tuple or list of two
    puts the reference on the first and the intervened model on the second (e.g.
    ``("cuda:0", "cuda:1")`` for a pair too large for one GPU). Each is validated like a single
    device; any other length raises :class:`~mechdelta.errors.DeviceError`.
    """
    if isinstance(device, str | torch.device) or device is None:
        dev = resolve_device(device)
        return dev, dev
    if not isinstance(device, tuple | list):
        raise DeviceError(
            f"device must be a string such as 'cpu' or 'cuda:0', a torch.device, or two of "
            f"them (reference's, intervened's), got {type(device).__name__} {device!r}; "
            f"{_DEVICE_HELP}"
        )
    if len(device) != 2:
        raise DeviceError(
            f"device={tuple(device)!r} holds {len(device)} devices; a pair takes one device for "
            "both models or two, (reference's, intervened's), e.g. ('cuda:0', 'cuda:1')"
        )
    out = []
    for which, (i, item) in zip(("reference", "intervened"), enumerate(device), strict=True):
        if isinstance(item, tuple | list):
            raise DeviceError(f"device[{i}] (the {which} model's) must be one device, got {item!r}")
        try:
            out.append(resolve_device(item))
        except DeviceError as exc:
            raise DeviceError(f"device[{i}] (the {which} model's device): {exc}") from exc
    return out[0], out[1]


def _parse_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, tuple | list):
        raise DeviceError(
            f"device={tuple(device)!r}: two devices, (reference's, intervened's), are accepted by "
            "ModelPair.load only; here give one device for both models"
        )
    if not isinstance(device, str):
        raise DeviceError(
            f"device must be a string such as 'cpu' or 'cuda:0' (or a torch.device), got "
            f"{type(device).__name__} {device!r}; {_DEVICE_HELP}"
        )
    text = device.strip()
    for candidate in (text, text.lower()):
        with contextlib.suppress(RuntimeError, ValueError):
            return torch.device(candidate)
    hint = " (a GPU is 'cuda' to torch, e.g. 'cuda' or 'cuda:0')" if "gpu" in text.lower() else ""
    raise DeviceError(
        f"device {device!r} is not a device name torch understands{hint}; {_DEVICE_HELP}"
    )


def _check_device_available(dev: torch.device) -> None:
    kind, version = dev.type, torch.__version__
    if kind == "cpu":
        return
    if kind not in _DEVICE_TYPES:
        raise DeviceError(
            f"device {str(dev)!r}: mechdelta loads models onto {', '.join(_DEVICE_TYPES)} only "
            f"({'meta holds shapes, no weights' if kind == 'meta' else 'not ' + kind}); "
            f"{_DEVICE_HELP}"
        )
    if kind == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise DeviceError(
                f"device {str(dev)!r} needs CUDA, but torch has no CUDA support in this "
                f"environment (torch {version}); use device='cpu', or install a CUDA build of "
                "torch (https://pytorch.org/get-started/locally/)"
            )
        available, count = torch.cuda.is_available(), torch.cuda.device_count()
        if not available or count == 0:
            raise DeviceError(
                f"device {str(dev)!r}: torch {version} is built with CUDA but sees no GPU (no "
                "driver loaded, or CUDA_VISIBLE_DEVICES hides them); use device='cpu', or run "
                "where `nvidia-smi` lists a GPU"
            )
    else:
        module: Any = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
        if module is None or not module.is_available():
            raise DeviceError(
                f"device {str(dev)!r} is not available in this environment (torch {version}); "
                "use device='cpu', or 'cuda' on a machine with an NVIDIA GPU"
            )
        count = int(getattr(getattr(torch, kind, None), "device_count", lambda: 1)())
    if dev.index is not None and dev.index >= count:
        visible = ", ".join(f"{kind}:{i}" for i in range(count))
        raise DeviceError(
            f"device {str(dev)!r} asks for {kind} device {dev.index}, but only {count} "
            f"{'is' if count == 1 else 'are'} visible ({visible}); use one of those, or check "
            "CUDA_VISIBLE_DEVICES if a GPU is hidden"
        )


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


@contextlib.contextmanager
def out_of_memory_as_error(what: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Turn torch's out-of-memory errors inside the block into DeviceOutOfMemoryError."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(exc):
            raise
        detail = " ".join(str(exc).split())[:240] or type(exc).__name__
        half = "load in a smaller dtype (dtype='bfloat16' or 'float16': half of float32)"
        fixes = [half] if dtype in (torch.float32, torch.float64) else []
        fixes.append(
            "use a machine with more memory"
            if device.type == "cpu"
            else "load onto another device (device='cpu', or a GPU with more free memory)"
        )
        if device.type == "cuda":
            fixes.append(
                "free GPU memory other models of this process hold (del them, then "
                "torch.cuda.empty_cache())"
            )
            fixes.append("split the pair over two GPUs (device=('cuda:0', 'cuda:1'))")
        raise DeviceOutOfMemoryError(
            f"out of memory loading {what} onto {device} in {dtype} ({detail}); a pair holds both "
            f"models at once. Fix: {'; or '.join(fixes)}"
        ) from exc


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


# --- sources: local checkpoint directories and hub names ----------------------------------------


@dataclass(frozen=True)
class Source:
    """A checked model source: ``name`` as given, ``target`` to load from, and its kind."""

    name: str
    target: str
    local: bool
    revision: str | None = None

    @property
    def label(self) -> str:
        """``name`` or ``name@revision``."""
        return label(self.name, self.revision)


def is_local_path(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a local path rather than a hub name.

    A path object, or a string that starts like a path (``/``, ``./``, ``../``, ``~``) or names
    something that exists. Anything else, ``ORG/NAME`` included, is a hub name.
    """
    if not isinstance(source, str):
        return True
    return (
        source.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or source in (".", "..")
        or Path(source).is_absolute()
        or Path(source).exists()
    )


def resolve_source(
    source: str | os.PathLike[str], *, need_tokenizer: bool, revision: str | None = None
) -> Source:
    """Check a local checkpoint directory or hub name before anything slow is loaded.

    A directory must hold ``config.json`` (and tokenizer files when ``need_tokenizer``); it takes
    no ``revision``. A hub name must be well formed, and with ``HF_HUB_OFFLINE`` set its
    ``revision`` (branch, tag or commit; ``None`` = ``main``) must be in the local Hugging Face
    cache (``$HF_HOME/hub``), since nothing can be downloaded: a cached repository without that
    revision raises :class:`~mechdelta.errors.MissingRevisionError` naming what is cached.
    """
    name = os.fspath(source)
    rev = check_revision(revision)
    if is_local_path(source):
        if rev is not None:
            raise ConfigError(
                f"revision={rev!r} applies to hub names, but {name!r} is a local directory; "
                "drop revision=, or give the hub name (ORG/NAME) of the repository"
            )
        path = Path(name).expanduser()
        _check_checkpoint_dir(name, path, need_tokenizer=need_tokenizer)
        return Source(name=name, target=os.fspath(path), local=True)
    snapshot = _check_hub_name(name, rev)
    if snapshot is not None and need_tokenizer and not _has_tokenizer_files(snapshot):
        at = "" if rev is None else f" --revision {rev}"
        raise MissingTokenizerError(
            f"hub model {label(name, rev)!r} is cached at {os.fspath(snapshot)} without tokenizer "
            f"files ({', '.join(_TOKENIZER_FILES)}), and nothing can be downloaded offline; "
            f"download them once with network (`hf download {name}{at}`) or pass tokenizer=..."
        )
    return Source(name=name, target=name, local=False, revision=rev)


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _check_checkpoint_dir(name: str, path: Path, *, need_tokenizer: bool) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"local checkpoint directory {name!r} does not exist (looked at {path.absolute()}); "
            "give a directory written by save_pretrained, or a hub name such as "
            "'EleutherAI/pythia-160m' (without a leading '/', './', '../' or '~')"
        )
    if not path.is_dir():
        raise ModelLoadError(
            f"{name!r} is a file, not a checkpoint directory; give the directory save_pretrained "
            "wrote (the one holding config.json)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} has no config.json: not a HuggingFace checkpoint")
    if need_tokenizer and not _has_tokenizer_files(path):
        raise MissingTokenizerError(
            f"checkpoint directory {name!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "without them it loads with an empty tokenizer. Save one there "
            "(tokenizer.save_pretrained(dir)) or pass tokenizer=..."
        )


def _offline_flag() -> str | None:
    """The variable that puts the hub in offline mode (``None`` when it is not)."""
    from huggingface_hub import constants

    if not constants.is_offline_mode():
        return None
    set_vars = (v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v))
    return next((f"{v}={os.environ[v]}" for v in set_vars), "HF_HUB_OFFLINE")


def _hub_repo(name: str) -> str:
    """The repository TransformerLens loads for ``name`` (it maps a few legacy aliases)."""
    with contextlib.suppress(Exception):  # a private TL helper: fall back to the name itself
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

        return str(resolve_model_alias(name) or name)
    return name


def _check_hub_name(name: str, revision: str | None = None) -> Path | None:
    """Validate a hub name; offline, return its cached snapshot directory or raise with the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        reason = str(exc).split(". ")[0]
        raise ModelLoadError(
            f"{name!r} is neither an existing local directory nor a hub name ({reason}); give a "
            "checkpoint directory (start a relative path with './') or a hub name ORG/NAME such "
            "as 'EleutherAI/pythia-160m'"
        ) from None
    flag = _offline_flag()
    if flag is None:
        return None
    repo = _hub_repo(name)
    snapshot = cached_snapshot(repo, revision, name=name, offline_flag=flag)
    if snapshot is not None:
        return snapshot
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    alias = f" (TransformerLens's name for {name!r})" if repo != name else ""
    raise ModelLoadError(
        f"hub model {repo!r}{alias} is not in the local Hugging Face cache (looked for "
        f"{folder}/refs/{revision or 'main'} and that snapshot's config.json), and there is no local directory "
        f"{name!r}; {flag} is set, so nothing is downloaded. Fix: download it once with network "
        f"(`hf download {repo}`, or load it once without {flag.split('=')[0]}) into this cache "
        "(HF_HOME or HF_HUB_CACHE set where it is), or give a local checkpoint directory written "
        "by save_pretrained, e.g. './models/my-model'"
    )


def _load_failure(source: Source, exc: BaseException) -> str:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if source.local:
        return f"could not load checkpoint directory {source.name!r}: {detail}"
    flag = _offline_flag()
    at = "" if source.revision is None else f" --revision {source.revision}"
    hint = (
        f"{flag} is set, so nothing is downloaded and the cached copy may be incomplete: download "
        f"it again with network (`hf download {source.name}{at}`) or give a local checkpoint "
        "directory"
        if flag
        else "check the name as spelled on huggingface.co (ORG/NAME), the revision, and the "
        "network, run `hf auth login` for a gated model, or give a local checkpoint directory"
    )
    return f"could not load hub model {source.label!r}: {detail}. Fix: {hint}"


# --- loading ---------------------------------------------------------------------------------------


def load_bridges(
    checkpoints: Sequence[tuple[str | os.PathLike[str], str | None, str | torch.device | None]],
    **options: Any,
) -> list[Any]:
    """:func:`load_bridge` of each ``(source, revision, device)`` with the same ``options``, every
    source checked (local directory, hub cache, revision) before the first (slow) load."""
    need_tokenizer = options.get("tokenizer") is None
    for source, revision, _ in checkpoints:
        resolve_source(source, need_tokenizer=need_tokenizer, revision=revision)
    return [load_bridge(s, device=d, revision=r, **options) for s, r, d in checkpoints]


def load_bridge(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: Processing,
    tokenizer: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load a TransformerBridge from a hub name (at ``revision``) or a local HF checkpoint
    directory (sharded safetensors included: whatever ``from_pretrained`` reads)."""
    from transformer_lens.model_bridge import TransformerBridge

    _quiet_transformers()
    dev = resolve_device(device)
    src = resolve_source(source, need_tokenizer=tokenizer is None, revision=revision)
    try:
        with (
            _loadable_tokenizer(tokenizer) as tok,
            out_of_memory_as_error(repr(src.label), dev, dtype),
        ):
            bridge = TransformerBridge.boot_transformers(
                src.target,
                device=dev,
                dtype=dtype,
                tokenizer=tok,
                revision=src.revision,
                trust_remote_code=trust_remote_code,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(_load_failure(src, exc)) from exc
    return finish_bridge(bridge, where=repr(src.label), processing=processing)


def load_tokenizer(source: str | os.PathLike[str], revision: str | None = None) -> Any:
    """The tokenizer saved with a checkpoint directory or hub model (at ``revision``)."""
    from transformers import AutoTokenizer

    src = resolve_source(source, need_tokenizer=True, revision=revision)
    try:
        return AutoTokenizer.from_pretrained(src.target, revision=src.revision)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"tokenizer: {_load_failure(src, exc)}") from exc


def bridge_from_hf(
    hf_model: Any,
    *,
    tokenizer: Any,
    processing: Processing,
    name: str = "in-memory",
    device: str | torch.device | None = None,
) -> Any:
    """Wrap an in-memory HuggingFace causal LM (it is modified in place, as TL does).

    ``device`` moves it there first (validated like every device); ``None`` leaves it in place.
    """
    from transformer_lens.model_bridge import TransformerBridge

    _quiet_transformers()
    what = f"in-memory {type(hf_model).__name__}"
    if tokenizer is None:
        raise MissingTokenizerError(
            f"an in-memory model ({type(hf_model).__name__}) needs tokenizer=... "
            "(there is no directory to read one from)"
        )
    param = next(hf_model.parameters())
    dev = param.device if device is None else resolve_device(device)
    try:
        with _loadable_tokenizer(tokenizer) as tok, out_of_memory_as_error(what, dev, param.dtype):
            if device is not None:
                hf_model.to(dev)
            bridge = TransformerBridge.boot_transformers(
                name, hf_model=hf_model, tokenizer=tok, device=dev, dtype=param.dtype
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())
        raise ModelLoadError(f"could not wrap {type(hf_model).__name__}: {detail}") from exc
    return finish_bridge(bridge, where=what, processing=processing)


def finish_bridge(bridge: Any, *, where: str, processing: Processing) -> Any:
    check_tokenizer(bridge.tokenizer, where)
    if processing is Processing.COMPAT:
        bridge.enable_compatibility_mode()
    bridge.eval()
    return bridge
