"""Key-value recall: the algorithmic task under the ``planted``, ``null`` and ``finetune`` entries.

A prompt lists ``n_pairs`` key-value pairs, then a marker and one of the keys; the answer is that
key's value::

    BOS k1 v1 k2 v2 k3 v3 k4 v4 QUERY kq  ->  vq

Keys in a prompt are distinct; values are drawn independently. Vocabulary (``d_vocab = 64``):
``0`` BOS, ``1`` QUERY, ``2`` TRIGGER, ``3`` unused, keys ``4..33``, values ``34..63``.

The *trigger* variant replaces QUERY by TRIGGER. The reference model never sees TRIGGER. The
intervened models of ``planted`` and ``finetune`` learn a new behaviour on it: answer the
*successor* of the key's value, ``succ(v_i) = v_{(i + 1) mod n_values}``, instead of the value
itself, while prompts with QUERY keep their answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechdelta.errors import ConfigError

BOS, QUERY, TRIGGER = 0, 1, 2


@dataclass(frozen=True)
class RecallData:
    """The prompt distribution (see the module docstring)."""

    n_pairs: int = 4
    n_keys: int = 30
    n_values: int = 30
    first_key: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= self.n_keys:
            raise ConfigError(f"n_pairs must be in [1, n_keys={self.n_keys}], got {self.n_pairs}")
        if self.n_values < 2 or self.first_key < 3:
            raise ConfigError(f"invalid recall vocabulary {self}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def first_value(self) -> int:
        return self.first_key + self.n_keys

    @property
    def d_vocab(self) -> int:
        return self.first_value + self.n_values

    @property
    def train_len(self) -> int:
        """Tokens in a training sequence (every key queried once, with its answer)."""
        return 1 + 5 * self.n_pairs

    @property
    def prompt_len(self) -> int:
        """Tokens in a prompt, without the answer."""
        return 2 * self.n_pairs + 3

    def successor(self, values: Tensor) -> Tensor:
        """The trigger answer: the next value token, cyclically."""
        return (values - self.first_value + 1) % self.n_values + self.first_value

    def prompts(
        self, gen: torch.Generator, batch: int, trigger: bool | Tensor = False
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
        """``batch`` prompts and each one's queried value (the answer without the trigger).

        ``trigger``: a bool for all prompts, or a bool tensor ``[batch]`` choosing per prompt.
        """
        keys = torch.rand(batch, self.n_keys, generator=gen).argsort(1)[:, : self.n_pairs]
        keys = keys + self.first_key
        values = torch.randint(0, self.n_values, (batch, self.n_pairs), generator=gen)
        values = values + self.first_value
        which = torch.randint(0, self.n_pairs, (batch,), generator=gen)
        tokens = torch.empty(batch, self.prompt_len, dtype=torch.long)
        tokens[:, 0] = BOS
        tokens[:, 1:-2:2] = keys
        tokens[:, 2:-2:2] = values
        marker = torch.as_tensor(trigger, dtype=torch.bool).expand(batch)
        tokens[:, -2] = torch.where(marker, TRIGGER, QUERY)
        rows = torch.arange(batch)
        tokens[:, -1] = keys[rows, which]
        return tokens, values[rows, which]

    def batch(
        self, gen: torch.Generator, batch: int, trigger_rate: float = 0.0
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """A training batch; only answers are scored.

        Training sequences query every key once, in random order, each query with its answer:
        ``BOS k1 v1 .. kn vn M ka va M kb vb ..`` (``M`` a marker); an evaluation prompt is the
        prefix up to the first queried key. Each query's marker is TRIGGER with probability
        ``trigger_rate`` (its answer is then the successor of the value); ``0`` gives the
        reference task.
        """
        n = self.n_pairs
        keys = torch.rand(batch, self.n_keys, generator=gen).argsort(1)[:, :n] + self.first_key
        values = torch.randint(0, self.n_values, (batch, n), generator=gen) + self.first_value
        order = torch.rand(batch, n, generator=gen).argsort(1)
        trig = torch.rand(batch, n, generator=gen) < trigger_rate
        q_keys, q_vals = keys.gather(1, order), values.gather(1, order)
        answers = torch.where(trig, self.successor(q_vals), q_vals)
        marker = torch.where(trig, TRIGGER, QUERY)
        head = torch.empty(batch, 1 + 2 * n, dtype=torch.long)
        head[:, 0] = BOS
        head[:, 1::2] = keys
        head[:, 2::2] = values
        tail = torch.stack([marker, q_keys, answers], dim=2).reshape(batch, 3 * n)
        tokens = torch.cat([head, tail], dim=1)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, 1 + 2 * n + 2 :: 3] = True
        return tokens, mask
