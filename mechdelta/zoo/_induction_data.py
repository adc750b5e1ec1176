"""Data for the ``induction`` entry: random tokens with one repeated random segment.

Each sequence is ``n_ctx`` uniform random tokens in which a random segment of random length
``L in [min_len, max_len]`` appears twice: first at a random offset ``p``, again after a random gap
``g`` (``p + 2L + g <= n_ctx``). Random length, offset and gap matter: with a fixed repeat offset
layer-0 heads solve the task by position and no induction circuit forms.

The predictable tokens are the second copy's tokens after its first: each is predicted by
attending back to the token after the earlier occurrence of the current token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechdelta.errors import ConfigError


@dataclass(frozen=True)
class RepeatData:
    """The sequence distribution: vocabulary, length, and the repeated segment's length range."""

    d_vocab: int = 300
    n_ctx: int = 64
    min_len: int = 8
    max_len: int = 31

    def __post_init__(self) -> None:
        if self.d_vocab < 2 or self.n_ctx < 4:
            raise ConfigError(f"invalid repeat data sizes {self}")
        if not 2 <= self.min_len <= self.max_len or 2 * self.max_len > self.n_ctx:
            raise ConfigError(
                f"segment lengths [{self.min_len}, {self.max_len}] must satisfy "
                f"2 <= min <= max and 2 * max <= n_ctx={self.n_ctx}"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def sample(
        self, gen: torch.Generator, batch: int
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """``batch`` sequences and the mask of their predictable (second-copy) tokens."""
        tokens = torch.randint(0, self.d_vocab, (batch, self.n_ctx), generator=gen)
        mask = torch.zeros(batch, self.n_ctx, dtype=torch.bool)
        lengths = torch.randint(self.min_len, self.max_len + 1, (batch,), generator=gen)
        u = torch.rand(batch, 2, generator=gen, dtype=torch.float64)
        for b in range(batch):
            length = int(lengths[b])
            room = self.n_ctx - 2 * length
            gap = int(u[b, 0] * (room + 1))
            start = int(u[b, 1] * (room - gap + 1))
            second = start + length + gap
            tokens[b, second : second + length] = tokens[b, start : start + length]
            mask[b, second + 1 : second + length] = True
        return tokens, mask

    def train_batch(
        self, gen: torch.Generator, batch: int
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """A training batch: every token after the first is a target (plain language modelling)."""
        tokens, _ = self.sample(gen, batch)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)
