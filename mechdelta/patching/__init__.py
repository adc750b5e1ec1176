"""Exact cross-model activation patching: the engine (batched, prefix/position reuse, sanity
checks), joint patches (:func:`~mechdelta.patch`), sweeps (:func:`~mechdelta.sweep`), the shift
and the 2x2 factorial design, and their result types. Public names are re-exported from
:mod:`mechdelta`."""
