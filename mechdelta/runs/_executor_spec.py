"""The ``[executor]`` table of an experiment: where a run's patched forwards run, and whether
their finished shards are kept in the run directory (re-exported by
:mod:`mechdelta.runs.experiment`).

.. code-block:: toml

    [executor]
    kind = "ray"                 # "local" (default: this process) or "ray" (a Ray cluster)
    address = "auto"             # ray only: "auto", "ray://host:10001" (default: a local cluster)
    num_workers = 4              # ray only: actors, each loading the pair once (default: Ray's
                                 # resources decide)
    gpus_per_worker = 1          # ray only: GPUs per actor (default 0)
    cpus_per_worker = 1          # ray only: CPUs per actor (default 1)
    shards = true                # write each finished shard into RUN/shards (default true)

With ``shards = true`` every finished shard of a sweep, patch, attribution, edge patch, circuit
search or explanation is written atomically under ``RUN/shards/<work key>/`` as it completes,
and a re-run of the interrupted run (with this executor or another: ``mechdelta run ...
--executor ray``) skips the shards stored there: the store is keyed by the content hash of the
work (pair weights, prompts, variants, plan), so a shard is only reused by the very work that
wrote it, and the results are the ones an uninterrupted run gives. The executor is not part of
the run's identity (:data:`~mechdelta.runs.experiment.COMPUTE_KEYS`): the manifest records it,
and any executor may resume any run. ``RUN/shards`` is removed once every analysis is stored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechdelta.errors import ConfigError
from mechdelta.runs._config import check_bool, check_int, check_keys, check_str

if TYPE_CHECKING:
    from mechdelta.scale.executor import Executor

__all__ = [
    "EXECUTOR_KINDS",
    "SHARDS_DIR",
    "ExecutorSpec",
    "executor_record",
    "open_executor",
    "remove_shards",
    "stored_shards",
]

EXECUTOR_KINDS = ("local", "ray")
#: Where a run keeps its finished shards, under the run directory.
SHARDS_DIR = "shards"
_RAY_ONLY = ("address", "num_workers", "gpus_per_worker", "cpus_per_worker")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{where} must be >= 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class ExecutorSpec:
    """Where a run's patched forwards run (``kind``), on which Ray cluster with how many workers
    of what size (``kind = "ray"`` only), and whether finished shards are kept in the run
    directory for resuming (``shards``). See the module docstring."""

    kind: str = "local"
    address: str | None = None
    num_workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    shards: bool = True

    KEYS = ("kind", "address", "num_workers", "gpus_per_worker", "cpus_per_worker", "shards")

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ConfigError(
                f"[executor] kind must be one of {', '.join(map(repr, EXECUTOR_KINDS))}, got "
                f"{self.kind!r}"
            )
        if self.address is not None:
            check_str(self.address, "[executor] address")
        if self.num_workers is not None:
            check_int(self.num_workers, "[executor] num_workers", minimum=1)
        object.__setattr__(
            self,
            "gpus_per_worker",
            _number(self.gpus_per_worker, "[executor] gpus_per_worker"),
        )
        object.__setattr__(
            self,
            "cpus_per_worker",
            _number(self.cpus_per_worker, "[executor] cpus_per_worker"),
        )
        check_bool(self.shards, "[executor] shards")
        if self.kind == "local":
            default = ExecutorSpec.__dataclass_fields__
            given = [k for k in _RAY_ONLY if getattr(self, k) != default[k].default]
            if given:
                raise ConfigError(
                    f"[executor] {given[0]} applies to kind = 'ray' only; set kind = 'ray' (or "
                    f"pass --executor ray) or remove {given[0]}"
                )

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> ExecutorSpec:
        check_keys(table, cls.KEYS, "[executor]")
        kw: dict[str, Any] = {}
        for key, value in table.items():
            where = f"[executor] {key}"
            if value is None:  # a default, as a resolved configuration writes it
                continue
            if key in ("kind", "address"):
                value = check_str(value, where)
                kw[key] = value.strip().lower() if key == "kind" else value
            elif key == "num_workers":
                kw[key] = check_int(value, where, minimum=1)
            elif key == "shards":
                kw[key] = check_bool(value, where)
            else:
                kw[key] = _number(value, where)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}

    def override(
        self,
        kind: str | None = None,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        gpus_per_worker: float | None = None,
    ) -> ExecutorSpec:
        """This spec with the command line's ``--executor``, ``--address``, ``--workers`` and
        ``--gpus-per-worker`` (None: not given). ``--executor local`` drops the table's Ray
        settings; Ray options on a local executor are a ConfigError naming the flag."""
        spec = self
        if kind is not None:
            text = kind.strip().lower()
            if text not in EXECUTOR_KINDS:
                raise ConfigError(
                    f"--executor must be one of {', '.join(EXECUTOR_KINDS)}, got {kind!r}"
                )
            if text != spec.kind:
                spec = ExecutorSpec(kind=text, shards=spec.shards)
        flags: dict[str, tuple[str, Any]] = {
            "--address": ("address", address),
            "--workers": ("num_workers", num_workers),
            "--gpus-per-worker": ("gpus_per_worker", gpus_per_worker),
        }
        given: dict[str, tuple[str, Any]] = {
            flag: kv for flag, kv in flags.items() if kv[1] is not None
        }
        if given and spec.kind != "ray":
            raise ConfigError(
                f"{next(iter(given))} needs a Ray executor: pass --executor ray too (or set "
                "[executor] kind = 'ray' in the experiment)"
            )
        return replace(spec, **dict(given.values())) if given else spec

    def build(self, run_dir: str | os.PathLike[str] | None) -> Executor | None:
        """The executor this spec describes, writing shards under ``run_dir/shards`` (with
        ``shards`` and a run directory): a :class:`~mechdelta.scale.executor.LocalExecutor`, a
        :class:`~mechdelta.scale.ray.RayExecutor`, or None (local without shards: the plain
        in-process loop)."""
        shard_dir = None if run_dir is None or not self.shards else Path(run_dir) / SHARDS_DIR
        if self.kind == "local":
            from mechdelta.scale.executor import LocalExecutor

            return None if shard_dir is None else LocalExecutor(shard_dir=shard_dir)
        from mechdelta.scale.ray import RayExecutor

        return RayExecutor(
            address=self.address,
            num_workers=self.num_workers,
            gpus_per_worker=self.gpus_per_worker,
            cpus_per_worker=self.cpus_per_worker,
            shard_dir=shard_dir,
        )


@contextlib.contextmanager
def open_executor(
    spec: ExecutorSpec | Executor, run_dir: str | os.PathLike[str] | None
) -> Iterator[Executor | None]:
    """The executor of ``spec`` (:meth:`ExecutorSpec.build`), closed when the block ends,
    normally or by an error; an :class:`~mechdelta.scale.executor.Executor` given instead is
    used as it is and left open (its owner closes it)."""
    if not isinstance(spec, ExecutorSpec):
        yield spec
        return
    executor = spec.build(run_dir)
    try:
        yield executor
    finally:
        close = getattr(executor, "close", None)
        if callable(close):
            close()


def executor_record(spec: ExecutorSpec | Executor, executor: Executor | None) -> dict[str, Any]:
    """What the manifest records about a session's executor: its ``[executor]`` settings
    (None for an executor object passed to the run) and ``executor.info()`` (None when no
    executor ran: nothing was left to compute, or a local run without shards, the plain
    in-process loop)."""
    return {
        "spec": spec.to_dict() if isinstance(spec, ExecutorSpec) else None,
        "info": None if executor is None else dict(executor.info()),
    }


def remove_shards(run_dir: str | os.PathLike[str]) -> None:
    """Delete a run's shard store (once every analysis is stored, it is not needed)."""
    shutil.rmtree(Path(run_dir) / SHARDS_DIR, ignore_errors=True)


def stored_shards(run_dir: str | os.PathLike[str]) -> int:
    """How many finished shards a run's shard store holds (0: none, or no store)."""
    root = Path(run_dir) / SHARDS_DIR
    return sum(1 for _ in root.glob("*/shard-*.safetensors")) if root.is_dir() else 0
