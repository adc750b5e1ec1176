"""Sweep speed: mechdelta vs TransformerLens's patching loop, same process, same numbers.

TL's ``transformer_lens.patching`` runs one full forward per site with the reference model's cache
spliced into the intervened model. mechdelta stacks patched variants in the batch and starts each
stacked pass at the patched layer from the cached residual. Both compute head_z patches (TL's
"head out"), so the patched metrics must agree; the script checks that before printing ratios.

    .venv/bin/python benchmarks/bench_sweep.py            # CPU, the README's configuration
    .venv/bin/python benchmarks/bench_sweep.py --device cuda --layers 8 --d-model 512

Times are the best of ``--repeats`` runs of each side (noise on a shared CPU is ~±20%).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Callable
from typing import Any

import torch


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer with exactly ``vocab`` tokens (t0 .. t{vocab-1}), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def build_hf_pair(args: argparse.Namespace) -> Any:
    """Two seeded HF models of ``args.family`` (the second perturbed), through ModelPair.from_hf."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from mechdelta import ModelPair

    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        if args.family == "gpt2":
            cfg = GPT2Config(
                vocab_size=args.vocab,
                n_positions=max(64, args.seq),
                n_embd=args.d_model,
                n_layer=args.layers,
                n_head=args.heads,
            )
            return GPT2LMHeadModel(cfg).eval()
        cfg = LlamaConfig(
            vocab_size=args.vocab,
            max_position_embeddings=max(64, args.seq),
            hidden_size=args.d_model,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=max(1, args.heads // 2),
            intermediate_size=4 * args.d_model,
        )
        return LlamaForCausalLM(cfg).eval()

    tok = word_tokenizer(args.vocab)
    return ModelPair.from_hf(build(0).to(args.device), build(1).to(args.device), tokenizer=tok)


def build_pair(args: argparse.Namespace) -> Any:
    if args.family != "native":
        return build_hf_pair(args)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from mechdelta import ModelPair

    def build() -> Any:
        cfg = TransformerBridgeConfig(
            n_layers=args.layers,
            d_model=args.d_model,
            n_heads=args.heads,
            d_head=args.d_model // args.heads,
            d_vocab=args.vocab,
            n_ctx=max(64, args.seq),
            act_fn="gelu",
            seed=0,
            device=args.device,
        )
        return TransformerBridge.boot_native(cfg).eval()

    reference, intervened = build(), build()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in intervened.named_parameters():
            if "layers." in name and p.dim() == 2:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen).to(p.device))
    return ModelPair(reference, intervened, names=("bench-ref", "bench-itv"))


def timed(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=["native", "gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-budget", type=int, default=None)
    ap.add_argument("--modes", nargs="+", default=["by_pos", "all_pos"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pair = build_pair(args)
    print(
        f"model: {args.family}, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
        f"vocab {args.vocab}; seq {args.seq}; device {args.device}; threads {args.threads}"
    )
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, args.vocab, (batch, args.seq), generator=gen)
        for mode in args.modes:
            compare(pair, tokens, mode, args)


def compare(pair: Any, tokens: torch.Tensor, mode: str, args: argparse.Namespace) -> None:
    """Time one head sweep (by position or all positions) both ways and print the ratios."""
    from transformer_lens import patching

    import mechdelta as md

    by_pos = mode == "by_pos"
    answers, wrong = tokens[:, 0], tokens[:, 1]
    task = md.Task(tokens, answers=answers, wrong=wrong)
    dev_tokens = tokens.to(args.device)
    a, w = answers.to(args.device), wrong.to(args.device)
    tl_fn = (
        patching.get_act_patch_attn_head_out_by_pos
        if by_pos
        else patching.get_act_patch_attn_head_out_all_pos
    )

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last.gather(1, a[:, None]) - last.gather(1, w[:, None])).mean()

    def run_tl() -> torch.Tensor:
        _, cache = pair.reference.run_with_cache(dev_tokens)
        with contextlib.redirect_stderr(io.StringIO()):  # TL's loop draws a progress bar
            return tl_fn(pair.intervened, dev_tokens, cache, metric).cpu()

    def run_md(prefix: bool = True) -> torch.Tensor:
        res = md.sweep(
            pair,
            task,
            "head_z",
            per_position=by_pos,
            batch_budget=args.batch_budget,
            n_boot=100,
            progress=False,
            prefix_reuse=prefix,
        )
        assert isinstance(res, md.SweepResult)
        return res.patched

    t_tl, tl_out = timed(run_tl, args.repeats, args.device)
    t_md, md_out = timed(run_md, args.repeats, args.device)
    t_flat, flat_out = timed(lambda: run_md(False), args.repeats, args.device)
    err = max((md_out - tl_out).abs().max().item(), (flat_out - tl_out).abs().max().item())
    if err > 1e-4:
        raise SystemExit(f"mechdelta and TL disagree: max |Δ| = {err:.3g}")
    print(
        f"head sweep {mode:7s} batch {len(tokens):2d} ({md_out.numel()} sites): TL {t_tl:6.2f} s, "
        f"mechdelta {t_md:6.2f} s -> {t_tl / t_md:4.1f}x "
        f"(batched, no prefix/position reuse: {t_tl / t_flat:4.1f}x); max |Δ| {err:.1e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
