"""mechdelta: comparative mechanistic interpretability.

Explains the *shift* between a reference and an intervened checkpoint of one architecture by
patching activations across the two models. This module is the public API.
"""

from mechdelta import plotting, zoo
from mechdelta._version import __version__
from mechdelta.attribution._edge_result import EdgeAttribution, EdgeScore
from mechdelta.attribution.edges import attribute_edges
from mechdelta.attribution.nodes import Method, attribute
from mechdelta.attribution.results import AttributionResult, Verification
from mechdelta.circuits import (
    CheckpointSeries,
    Circuit,
    CircuitComparison,
    CircuitComparisonWarning,
    CircuitNotFaithfulWarning,
    SeriesCircuits,
    SeriesResult,
    circuit_membership,
    compare_circuits,
    search_circuit,
)
from mechdelta.core._loading import Processing
from mechdelta.core.directions import Direction
from mechdelta.core.graph import Edge, Graph, Node
from mechdelta.core.metrics import Metric, MetricInputs
from mechdelta.core.pair import ModelPair
from mechdelta.core.sites import Component, ModelShape, Site
from mechdelta.core.task import Align, PreparedTask, Task
from mechdelta.core.weights import WeightDiff, WeightDiffRow
from mechdelta.errors import (
    ArchitectureMismatchError,
    AttributionError,
    ConfigError,
    DeviceError,
    DeviceMismatchError,
    DeviceOutOfMemoryError,
    DtypeMismatchError,
    DuplicateCheckpointsError,
    ExportError,
    HookMismatchError,
    IdenticalModelsError,
    IncompatibleModelsError,
    MechDeltaError,
    MetricError,
    MissingDependencyError,
    MissingRevisionError,
    MissingTokenizerError,
    ModelLoadError,
    PatchingError,
    ProcessingMismatchError,
    ResultFormatError,
    RunCorruptError,
    RunError,
    RunIncompleteError,
    RunLockedError,
    SiteError,
    TaskError,
    TokenizerMismatchError,
    ZooError,
)
from mechdelta.explain.explanation import Explanation
from mechdelta.explain.intervention import Intervention
from mechdelta.explain.pipeline import explain
from mechdelta.patching.edges import patch_edges
from mechdelta.patching.graft import graft, grafted
from mechdelta.patching.patch import patch
from mechdelta.patching.paths import patch_paths
from mechdelta.patching.results import BothDirections, PatchResult, SiteScore, SweepResult
from mechdelta.patching.shift import (
    FactorialResult,
    PrecisionWarning,
    ShiftNotSignificantWarning,
    ShiftResult,
    TooFewPromptsWarning,
    factorial,
    measure_shift,
)
from mechdelta.patching.sweep import sweep
from mechdelta.report._build import write_report
from mechdelta.representations import RepresentationDiff, compare_representations
from mechdelta.runs.experiment import Experiment
from mechdelta.runs.run import RunResult, regenerate_figures, run_experiment
from mechdelta.runs.rundir import StoredRun
from mechdelta.scale.executor import Executor, LocalExecutor
from mechdelta.scale.ray import RayExecutor
from mechdelta.stats.bootstrap import Bootstrap
from mechdelta.stats.claims import Claim, Claims, claims
from mechdelta.stats.reliability import Reliability, reliability, split_half
from mechdelta.stats.testing import SiteTest
from mechdelta.steering import (
    InSampleSteeringWarning,
    SteeringResult,
    SteeringVectors,
    steer,
    steering_vectors,
)
from mechdelta.zoo import ZooCard, ZooEntry

__all__ = [
    "Align",
    "ArchitectureMismatchError",
    "AttributionError",
    "AttributionResult",
    "Bootstrap",
    "BothDirections",
    "CheckpointSeries",
    "Circuit",
    "CircuitComparison",
    "CircuitComparisonWarning",
    "CircuitNotFaithfulWarning",
    "Claim",
    "Claims",
    "Component",
    "ConfigError",
    "DeviceError",
    "DeviceMismatchError",
    "DeviceOutOfMemoryError",
    "Direction",
    "DtypeMismatchError",
    "DuplicateCheckpointsError",
    "Edge",
    "EdgeAttribution",
    "EdgeScore",
    "Executor",
    "Experiment",
    "Explanation",
    "ExportError",
    "FactorialResult",
    "Graph",
    "HookMismatchError",
    "IdenticalModelsError",
    "InSampleSteeringWarning",
    "IncompatibleModelsError",
    "Intervention",
    "LocalExecutor",
    "MechDeltaError",
    "Method",
    "Metric",
    "MetricError",
    "MetricInputs",
    "MissingDependencyError",
    "MissingRevisionError",
    "MissingTokenizerError",
    "ModelLoadError",
    "ModelPair",
    "ModelShape",
    "Node",
    "PatchResult",
    "PatchingError",
    "PrecisionWarning",
    "PreparedTask",
    "Processing",
    "ProcessingMismatchError",
    "RayExecutor",
    "Reliability",
    "RepresentationDiff",
    "ResultFormatError",
    "RunCorruptError",
    "RunError",
    "RunIncompleteError",
    "RunLockedError",
    "RunResult",
    "SeriesCircuits",
    "SeriesResult",
    "ShiftNotSignificantWarning",
    "ShiftResult",
    "Site",
    "SiteError",
    "SiteScore",
    "SiteTest",
    "SteeringResult",
    "SteeringVectors",
    "StoredRun",
    "SweepResult",
    "Task",
    "TaskError",
    "TokenizerMismatchError",
    "TooFewPromptsWarning",
    "Verification",
    "WeightDiff",
    "WeightDiffRow",
    "ZooCard",
    "ZooEntry",
    "ZooError",
    "__version__",
    "attribute",
    "attribute_edges",
    "circuit_membership",
    "claims",
    "compare_circuits",
    "compare_representations",
    "explain",
    "factorial",
    "graft",
    "grafted",
    "measure_shift",
    "patch",
    "patch_edges",
    "patch_paths",
    "plotting",
    "regenerate_figures",
    "reliability",
    "run_experiment",
    "search_circuit",
    "split_half",
    "steer",
    "steering_vectors",
    "sweep",
    "write_report",
    "zoo",
]
