"""The Δ-XAI pipeline in one call: :func:`explain` -> :class:`Explanation` and its audit report."""
