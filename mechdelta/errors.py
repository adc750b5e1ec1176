"""The exceptions mechdelta raises.

Every error derives from :class:`MechDeltaError`, so ``except MechDeltaError`` catches anything
this package raises on purpose. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class MechDeltaError(Exception):
    """Base class of every error mechdelta raises on purpose."""


# --- configuration and input -------------------------------------------------------------------


class ConfigError(MechDeltaError, ValueError):
    """A configuration value is invalid (raised from ``__post_init__`` of config dataclasses)."""


class SiteError(MechDeltaError, ValueError):
    """A site (component, layer, head, position, neuron) is malformed or out of range."""


class TaskError(MechDeltaError, ValueError):
    """A task's prompts, answers or corrupted prompts are invalid for the pair."""


class MetricError(MechDeltaError, ValueError):
    """A metric returned NaN/inf, the wrong shape, or is unknown."""


# --- loading -------------------------------------------------------------------------------------


class ModelLoadError(MechDeltaError):
    """A model could not be loaded from a hub name, a local directory or an in-memory model."""


class MissingTokenizerError(ModelLoadError):
    """A checkpoint has no usable tokenizer (a directory without tokenizer files loads empty)."""


class MissingRevisionError(ModelLoadError):
    """A hub revision (branch, tag or commit) is not in the local Hugging Face cache while the hub
    is offline; the message lists the refs and snapshots that are cached for that repository."""


class MissingDependencyError(MechDeltaError, ImportError):
    """An optional dependency (e.g. ``peft``) is needed for this call but is not installed."""


class DeviceError(MechDeltaError):
    """A device cannot be used: not a device name torch knows (``"gpu"``), no CUDA in this torch
    build or no GPU visible, a GPU index beyond those visible (``"cuda:7"``), ..."""


class DeviceOutOfMemoryError(DeviceError):
    """A model did not fit in the device's memory while loading (a smaller dtype or another
    device is the fix)."""


# --- the pair contract ----------------------------------------------------------------------------


class IncompatibleModelsError(MechDeltaError):
    """The reference and intervened models cannot be compared site by site."""


class ArchitectureMismatchError(IncompatibleModelsError):
    """The two models differ in an architecture field (layers, widths, heads, vocab, ...)."""


class HookMismatchError(IncompatibleModelsError):
    """The two models expose different hook names or activation shapes."""


class TokenizerMismatchError(IncompatibleModelsError):
    """The two models use different tokenizers (their vocabularies hash differently)."""


class ProcessingMismatchError(IncompatibleModelsError):
    """One model was weight-processed (compatibility mode) and the other was not."""


class DtypeMismatchError(IncompatibleModelsError):
    """The two models hold their weights in different dtypes."""


class DeviceMismatchError(IncompatibleModelsError):
    """The two models live on different devices."""


class IdenticalModelsError(IncompatibleModelsError):
    """The two models have identical weights, so there is no shift to explain."""


class DuplicateCheckpointsError(IdenticalModelsError):
    """Two or more checkpoints of a series hold identical weights. ``groups`` lists the labels
    of each set of checkpoints that share one weight hash."""

    def __init__(self, message: str, *, groups: tuple[tuple[object, ...], ...] = ()) -> None:
        super().__init__(message)
        self.groups = groups


# --- patching and results -------------------------------------------------------------------------


class PatchingError(MechDeltaError, RuntimeError):
    """A patch did not behave as required (a hook did not fire, a patch changed nothing, ...)."""


class AttributionError(MechDeltaError, RuntimeError):
    """Attribution cannot run as asked (no gradients, an unsupported method/component, ...)."""


class ResultFormatError(MechDeltaError, ValueError):
    """A stored result or run directory is missing, partial, corrupt or of another version."""


class ZooError(MechDeltaError, ValueError):
    """An unknown zoo entry, or a zoo checkpoint that is missing or does not match its card."""


class ExportError(MechDeltaError, RuntimeError):
    """A figure could not be exported (e.g. no browser for static PNG/SVG/PDF export)."""


class RunError(MechDeltaError):
    """A run directory cannot be used: missing, partial or corrupt, not a run at all, or one made
    from another experiment (its configuration or model weights differ)."""


class RunLockedError(RunError):
    """Another process holds the run directory's lock (it is running, or writing figures or a
    report, there now). ``pid`` and ``host`` name the holder when it could be read."""

    def __init__(self, message: str, *, pid: int | None = None, host: str | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.host = host


class RunIncompleteError(RunError):
    """The run was interrupted (or is partial): re-run ``mechdelta run`` with the same experiment
    and ``--out`` to finish it before writing figures or a report."""


class RunCorruptError(RunError):
    """A stored analysis result fails its checksum or cannot be read: ``--repair`` recomputes
    only the damaged analyses, ``--overwrite`` starts the run over."""
