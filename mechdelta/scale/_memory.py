"""Memory: ``batch_budget="auto"`` from free device memory, and the peak memory of a block of work.

- :func:`resolve_budget` turns a ``batch_budget=`` argument (an int, ``None`` or ``"auto"``) into
  the number of rows (patched variants x prompts) one patched forward may stack. ``"auto"`` divides
  half the free memory of the pair's device(s) by an explicit estimate of one row's peak
  activations (:func:`row_bytes`).
- :class:`PeakMemory` measures the peak memory of a block above its start: the CUDA allocator's
  peak on a GPU, the sampled resident set size on the CPU.
- :func:`measure_peak` wraps an engine method in a :class:`PeakMemory` and keeps the largest
  peak seen (:class:`~mechdelta.patching._engine.PatchEngine` records it in its provenance).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

import torch

from mechdelta.errors import ConfigError

if TYPE_CHECKING:
    from mechdelta.core.task import PreparedTask

__all__ = [
    "DEFAULT_BATCH_BUDGET",
    "MAX_AUTO_BUDGET",
    "SAFETY_FRACTION",
    "BatchBudget",
    "PeakMemory",
    "auto_budget",
    "check_budget",
    "empty_peak",
    "free_memory",
    "measure_peak",
    "resolve_budget",
    "row_bytes",
]

#: what ``batch_budget=`` accepts: rows per forward, ``None`` (the default, 64) or ``"auto"``.
BatchBudget = int | Literal["auto"] | None

DEFAULT_BATCH_BUDGET = 64
#: ``"auto"`` never stacks more rows than this (nor fewer than one).
MAX_AUTO_BUDGET = 4096
#: the share of the free memory ``"auto"`` plans to fill (the rest is headroom for the estimate's
#: error, the allocator's fragmentation and the clean runs' caches).
SAFETY_FRACTION = 0.5
#: residual-width tensors alive per position in a block: the stream entering it, its normalised
#: input, the attention output and the stream after attention (resid_mid / resid_post).
RESID_COPIES = 4
#: blocks whose activations are alive at once in a no-grad forward (the running block and the
#: output of the one before it).
LAYERS_ALIVE = 2
#: float32 copies of the logits at the read positions: the unembedding's output, its float copy
#: and the metric's log-softmax.
LOGIT_COPIES = 3
#: what ``"auto"`` assumes is free on an Apple GPU when torch cannot say (bytes).
MPS_FALLBACK_BYTES = 2 * 1024**3
#: what ``"auto"`` assumes is free on any other accelerator it cannot query (bytes).
OTHER_FALLBACK_BYTES = 1024**3

_BUDGET_HELP = (
    "rows (patched variants x prompts) per forward; 'auto' derives it from free device memory"
)


# --- batch budgets --------------------------------------------------------------------------------


def check_budget(budget: object) -> None:
    """Raise :class:`~mechdelta.errors.ConfigError` unless ``budget`` is a positive int, None or
    ``"auto"`` (cheap: call it before anything slow)."""
    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(
            f"batch_budget must be a positive int (rows per forward) or 'auto', not {budget!r}: "
            f"{_BUDGET_HELP}"
        )


def resolve_budget(budget: object, pair: Any, prepared: PreparedTask) -> int:
    """The rows one patched forward may stack, from a ``batch_budget=`` argument.

    An int passes through (it must be positive); ``None`` gives :data:`DEFAULT_BATCH_BUDGET`
    (64); ``"auto"`` gives :func:`auto_budget` for this pair and task. Anything else raises
    :class:`~mechdelta.errors.ConfigError`.
    """
    check_budget(budget)
    if budget is None:
        return DEFAULT_BATCH_BUDGET
    if isinstance(budget, str):
        return auto_budget(pair, prepared)
    assert isinstance(budget, int)  # narrowed by check_budget
    return budget


def row_bytes(cfg: Any, *, seq_len: int, n_read: int, dtype: torch.dtype) -> int:
    """An estimate (bytes) of the peak activations one patched row adds to a no-grad forward.

    One row is one prompt of ``seq_len`` tokens under one patched variant. Per position and block
    it counts ``RESID_COPIES`` (4) residual-width tensors (``d_model`` each), the queries, keys,
    values and head outputs (``4 x n_heads x d_head``), the attention scores and pattern
    (``2 x n_heads x seq_len``) and the MLP's hidden activations before and after the
    nonlinearity (``2 x d_mlp``, ``3 x`` for a gated MLP, none attention-only), in the model's
    dtype, for ``LAYERS_ALIVE`` (2) blocks at once; plus ``LOGIT_COPIES`` (3) float32 copies of
    the logits at the ``n_read`` positions the metric reads (``d_vocab`` each):

        bytes = seq_len x (4 d_model + 4 n_heads d_head + 2 n_heads seq_len + k d_mlp)
                x itemsize(dtype) x 2  +  n_read x d_vocab x 4 x 3

    It is an estimate, not a measurement: it ignores the framework's temporaries, kernel
    workspaces and what the clean runs cached, which :data:`SAFETY_FRACTION` leaves room for.
    """
    d_model, n_heads = int(cfg.d_model), int(cfg.n_heads)
    d_head = int(getattr(cfg, "d_head", 0) or d_model // n_heads)
    d_mlp = 0 if getattr(cfg, "attn_only", False) else int(getattr(cfg, "d_mlp", 0) or 0)
    mlp_copies = 3 if getattr(cfg, "gated_mlp", False) else 2
    per_position = (
        RESID_COPIES * d_model + 4 * n_heads * d_head + 2 * n_heads * seq_len + mlp_copies * d_mlp
    )
    itemsize = torch.empty((), dtype=dtype).element_size()
    activations = seq_len * per_position * itemsize * LAYERS_ALIVE
    logits = n_read * int(cfg.d_vocab) * 4 * LOGIT_COPIES
    return int(activations + logits)


def auto_budget(pair: Any, prepared: PreparedTask) -> int:
    """``batch_budget="auto"``: ``SAFETY_FRACTION`` (half) of the free memory on the pair's
    device (the smaller of the two for a two-device pair, since either model is a patch target)
    divided by :func:`row_bytes`, clamped to ``[1, MAX_AUTO_BUDGET]``.

    Free memory (:func:`free_memory`) is read once, when the engine is built: work started
    elsewhere in the process afterwards is not accounted for.
    """
    devices = tuple(getattr(pair, "devices", None) or (pair.device,))
    free = min(free_memory(torch.device(d)) for d in devices)
    per_row = row_bytes(
        pair.cfg,
        seq_len=int(prepared.tokens.shape[1]),
        n_read=int(prepared.inputs.positions.shape[1]),
        dtype=pair.dtype,
    )
    rows = int(SAFETY_FRACTION * free) // max(1, per_row)
    return max(1, min(MAX_AUTO_BUDGET, rows))


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` now.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``) plus what torch's caching
    allocator holds reserved but unused. CPU: the memory available to new allocations
    (``psutil.virtual_memory().available``; ``/proc/meminfo``'s ``MemAvailable`` without psutil).
    MPS: torch's recommended working-set limit less what the driver holds, when this torch can
    say, else :data:`MPS_FALLBACK_BYTES`. Any other accelerator: its ``mem_get_info`` when
    present, else :data:`OTHER_FALLBACK_BYTES`.
    """
    kind = device.type
    if kind == "cuda":  # pragma: no cover - needs a GPU
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    if kind == "cpu":
        return _cpu_available()
    if kind == "mps":  # pragma: no cover - needs Apple silicon
        mps: Any = getattr(torch, "mps", None)
        limit = getattr(mps, "recommended_max_memory", None)
        held = getattr(mps, "driver_allocated_memory", None)
        if callable(limit) and callable(held):
            return max(0, int(limit()) - int(held()))
        return MPS_FALLBACK_BYTES
    backend: Any = getattr(torch, kind, None)  # pragma: no cover - e.g. xpu
    info = getattr(backend, "mem_get_info", None)
    if callable(info):  # pragma: no cover
        return int(info(device)[0])
    return OTHER_FALLBACK_BYTES  # pragma: no cover


