"""Executors: where the many independent patched passes of a sweep, an attribution or an edge
search run.

Work that is many independent passes (one per site or circuit, per prompt batch) is described by
a picklable :class:`Work`: a deterministic list of :class:`Shard` units (a slice of the prompts x
a list of the work's variants), how to build the per-worker *state* from the pair (an engine with
both models' clean runs), and how to run one shard on that state. An executor maps a work over
its shards and returns one tensor per shard, in shard order; the caller merges them exactly as
its in-process loop would (``out[variants, rows] = values``).

Because a shard is exactly one of the in-process loop's stacked forwards (the same rows, the same
variants stacked in the same order, the same batch budget) and every worker computes the same
clean runs, results merge to the in-process result bit for bit on CPU (checked by the tests).

- ``"local"`` / ``None`` (default): today's in-process loop, no overhead and nothing written.
- :class:`LocalExecutor` ``(shard_dir=...)``: in-process, but each finished shard is written
  atomically under ``shard_dir/<work key>/`` and skipped when the same work runs again: an
  interrupted run resumes where it stopped.
- :class:`~mechdelta.scale.ray.RayExecutor`: actors on a Ray cluster, each loading the pair once;
  lost workers' shards are re-run elsewhere (same resumable store with ``shard_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from mechdelta.core.progress import progress as progress_bar
from mechdelta.errors import ConfigError
from mechdelta.scale._shards import ShardStore

__all__ = ["Executor", "LocalExecutor", "Shard", "Work", "coerce_executor", "work_key"]


@dataclass(frozen=True)
class Shard:
    """One unit of sharded work: prompts ``rows = (start, stop)`` of the task x the work's
    variants ``variants`` (indices into the work's variant list), run as one stacked forward.

    ``index`` is the shard's position in the work's plan (results come back in this order)."""

    index: int
    rows: tuple[int, int]
    variants: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ConfigError(f"a shard index is >= 0, not {self.index}")
        start, stop = self.rows
        if not 0 <= start < stop:
            raise ConfigError(
                f"a shard's rows are a non-empty range (start, stop), not {self.rows}"
            )

    @property
    def row_slice(self) -> slice:
        return slice(self.rows[0], self.rows[1])


@runtime_checkable  # the test suite's runtime type checks call isinstance(work, Work)
class Work(Protocol):
    """Many independent passes over one pair, described so that any worker can run them.

    Implementations are plain picklable objects (the task, the direction, the variants, the
    engine options: never the models). ``state_key`` names what :meth:`setup` builds (workers
    keep one state per key, so the two directions of a sweep share one engine's clean runs);
    ``key`` names the whole work, including its variants and plan (the resumable store's folder).
    """

    desc: str

    @property
    def key(self) -> str: ...

    @property
    def state_key(self) -> str: ...

    def shards(self) -> list[Shard]: ...

    def setup(self, pair: Any) -> Any: ...

    def run(self, state: Any, shard: Shard) -> Tensor: ...


def work_key(kind: str, *parts: Any) -> str:
    """A stable content hash of a work's description (JSON of ``parts``; ``str`` for the rest)."""
    text = json.dumps([kind, *parts], sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


class Executor(ABC):
    """Runs a :class:`Work`'s shards and returns their values in shard order."""

    #: where finished shards are written (None: nothing is written, nothing resumed).
    shard_dir: Path | None = None
    #: the largest peak memory of one shard on a worker in the last :meth:`map` call
    #: (``{"device", "bytes", "method"}``; None: nothing ran on workers, e.g. in-process).
    last_worker_peak: dict[str, Any] | None = None

    @abstractmethod
    def map(
        self,
        work: Work,
        pair: Any,
        *,
        local_state: Any = None,
        progress: bool | None = None,
    ) -> list[Tensor]:
        """Every shard's values, in shard order. ``local_state`` is the caller's own state for
        ``work`` (an engine that already ran its clean runs), used by in-process executors."""

    @property
    def in_process(self) -> bool:
        """True when shards run in the calling process with its models (no transfer)."""
        return False

    def info(self) -> dict[str, Any]:
        """What provenance records about the executor."""
        return {"kind": type(self).__name__}

    def store(self, work: Work) -> ShardStore | None:
        return None if self.shard_dir is None else ShardStore(self.shard_dir, work.key)


class LocalExecutor(Executor):
    """Shards run one after another in this process, on the caller's engine.

    Args:
        shard_dir: write each finished shard atomically under ``shard_dir/<work key>/`` and skip
            shards already there when the same work runs again (same pair, task, variants,
            options). None: nothing is written (then this is the plain in-process loop).
        on_shard: called with each shard after it is stored (progress hooks, tests).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike[str] | None = None,
        *,
        on_shard: Callable[[Shard], None] | None = None,
    ) -> None:
        self.shard_dir = None if shard_dir is None else Path(shard_dir)
        self.on_shard = on_shard

    @property
    def in_process(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "shard_dir": None if self.shard_dir is None else str(self.shard_dir),
        }

    def map(
        self,
        work: Work,
        pair: Any,
        *,
        local_state: Any = None,
        progress: bool | None = None,
    ) -> list[Tensor]:
        shards = work.shards()
        store = self.store(work)
        done = {} if store is None else store.finished(shards)
        state = local_state
        todo = [s for s in shards if s.index not in done]
        for shard in progress_bar(todo, total=len(todo), desc=work.desc, enabled=progress):
            if state is None:
                state = work.setup(pair)
            values = work.run(state, shard)
            if store is not None:
                store.write(shard, values)
            done[shard.index] = values
            if self.on_shard is not None:
                self.on_shard(shard)
        return [done[s.index] for s in shards]

    def __repr__(self) -> str:
        return (
            f"LocalExecutor(shard_dir={None if self.shard_dir is None else str(self.shard_dir)!r})"
        )


def coerce_executor(value: Executor | str | None) -> Executor | None:
    """``None`` / ``"local"``: the plain in-process loop (returned as None); an :class:`Executor`
    as it is; ``"ray"``: a :class:`~mechdelta.scale.ray.RayExecutor` with its defaults."""
    if value is None:
        return None
    if isinstance(value, Executor):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "local":
            return None
        if text == "ray":
            from mechdelta.scale.ray import RayExecutor

            return RayExecutor()
    raise ConfigError(
        f"executor must be 'local', 'ray', a mechdelta.LocalExecutor or a mechdelta.RayExecutor, "
        f"not {value!r}"
    )


def merge(
    shards: Sequence[Shard], values: Sequence[Tensor], out: Tensor, variants: Sequence[int]
) -> Tensor:
    """Write each shard's ``[n_variants, n_rows]`` values into ``out[variant, row]``, where a
    shard's variant ``j`` is ``variants[j]`` of the caller's numbering."""
    for shard, v in zip(shards, values, strict=True):
        idx = [variants[j] for j in shard.variants]
        out[idx, shard.row_slice] = v.to(out.dtype)
    return out
