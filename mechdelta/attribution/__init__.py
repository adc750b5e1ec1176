"""Cross-model attribution patching: first-order (AtP), AtP* (the QK fix) and integrated-gradient
estimates of every site's patch effect from a few passes, at node level (:func:`~mechdelta.attribute`)
and edge level (:func:`~mechdelta.attribute_edges`), with verification against exact patching.
Public names are re-exported from :mod:`mechdelta`."""