def _cpu_available() -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate, a TL dependency
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return OTHER_FALLBACK_BYTES
    return int(psutil.virtual_memory().available)


# --- peak memory ----------------------------------------------------------------------------------


_PROCESS: dict[int, Any] = {}  # pid -> psutil.Process (a forked child gets its own)


def _rss() -> int | None:
    """This process's resident set size in bytes (None when it cannot be read)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    pid = os.getpid()
    proc = _PROCESS.get(pid)
    if proc is None:
        proc = _PROCESS[pid] = psutil.Process(pid)
    return int(proc.memory_info().rss)


def _mps_allocated() -> int | None:  # pragma: no cover - needs Apple silicon
    fn = getattr(getattr(torch, "mps", None), "current_allocated_memory", None)
    return int(fn()) if callable(fn) else None


# Devices whose allocator peak a PeakMemory has reset and not yet read: a nested PeakMemory on
# one of them must not reset it again (that would hide the outer block's peak so far).
_ALLOCATOR_ACTIVE: dict[str, int] = {}
_ALLOCATOR_LOCK = threading.Lock()

#: seconds between two samples of a sampled peak (RSS, MPS).
SAMPLE_INTERVAL = 0.005
#: seconds the sampling thread waits without any block to measure before it ends.
SAMPLER_IDLE = 1.0


class _Sampler:
    """One daemon thread per process polling every active :class:`PeakMemory` every
    :data:`SAMPLE_INTERVAL` seconds. It picks a new block up at its next tick (no wake-up, so a
    short block costs two samples and no thread switch) and ends after :data:`SAMPLER_IDLE`
    seconds without blocks; the next block starts it again."""

    def __init__(self) -> None:
        self._pid = -1
        self._lock = threading.Lock()
        self._blocks: set[PeakMemory] = set()
        self._thread: threading.Thread | None = None

    def add(self, block: PeakMemory) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: its own lock and thread
            self._pid, self._lock, self._blocks, self._thread = (
                os.getpid(),
                threading.Lock(),
                set(),
                None,
            )
        with self._lock:
            self._blocks.add(block)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="mechdelta-peak-memory", daemon=True
                )
                self._thread.start()

    def remove(self, block: PeakMemory) -> None:
        with self._lock:
            self._blocks.discard(block)

    def _loop(self) -> None:
        idle = 0.0
        while True:
            time.sleep(SAMPLE_INTERVAL)
            with self._lock:
                active = list(self._blocks)
                if not active:
                    idle += SAMPLE_INTERVAL
                    if idle >= SAMPLER_IDLE:
                        self._thread = None
                        return
                    continue
            idle = 0.0
            for block in active:
                block._poll()


_SAMPLER = _Sampler()


class PeakMemory:
    """Context manager: the peak memory of the block it wraps, above the memory at its start.

    Per device (several may be given; duplicates count once):

    - CUDA (``method="cuda_max_allocated"``): ``torch.cuda.max_memory_allocated`` after
      ``torch.cuda.reset_peak_memory_stats`` at the start, less ``memory_allocated`` at the
      start: exact for tensors torch allocates, blind to memory outside its allocator. It resets
      the device's peak statistic, which other code reading it will see. A nested
      ``PeakMemory`` on the same device does not reset it again, so it reports the peak since the
      outer block's start (an upper bound of its own).
    - CPU (``method="rss_sampled"``): the process's resident set size, sampled every
      :data:`SAMPLE_INTERVAL` seconds (5 ms) by a shared daemon thread and once at each end,
      maximum less the start. Approximate: a peak shorter than the interval can be missed, other
      threads' allocations count, and memory the process already held and reuses (freed earlier,
      not returned to the system) does not count, so a block can read 0.
    - MPS (``method="mps_sampled"``): ``torch.mps.current_allocated_memory``, sampled likewise.

    After the block, :attr:`per_device` maps each device to its peak bytes, :attr:`bytes` is
    their sum and :meth:`as_dict` gives ``{"device", "bytes", "method"}`` (plus ``"per_device"``
    for several devices).
    """

    def __init__(self, devices: torch.device | str | Iterable[torch.device | str] = "cpu") -> None:
        items = [devices] if isinstance(devices, str | torch.device) else list(devices)
        if not items:
            raise ConfigError("PeakMemory needs at least one device")
        self.devices: tuple[torch.device, ...] = tuple(
            dict.fromkeys(torch.device(d) for d in items)
        )
        self.per_device: dict[str, int] = {}
        self.methods: dict[str, str] = {}
        self._start: dict[str, int] = {}
        self._reset: list[str] = []
        self._probes: dict[str, Callable[[], int | None]] = {}
        self._high: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- context manager ---------------------------------------------------------------------

    def __enter__(self) -> PeakMemory:
        for dev in self.devices:
            name = str(dev)
            if dev.type == "cuda":  # pragma: no cover - needs a GPU
                self.methods[name] = "cuda_max_allocated"
                torch.cuda.synchronize(dev)
                with _ALLOCATOR_LOCK:
                    if not _ALLOCATOR_ACTIVE.get(name):
                        torch.cuda.reset_peak_memory_stats(dev)
                    _ALLOCATOR_ACTIVE[name] = _ALLOCATOR_ACTIVE.get(name, 0) + 1
                self._reset.append(name)
                self._start[name] = int(torch.cuda.memory_allocated(dev))
                continue
            probe = _rss if dev.type == "cpu" else _mps_allocated if dev.type == "mps" else None
            if probe is None:  # pragma: no cover - an accelerator without memory statistics
                self.methods[name] = "unmeasured"
                continue
            self.methods[name] = "rss_sampled" if dev.type == "cpu" else "mps_sampled"
            self._probes[name] = probe
        if self._probes:
            self._poll()
            self._start.update(self._high)
            _SAMPLER.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._probes:
            _SAMPLER.remove(self)
            self._poll()
        for dev in self.devices:
            name = str(dev)
            if name in self._reset:  # pragma: no cover - needs a GPU
                torch.cuda.synchronize(dev)
                peak = int(torch.cuda.max_memory_allocated(dev))
                with _ALLOCATOR_LOCK:
                    _ALLOCATOR_ACTIVE[name] -= 1
                self.per_device[name] = max(0, peak - self._start[name])
            elif name in self._high and name in self._start:
                self.per_device[name] = max(0, self._high[name] - self._start[name])
            else:
                self.per_device[name] = 0
                self.methods[name] = "unmeasured"

    # --- results -----------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """The peak above the start, summed over the devices (bytes)."""
        return sum(self.per_device.values())

    @property
    def method(self) -> str:
        """How it was measured (``"+"``-joined when the devices differ in method)."""
        return "+".join(dict.fromkeys(self.methods[str(d)] for d in self.devices))

    def as_dict(self) -> dict[str, Any]:
        """``{"device": ..., "bytes": ..., "method": ...}`` (plus ``"per_device"`` when the
        block spans several devices; ``"device"`` then joins their names with ``","``)."""
        out: dict[str, Any] = {
            "device": ",".join(str(d) for d in self.devices),
            "bytes": self.bytes,
            "method": self.method,
        }
        if len(self.devices) > 1:
            out["per_device"] = dict(self.per_device)
        return out

    def _poll(self) -> None:
        """Take one sample of every sampled device (from the block's thread or the sampler)."""
        with self._lock:
            for name, probe in self._probes.items():
                value = probe()
                if value is not None and value > self._high.get(name, -1):
                    self._high[name] = value


def empty_peak(devices: Iterable[torch.device | str]) -> dict[str, Any]:
    """The peak-memory record before anything was measured (0 bytes)."""
    probe = PeakMemory(devices)
    kinds = {
        "cuda": "cuda_max_allocated",
        "cpu": "rss_sampled",
        "mps": "mps_sampled",
    }
    probe.methods = {str(d): kinds.get(d.type, "unmeasured") for d in probe.devices}
    probe.per_device = {str(d): 0 for d in probe.devices}
    return probe.as_dict()


_S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def measure_peak(
    method: Callable[Concatenate[_S, _P], _R],
) -> Callable[Concatenate[_S, _P], _R]:
    """Decorate a method of an object with ``memory_devices`` (devices to measure) and
    ``peak_memory`` (the record, :meth:`PeakMemory.as_dict`): each outermost call runs in a
    :class:`PeakMemory`, and the record keeps the call with the most bytes. Calls nested in a
    measured call (e.g. a clean run inside a patched run) are covered by the outer one."""

    @functools.wraps(method)
    def wrapper(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        obj: Any = self
        if getattr(obj, "_measuring_peak", False):
            return method(self, *args, **kwargs)
        obj._measuring_peak = True
        try:
            with PeakMemory(obj.memory_devices) as peak:
                result = method(self, *args, **kwargs)
        finally:
            obj._measuring_peak = False
        old = getattr(obj, "peak_memory", None)
        if old is None or peak.bytes >= int(old.get("bytes", 0)):
            obj.peak_memory = peak.as_dict()
        return result

    return wrapper
