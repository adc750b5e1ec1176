"""mechdelta: comparative mechanistic interpretability.

Explains the *shift* between a reference and an intervened checkpoint of one architecture by
patching activations across the two models. This module is the public API.
"""

from mechdelta._loading import Processing
from mechdelta._version import __version__
from mechdelta.errors import (
    ArchitectureMismatchError,
    ConfigError,
    DeviceMismatchError,
    DtypeMismatchError,
    ExportError,
    HookMismatchError,
    IdenticalModelsError,
    IncompatibleModelsError,
    MechDeltaError,
    MetricError,
    MissingDependencyError,
    MissingTokenizerError,
    ModelLoadError,
    PatchingError,
    ProcessingMismatchError,
    ResultFormatError,
    SiteError,
    TaskError,
    TokenizerMismatchError,
    ZooError,
)
from mechdelta.pair import ModelPair
from mechdelta.sites import Component, ModelShape, Site
from mechdelta.weights import WeightDiff, WeightDiffRow

__all__ = [
    "ArchitectureMismatchError",
    "Component",
    "ConfigError",
    "DeviceMismatchError",
    "DtypeMismatchError",
    "ExportError",
    "HookMismatchError",
    "IdenticalModelsError",
    "IncompatibleModelsError",
    "MechDeltaError",
    "MetricError",
    "MissingDependencyError",
    "MissingTokenizerError",
    "ModelLoadError",
    "ModelPair",
    "ModelShape",
    "PatchingError",
    "Processing",
    "ProcessingMismatchError",
    "ResultFormatError",
    "Site",
    "SiteError",
    "TaskError",
    "TokenizerMismatchError",
    "WeightDiff",
    "WeightDiffRow",
    "ZooError",
    "__version__",
]
