"""Circuits across two checkpoints and across a training run: :func:`search_circuit` returns a
:class:`Circuit`; :class:`CheckpointSeries` runs analyses along a series of checkpoints;
:func:`compare_circuits` compares two circuits."""

from mechdelta.circuits.circuit import Circuit, CircuitNotFaithfulWarning
from mechdelta.circuits.compare import (
    CircuitComparison,
    CircuitComparisonWarning,
    compare_circuits,
)
from mechdelta.circuits.search import search_circuit
from mechdelta.circuits.series import (
    CheckpointSeries,
    PairCache,
    SeriesCircuits,
    SeriesResult,
    circuit_membership,
)

__all__ = [
    "CheckpointSeries",
    "Circuit",
    "CircuitComparison",
    "CircuitComparisonWarning",
    "CircuitNotFaithfulWarning",
    "PairCache",
    "SeriesCircuits",
    "SeriesResult",
    "circuit_membership",
    "compare_circuits",
    "search_circuit",
]
