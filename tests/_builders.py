"""Builders for tiny models and checkpoints used across the test suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("gpt2", "neox", "llama")

_CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "hello world, mechdelta patches activations across two models",
    "reference and intervened checkpoints of one architecture",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p",
]


def train_tokenizer(vocab_size: int = 300, corpus: list[str] | None = None) -> Any:
    """A byte-level BPE trained locally in milliseconds, wrapped for transformers."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((corpus or _CORPUS) * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    # Round-trip through disk, as a user's tokenizer would come: TL re-loads by name_or_path.
    out = tempfile.mkdtemp(prefix="mechdelta-test-tok-")
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def hf_model(family: str, vocab: int, seed: int = 0, n_layers: int = 3) -> Any:
    """A tiny randomly initialised HF causal LM of ``family`` (seeded)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=n_layers, n_head=4)
        ).eval()
    if family == "neox":
        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=vocab,
                max_position_embeddings=32,
                hidden_size=64,
                num_hidden_layers=n_layers,
                num_attention_heads=4,
                intermediate_size=128,
            )
        ).eval()
    if family == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                max_position_embeddings=32,
                hidden_size=64,
                num_hidden_layers=n_layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
            )
        ).eval()
    raise ValueError(family)


def save_checkpoint(
    root: Path, family: str, tokenizer: Any, seed: int = 0, name: str | None = None
) -> Path:
    out = root / (name or f"{family}-{seed}")
    model = hf_model(family, len(tokenizer), seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def native_bridge(seed: int = 0, **overrides: Any) -> Any:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg: dict[str, Any] = dict(
        n_layers=3, d_model=64, n_heads=4, d_head=16, d_vocab=50, n_ctx=16, act_fn="gelu", seed=seed
    )
    cfg.update(overrides)
    return TransformerBridge.boot_native(TransformerBridgeConfig(**cfg)).eval()


def native_pair(
    perturb: Callable[[Any], None] | None = None, seed: int = 0, **overrides: Any
) -> tuple[Any, Any]:
    """Two native bridges with the same seed; ``perturb(intervened)`` edits the second in place."""
    ref = native_bridge(seed, **overrides)
    itv = native_bridge(seed, **overrides)
    if perturb is not None:
        with torch.no_grad():
            perturb(itv)
    return ref, itv
