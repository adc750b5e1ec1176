"""A small seeded, deterministic CPU training loop for zoo models.

Same seed, same torch build, same thread count -> the same loss curve bit for bit: data come from a
``torch.Generator`` seeded with the spec's seed, the global RNG is forked and seeded (and restored
afterwards), and ``torch.use_deterministic_algorithms(True)`` is on while training.

Partial training (the ``planted`` entry) takes boolean masks per state-dict key: the gradient is
zeroed outside the mask, only masked tensors are given to the optimizer, and after every step the
frozen entries are copied back from a saved copy, so everything outside the mask stays bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from mechdelta.errors import ConfigError, ZooError

__all__ = ["BatchFn", "LossCurve", "TrainResult", "TrainSpec", "deterministic", "train"]

# ``batch_fn(generator, batch_size) -> (tokens [batch, pos], targets [batch, pos])``: ``targets``
# marks the tokens the loss scores (token t predicted from position t-1; column 0 is ignored).
BatchFn = Callable[
    [torch.Generator, int], tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]
]

_OPTIMIZERS = ("adamw", "adam")


@dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters of one training stage."""

    steps: int
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps must be an int >= 0, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LossCurve:
    """The training loss at every step."""

    losses: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.losses)

    def summary(self, points: int = 25) -> dict[str, Any]:
        """First/last/min loss and the mean over ``points`` equal windows (for cards)."""
        n = len(self.losses)
        if n == 0:
            return {"steps": 0}
        width = max(1, -(-n // points))
        windows = [self.losses[i : i + width] for i in range(0, n, width)]
        return {
            "steps": n,
            "first": self.losses[0],
            "last": self.losses[-1],
            "min": min(self.losses),
            "window": width,
            "window_means": [round(sum(w) / len(w), 5) for w in windows],
        }


@dataclass(frozen=True)
class TrainResult:
    """A stage's loss curve, the weights at requested steps, and its wall time."""

    curve: LossCurve
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    seconds: float = 0.0
    threads: int = 1


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed the global RNG, enable deterministic algorithms and use one CPU thread (the shipped
    entries were trained on one: CPU reductions split across threads round differently, so a
    two-thread build gives other weights); restore all three afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def next_token_loss(
    logits: Tensor, tokens: Int[Tensor, "batch pos"], targets: Bool[Tensor, "batch pos"]
) -> Tensor:
    """Mean cross-entropy of the tokens marked in ``targets`` (token t predicted at t-1)."""
    scored = targets[:, 1:]
    pred = logits[:, :-1][scored]
    return F.cross_entropy(pred.float(), tokens[:, 1:][scored])


def _trainable(
    model: Any, masks: Mapping[str, Tensor] | None
) -> list[tuple[str, torch.nn.Parameter, Tensor | None]]:
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}
    if masks is None:
        return [(k, p, None) for k, p in params.items()]
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ZooError(f"masks name tensors that are not trainable parameters: {unknown}")
    out: list[tuple[str, torch.nn.Parameter, Tensor | None]] = []
    for key, mask in masks.items():
        p = params[key]
        m = torch.as_tensor(mask, dtype=torch.bool)
        if m.shape != p.shape:
            raise ZooError(
                f"mask for {key} has shape {tuple(m.shape)}, the tensor {tuple(p.shape)}"
            )
        if m.any():
            out.append((key, p, m))
    if not out:
        raise ZooError("the masks select no weight to train")
    return out


def train(
    model: Any,
    spec: TrainSpec,
    batch_fn: BatchFn,
    *,
    masks: Mapping[str, Tensor] | None = None,
    snapshots: Iterable[int] = (),
    progress: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` (a native bridge) in place for ``spec.steps`` steps; return the curve.

    Args:
        model: the bridge; its ``original_model`` is trained (the bridge shares its weights).
        spec: steps, learning rate, batch size, optimizer, seed.
        batch_fn: draws one batch from the seeded generator.
        masks: state-dict key -> bool mask of the entries to train; ``None`` trains everything.
        snapshots: steps after which to keep a copy of the state dict (0 = before training).
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    want = sorted(set(snapshots))
    if want and (want[0] < 0 or want[-1] > spec.steps):
        raise ConfigError(f"snapshot steps {want} out of range [0, {spec.steps}]")
    module = getattr(model, "original_model", model)
    chosen = _trainable(model, masks)
    frozen = {k: p.detach().clone() for k, p, m in chosen if m is not None}
    params = [p for _, p, _ in chosen]
    kept: dict[int, dict[str, Tensor]] = {}
    losses: list[float] = []
    start = time.perf_counter()
    with deterministic(spec.seed):
        gen = torch.Generator().manual_seed(spec.seed)
        if spec.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=spec.lr, weight_decay=spec.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
        if 0 in want:
            kept[0] = _snapshot(model)
        module.train()
        bar = tqdm(total=spec.steps, desc=desc, disable=not progress, leave=False)
        try:
            for step in range(1, spec.steps + 1):
                tokens, targets = batch_fn(gen, spec.batch_size)
                loss = next_token_loss(module(tokens), tokens, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for _, p, m in chosen:
                    if m is not None and p.grad is not None:
                        p.grad.mul_(m)
                opt.step()
                with torch.no_grad():
                    for key, p, m in chosen:
                        if m is not None:
                            p.copy_(torch.where(m, p, frozen[key]))
                value = float(loss.detach())
                losses.append(value)
                if step in want:
                    kept[step] = _snapshot(model)
                bar.update(1)
                if step % 25 == 0 or step == spec.steps:
                    bar.set_postfix(loss=f"{value:.4f}")
        finally:
            bar.close()
            module.eval()
    return TrainResult(
        LossCurve(tuple(losses)), kept, time.perf_counter() - start, torch.get_num_threads()
    )


def _snapshot(model: Any) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
