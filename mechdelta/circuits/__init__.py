"""Circuit search across two checkpoints: :func:`search_circuit` returns a :class:`Circuit`."""

from mechdelta.circuits.circuit import Circuit, CircuitNotFaithfulWarning
from mechdelta.circuits.search import search_circuit

__all__ = ["Circuit", "CircuitNotFaithfulWarning", "search_circuit"]
