"""Representation screens: where do the reference and the intervened model's internals diverge?

:func:`compare_representations` gives a :class:`RepresentationDiff` (CKA, debiased CKA, relative
activation change, logit-lens and next-token KL, attention Jensen-Shannon divergence and the
weight changes behind them, per layer and head); :meth:`RepresentationDiff.candidates` names the
layers where divergence starts. :func:`linear_cka` and :func:`debiased_linear_cka` are the pure
estimators on ``[n, d]`` matrices.
"""

from mechdelta.representations._cka import debiased_linear_cka, linear_cka
from mechdelta.representations.compare import compare_representations
from mechdelta.representations.result import MEASURES, Candidate, RepresentationDiff

__all__ = [
    "MEASURES",
    "Candidate",
    "RepresentationDiff",
    "compare_representations",
    "debiased_linear_cka",
    "linear_cka",
]
