"""mechdelta: comparative mechanistic interpretability.

Explains the *shift* between a reference and an intervened checkpoint of one architecture by
patching activations across the two models. This module is the public API.
"""

from mechdelta import plotting, zoo
from mechdelta._loading import Processing
from mechdelta._version import __version__
from mechdelta.directions import Direction
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
    RunError,
    SiteError,
    TaskError,
    TokenizerMismatchError,
    ZooError,
)
from mechdelta.experiment import Experiment
from mechdelta.metrics import Metric, MetricInputs
from mechdelta.pair import ModelPair
from mechdelta.patching import patch
from mechdelta.report import write_report
from mechdelta.results import BothDirections, PatchResult, SiteScore, SweepResult
from mechdelta.rundir import StoredRun
from mechdelta.runs import RunResult, regenerate_figures, run_experiment
from mechdelta.shift import (
    FactorialResult,
    ShiftNotSignificantWarning,
    ShiftResult,
    factorial,
    measure_shift,
)
from mechdelta.sites import Component, ModelShape, Site
from mechdelta.stats import Bootstrap
from mechdelta.sweeps import sweep
from mechdelta.task import PreparedTask, Task
from mechdelta.weights import WeightDiff, WeightDiffRow
from mechdelta.zoo import ZooCard, ZooEntry

__all__ = [
    "ArchitectureMismatchError",
    "Bootstrap",
    "BothDirections",
    "Component",
    "ConfigError",
    "DeviceMismatchError",
    "Direction",
    "DtypeMismatchError",
    "Experiment",
    "ExportError",
    "FactorialResult",
    "HookMismatchError",
    "IdenticalModelsError",
    "IncompatibleModelsError",
    "MechDeltaError",
    "Metric",
    "MetricError",
    "MetricInputs",
    "MissingDependencyError",
    "MissingTokenizerError",
    "ModelLoadError",
    "ModelPair",
    "ModelShape",
    "PatchResult",
    "PatchingError",
    "PreparedTask",
    "Processing",
    "ProcessingMismatchError",
    "ResultFormatError",
    "RunError",
    "RunResult",
    "ShiftNotSignificantWarning",
    "ShiftResult",
    "Site",
    "SiteError",
    "SiteScore",
    "StoredRun",
    "SweepResult",
    "Task",
    "TaskError",
    "TokenizerMismatchError",
    "WeightDiff",
    "WeightDiffRow",
    "ZooCard",
    "ZooEntry",
    "ZooError",
    "__version__",
    "factorial",
    "measure_shift",
    "patch",
    "plotting",
    "regenerate_figures",
    "run_experiment",
    "sweep",
    "write_report",
    "zoo",
]
