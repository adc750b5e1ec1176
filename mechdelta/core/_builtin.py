"""A built-in tiny pair, built from a config with no files: a seeded native model and a copy
with one attention head's output weights edited (ground truth: that head)."""

from __future__ import annotations

from typing import Any

import torch

from mechdelta.core.pair import ModelPair


def tiny_pair(seed: int = 0) -> ModelPair:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    def build() -> Any:
        cfg = TransformerBridgeConfig(
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_vocab=64,
            n_ctx=32,
            act_fn="gelu",
            seed=seed,
            model_name="builtin-tiny",
        )
        return TransformerBridge.boot_native(cfg)  # type: ignore[attr-defined]

    reference, intervened = build(), build()
    with torch.no_grad():
        intervened.blocks[1].attn.o.weight[:, 16:32] *= 2.0
    return ModelPair(reference, intervened, names=("builtin-tiny", "builtin-tiny (L1H1 W_O x2)"))
