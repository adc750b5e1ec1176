"""Scaling out: executors for sharded work (in-process, resumable, Ray), memory budgets.

- :mod:`mechdelta.scale.executor`: :class:`Shard`, the :class:`Work` protocol, :class:`Executor`,
  :class:`LocalExecutor` (resumable with ``shard_dir``).
- :mod:`mechdelta.scale.ray`: :class:`RayExecutor` (actors on a Ray cluster; ``ray`` itself is
  imported when one is used: the ``ray`` extra).
- :mod:`mechdelta.scale._memory`: ``batch_budget="auto"`` and the peak memory in provenance.
"""

from __future__ import annotations

from mechdelta.scale.executor import Executor, LocalExecutor, Shard, Work, coerce_executor
from mechdelta.scale.ray import RayExecutor

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "Shard", "Work", "coerce_executor"]
