"""RayExecutor: a work's shards on the actors of a Ray cluster.

Each actor builds the pair once (see :mod:`mechdelta.scale._transport`: a ``pair_loader``, the
pair's ``recipe``, or the pair's weights and configs sent through the object store), checks its
weight hashes against the driver's, and keeps one state per ``work.state_key`` (an engine with
both models' clean runs), so the shards of many works (both directions of a sweep, every circuit
of a search) reuse it. Actors live until :meth:`RayExecutor.close`.

``map`` keeps at most :data:`IN_FLIGHT` shards queued per actor, records each shard's values once
(in shard order, as the in-process loop would have produced them: the same rows, the same stacked
variants, the same batch budget, the same torch thread count, so the same numbers bit for bit on
CPU), and with ``shard_dir`` writes each as it completes. An actor that dies (killed, its node
lost, its process crashed) is dropped, its queued shards go back to the queue, and a replacement
is started (at most ``max_retries`` per ``map`` call; past that the remaining actors carry on);
an error raised by the work itself (a :class:`~mechdelta.errors.MechDeltaError`, a bad site) is
re-raised in the driver as itself and not retried.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechdelta.core.progress import progress as progress_bar
from mechdelta.errors import ConfigError, MissingDependencyError, PatchingError
from mechdelta.scale._transport import build_pair, check_hashes, pair_payload, pair_route
from mechdelta.scale.executor import Executor, Shard, Work

__all__ = ["IN_FLIGHT", "RayExecutor"]

IN_FLIGHT = 2  # shards queued per actor: one running, one ready to start
_REMOTE_WORKER: Any = None  # the actor class, made once per process (ray.remote(_Worker))


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(
            "RayExecutor needs Ray: pip install 'mechdelta[ray]' (or pip install 'ray>=2.40')"
        ) from exc
    return ray


class _Worker:
    """The actor: one pair, one state per work ``state_key``. Errors while building the pair
    are kept and raised by every call, so the driver sees them as task errors (not as a dead
    actor to replace)."""

    def __init__(
        self, route: Any, hashes: tuple[str, str], device: str, threads: int | None
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.states: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.pair: Any = None
        try:
            self.pair = build_pair(route, device)
            check_hashes(self.pair, hashes)
        except Exception as exc:  # raised by ready()/run(), in the driver, as itself
            self.error = exc

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return os.getpid()

    def run(self, work: Work, shard: Shard) -> tuple[int, Tensor, dict[str, Any]]:
        """The shard's values, and the peak memory of running it on this actor's device (the
        first shard of a work includes building the state: the clean runs)."""
        from mechdelta.scale._memory import PeakMemory

        if self.error is not None:
            raise self.error
        with PeakMemory([self.pair.device]) as peak:
            state = self.states.get(work.state_key)
            if state is None:
                state = self.states[work.state_key] = work.setup(self.pair)
            values = work.run(state, shard).detach().cpu()
        return shard.index, values, peak.as_dict()


class RayExecutor(Executor):
    """Shards on Ray actors, each loading the pair once (see the module docstring).

    Args:
        address: the cluster (``"auto"``, ``"ray://host:10001"``, ...); None: the running Ray
            session if there is one, else a new local cluster (``ray.init()``).
        num_workers: actors to start; None: the cluster's CPUs // ``cpus_per_worker`` (with
            ``gpus_per_worker``: its GPUs // ``gpus_per_worker``), at least 1.
        gpus_per_worker: GPUs per actor; > 0 builds each actor's pair on ``cuda``.
        cpus_per_worker: CPUs Ray reserves per actor.
        threads_per_worker: torch threads in each actor; None: this process's
            ``torch.get_num_threads()`` now (the same thread count keeps CPU results bit-identical
            to the in-process run).
        shard_dir: write each finished shard under ``shard_dir/<work key>/`` and skip stored
            shards when the same work runs again (here or on another cluster).
        max_retries: replacement actors started per ``map`` call for actors that died.
        pair_loader: a picklable zero-argument callable returning the pair, called once per
            actor; None: the pair's ``recipe``, else its weights through the object store.
        on_shard: called in this process with each shard once its values are recorded.
        init_kwargs: extra ``ray.init`` arguments when this executor starts Ray.
    """

    def __init__(
        self,
        address: str | None = None,
        num_workers: int | None = None,
        gpus_per_worker: float = 0,
        *,
        cpus_per_worker: float = 1,
        threads_per_worker: int | None = None,
        shard_dir: str | os.PathLike[str] | None = None,
        max_retries: int = 3,
        pair_loader: Callable[[], Any] | None = None,
        on_shard: Callable[[Shard], None] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_workers is not None and (isinstance(num_workers, bool) or num_workers < 1):
            raise ConfigError(f"num_workers must be a positive int or None, not {num_workers!r}")
        if gpus_per_worker < 0 or cpus_per_worker < 0:
            raise ConfigError(
                f"gpus_per_worker and cpus_per_worker are >= 0, not {gpus_per_worker!r} and "
                f"{cpus_per_worker!r}"
            )
        if isinstance(max_retries, bool) or max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0, not {max_retries!r}")
        if threads_per_worker is not None and threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, not {threads_per_worker!r}")
        if pair_loader is not None and not callable(pair_loader):
            raise ConfigError(f"pair_loader must be a zero-argument callable, not {pair_loader!r}")
        self.address = address
        self.num_workers = num_workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.threads_per_worker = threads_per_worker or torch.get_num_threads()
        self.shard_dir = None if shard_dir is None else Path(shard_dir)
        self.max_retries = max_retries
        self.pair_loader = pair_loader
        self.on_shard = on_shard
        self.init_kwargs = dict(init_kwargs or {})
        self._started_ray = False
        self._actors: list[Any] = []
        self._booting: dict[Any, Any] = {}  # actor -> its ready() reference, until it answers
        self._route: Any = None  # what actors build the pair from (a loader or a payload ref)
        self._hashes: tuple[str, str] | None = None

    # --- cluster and actors ----------------------------------------------------------------------

    def _connect(self) -> Any:
        ray = _ray()
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, "logging_level": "ERROR", **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
            self._started_ray = True
        return ray

    def _workers_wanted(self, ray: Any) -> int:
        if self.num_workers is not None:
            return self.num_workers
        res = ray.cluster_resources()
        if self.gpus_per_worker > 0:
            return max(1, int(res.get("GPU", 0) // self.gpus_per_worker))
        per = self.cpus_per_worker or 1
        return max(1, int(res.get("CPU", 1) // per))

    def _start_actor(self, ray: Any) -> Any:
        global _REMOTE_WORKER
        if _REMOTE_WORKER is None:
            _REMOTE_WORKER = ray.remote(_Worker)
        cls = _REMOTE_WORKER
        device = "cuda" if self.gpus_per_worker > 0 else "cpu"
        handle = cls.options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
        ).remote(self._route, self._hashes, device, self.threads_per_worker)
        self._actors.append(handle)
        self._booting[handle] = handle.ready.remote()
        return handle

    def _ensure_actors(self, ray: Any, pair: Any) -> None:
        hashes = (str(pair.reference_hash), str(pair.intervened_hash))
        if self._hashes != hashes:  # another pair: its own actors
            self._kill_actors()
            loader = pair_route(pair, self.pair_loader)
            self._route = loader if loader is not None else ray.put(pair_payload(pair))
            self._hashes = hashes
        for _ in range(self._workers_wanted(ray) - len(self._actors)):
            self._start_actor(ray)

    @property
    def actors(self) -> list[Any]:
        """The live actor handles (those not known to have died)."""
        return list(self._actors)

    def _kill_actors(self) -> None:
        actors, self._actors = self._actors, []
        self._booting = {}
        if not actors:
            return
        try:
            ray = _ray()
            if ray.is_initialized():
                for actor in actors:
                    ray.kill(actor)
        except Exception:  # shutting down: nothing to report to
            pass

    def close(self) -> None:
        """Stop the actors (and Ray itself when this executor started it)."""
        self._kill_actors()
        self._route = None
        self._hashes = None
        if self._started_ray:
            self._started_ray = False
            with contextlib.suppress(Exception):
                _ray().shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # not contextlib.suppress: at interpreter exit this module's globals may be gone already
        try:  # noqa: SIM105
            self._kill_actors()
        except Exception:
            pass

    # --- running ---------------------------------------------------------------------------------

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
        done: dict[int, Tensor] = {} if store is None else store.finished(shards)
        todo = [s for s in shards if s.index not in done]
        self.last_worker_peak = None
        if todo:
            stream = self._stream(work, pair, todo, done, store)
            for _ in progress_bar(stream, total=len(todo), desc=work.desc, enabled=progress):
                pass
        return [done[s.index] for s in shards]

    def _stream(
        self, work: Work, pair: Any, todo: list[Shard], done: dict[int, Tensor], store: Any
    ) -> Iterator[Shard]:
        """Run ``todo`` on the actors, recording values in ``done``; yield each shard as it
        completes (once). An actor gets shards only once it has built its pair, so a slow or
        late (replacement) actor holds none back."""
        ray = self._connect()
        self._ensure_actors(ray, pair)
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        work_ref = ray.put(work)
        queue: deque[Shard] = deque(todo)
        pending: dict[Any, tuple[Any, Shard]] = {}  # object ref -> (actor, shard)
        load: dict[Any, int] = {}  # actor -> shards queued on it
        died: list[str] = []
        replaced = 0
        shard: Shard | None
        while queue or pending:
            for actor in self._actors:
                while queue and actor not in self._booting and load.get(actor, 0) < IN_FLIGHT:
                    job = queue.popleft()
                    pending[actor.run.remote(work_ref, job)] = (actor, job)
                    load[actor] = load.get(actor, 0) + 1
            booting = {ref: actor for actor, ref in self._booting.items()}
            if not pending and not booting:
                raise PatchingError(
                    f"every Ray actor of this executor died ({'; '.join(died)}), "
                    f"{len(queue)} shard(s) of {work.desc!r} left; {self.max_retries} "
                    "replacement(s) allowed per map call (max_retries=). Check the workers' "
                    "memory (an out-of-memory kill) and the cluster's logs"
                )
            ready, _ = ray.wait([*pending, *booting], num_returns=1)
            ref = ready[0]
            actor, shard = pending.pop(ref) if ref in pending else (booting[ref], None)
            try:
                got = ray.get(ref)
            except RayTaskError as exc:  # the work's (or the pair build's) own error
                raise _unwrap(exc) from exc
            except (RayActorError, WorkerCrashedError) as exc:
                where = "starting" if shard is None else f"running shard {shard.index}"
                died.append(f"{type(exc).__name__} {where}")
                lost = [] if shard is None else [shard]
                for r in [r for r, (a, _) in pending.items() if a == actor]:
                    lost.append(pending.pop(r)[1])
                self._drop(actor)
                load.pop(actor, None)
                queue.extendleft(
                    sorted((s for s in lost if s.index not in done), key=lambda s: -s.index)
                )
                if replaced < self.max_retries:
                    replaced += 1
                    self._start_actor(ray)
                continue
            if shard is None:  # an actor finished building its pair
                self._booting.pop(actor, None)
                continue
            load[actor] -= 1
            index, values, peak = got
            last = self.last_worker_peak
            if last is None or int(peak["bytes"]) > int(last["bytes"]):
                self.last_worker_peak = peak
            if index in done:  # a shard recorded already (re-run after a death): once only
                continue
            done[index] = values
            if store is not None:
                store.write(shard, values)
            if self.on_shard is not None:
                self.on_shard(shard)
            yield shard

    def _drop(self, actor: Any) -> None:
        if actor in self._actors:
            self._actors.remove(actor)
        self._booting.pop(actor, None)

    # --- description -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        try:
            import ray

            version: str | None = ray.__version__
        except ImportError:
            version = None
        return {
            "kind": "ray",
            "address": self.address,
            "num_workers": len(self._actors) or self.num_workers,
            "gpus_per_worker": self.gpus_per_worker,
            "cpus_per_worker": self.cpus_per_worker,
            "threads_per_worker": self.threads_per_worker,
            "shard_dir": None if self.shard_dir is None else str(self.shard_dir),
            "ray_version": version,
        }

    def __repr__(self) -> str:
        return (
            f"RayExecutor(address={self.address!r}, num_workers={self.num_workers!r}, "
            f"gpus_per_worker={self.gpus_per_worker!r}, live_actors={len(self._actors)}, "
            f"shard_dir={None if self.shard_dir is None else str(self.shard_dir)!r})"
        )


def _unwrap(exc: Any) -> BaseException:
    """The exception a remote task raised, as itself (a Ray wrapper when it cannot be had)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    try:
        return exc.as_instanceof_cause()  # type: ignore[no-any-return]
    except Exception:
        return exc  # type: ignore[no-any-return]
