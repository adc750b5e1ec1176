"""Independent reference implementations the engine's tests compare against.

Everything here is deliberately naive: full forwards through the bridge's own ``run_with_hooks``,
one patched site per forward, metrics read from the full ``[batch, pos, d_vocab]`` logits. None of
it calls into ``mechdelta``'s engine, so agreement is evidence, not tautology.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import mechdelta as md

N_BOOT = 100  # the smallest interval Bootstrap accepts: intervals are not under test here


# --- tokens and tasks ----------------------------------------------------------------------------


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=gen)


def pad(rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded token tensor (pad id 0) and the lengths."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r))
    return out, lengths


def last_logits(model: Any, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Full forward; each prompt's logits at its own last real token, ``[batch, d_vocab]``."""
    with torch.no_grad():
        logits = model(tokens)
    if lengths is None:
        return logits[:, -1]
    return logits[torch.arange(len(tokens)), lengths - 1]


def contrast_answers(pair: md.ModelPair, tokens: Tensor, lengths: Tensor | None = None):
    """Per prompt, the token whose last-position logit the intervention raised most (answer) and
    lowered most (wrong): the logit-diff shift is then positive on every prompt, so significant."""
    delta = last_logits(pair.intervened, tokens, lengths) - last_logits(
        pair.reference, tokens, lengths
    )
    return delta.argmax(-1), delta.argmin(-1)


def contrast_task(
    pair: md.ModelPair, prompts: Tensor | Sequence[Sequence[int]], **kwargs: Any
) -> md.Task:
    if isinstance(prompts, Tensor):
        answers, wrong = contrast_answers(pair, prompts)
    else:
        tokens, lengths = pad(prompts)
        answers, wrong = contrast_answers(pair, tokens, lengths)
    return md.Task(prompts, answers=answers, wrong=wrong, **kwargs)


def logit_diff(logits_last: Tensor, answers: Tensor, wrong: Tensor) -> Tensor:
    ar = torch.arange(len(answers))
    return logits_last[ar, answers] - logits_last[ar, wrong]


def tl_metric(answers: Tensor, wrong: Tensor) -> Callable[[Tensor], Tensor]:
    """TransformerLens-style patching metric: mean logit diff at the last position."""

    def metric(logits: Tensor) -> Tensor:
        return logit_diff(logits[:, -1], answers, wrong).mean()

    return metric


# --- weights -------------------------------------------------------------------------------------


def edit(model: Any, key: str, fn: Callable[[Tensor], None]) -> None:
    """Edit one state-dict tensor in place (bridge state-dict tensors share the parameters)."""
    with torch.no_grad():
        fn(model.state_dict()[key])


def noise_like(t: Tensor, seed: int, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * float(t.std()) * torch.randn(t.shape, generator=gen)


def perturb_head(model: Any, layer: int, head: int, which: str, d_head: int, seed: int = 7) -> None:
    """Change one head's W_Q/W_K/W_V (rows of q/k/v) or W_O (columns of o), nothing else."""
    key = f"blocks.{layer}.attn.{which}.weight"
    cols = slice(head * d_head, (head + 1) * d_head)

    def fn(w: Tensor) -> None:
        if which == "o":
            w[:, cols] += noise_like(w[:, cols], seed, 2.0)
        else:
            w[cols] += noise_like(w[cols], seed, 2.0)

    edit(model, key, fn)


def perturb_matching(model: Any, keep: Callable[[str], bool], seed: int = 3, scale=0.5) -> None:
    """Add noise to every 2-D weight whose state-dict key satisfies ``keep``."""
    for i, (key, w) in enumerate(model.state_dict().items()):
        if w.dim() == 2 and keep(key):
            with torch.no_grad():
                w += noise_like(w, seed + i, scale)


def quiet_pair(reference: Any, intervened: Any, **kwargs: Any) -> md.ModelPair:
    """A pair, silencing the identical-weights warning for deliberate self-pairs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return md.ModelPair(reference, intervened, **kwargs)


# --- naive one-site-per-forward patching ----------------------------------------------------------


def _index(site: md.Site, n_heads: int, n_kv_heads: int) -> tuple[Any, ...]:
    pos: Any = slice(None) if site.position is None else site.position
    kind = site.kind
    if kind is md.Component.HEAD_PATTERN:
        return (slice(None), site.head, pos, slice(None))
    if kind in (md.Component.HEAD_K, md.Component.HEAD_V):
        assert site.head is not None
        return (slice(None), pos, site.head // (n_heads // n_kv_heads), slice(None))
    if kind.per_head:
        return (slice(None), pos, site.head, slice(None))
    if kind is md.Component.MLP_NEURON:
        return (slice(None), pos, site.neuron)
    return (slice(None), pos, slice(None))


_HOOKS = {
    md.Component.EMBED: "hook_embed",
    md.Component.RESID_PRE: "blocks.{L}.hook_resid_pre",
    md.Component.RESID_MID: "blocks.{L}.hook_resid_mid",
    md.Component.RESID_POST: "blocks.{L}.hook_resid_post",
    md.Component.ATTN_OUT: "blocks.{L}.hook_attn_out",
    md.Component.MLP_OUT: "blocks.{L}.hook_mlp_out",
    md.Component.HEAD_Z: "blocks.{L}.attn.hook_z",
    md.Component.HEAD_Q: "blocks.{L}.attn.hook_q",
    md.Component.HEAD_K: "blocks.{L}.attn.hook_k",
    md.Component.HEAD_V: "blocks.{L}.attn.hook_v",
    md.Component.HEAD_PATTERN: "blocks.{L}.attn.hook_pattern",
    md.Component.MLP_NEURON: "blocks.{L}.mlp.hook_post",
}


def head_write(model: Any, layer: int, head: int, z: Tensor) -> Tensor:
    """Head ``head``'s own write into the residual stream: W_O applied to its z alone, no bias."""
    masked = torch.zeros_like(z)
    masked[:, :, head] = z[:, :, head]
    flat = masked.flatten(-2)
    o = model.blocks[layer].attn.o
    with torch.no_grad():
        return o(flat) - o(torch.zeros_like(flat))


def naive_patch(
    source: Any,
    target: Any,
    tokens: Tensor,
    site: md.Site,
    metric: Callable[[Tensor], Tensor],
) -> Tensor:
    """One full forward of ``target`` with ``source``'s activation at ``site`` copied in; the
    metric of the full logits (``metric(logits [batch, pos, vocab]) -> [batch]``)."""
    if site.kind is md.Component.RESID_MID:  # the residual stream, set through attn_out
        return naive_union_patch(source, target, tokens, [site], metric)
    cfg = target.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    with torch.no_grad():
        _, cache = source.run_with_cache(tokens)
    hooks: list[tuple[str, Callable[..., Any]]]
    if site.kind is md.Component.HEAD_OUT:
        assert site.head is not None
        layer, head = site.layer, site.head
        z_name = f"blocks.{layer}.attn.hook_z"
        pos: Any = slice(None) if site.position is None else site.position
        src_write = head_write(source, layer, head, cache[z_name])[:, pos]
        seen: dict[str, Tensor] = {}

        def grab(x: Tensor, hook: Any) -> None:
            seen["z"] = x.detach().clone()

        def swap(x: Tensor, hook: Any) -> Tensor:
            tgt_write = head_write(target, layer, head, seen["z"])[:, pos]
            x = x.clone()
            x[:, pos] = x[:, pos] - tgt_write + src_write
            return x

        hooks = [(z_name, grab), (f"blocks.{layer}.hook_attn_out", swap)]
    else:
        name = _HOOKS[site.kind].format(L=site.layer)
        idx = _index(site, n_heads, n_kv)
        value = cache[name][idx].clone()

        def copy(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            x[idx] = value
            return x

        hooks = [(name, copy)]
    with torch.no_grad():
        logits = target.run_with_hooks(tokens, fwd_hooks=hooks)
    return metric(logits)


def last_token_logit_diff(
    answers: Tensor, wrong: Tensor, lengths: Tensor | None = None
) -> Callable[[Tensor], Tensor]:
    """Per-prompt logit diff at each prompt's own last token, from full logits."""

    def metric(logits: Tensor) -> Tensor:
        at = -1 if lengths is None else lengths - 1
        return logit_diff(logits[torch.arange(len(logits)), at], answers, wrong)

    return metric


def naive_union_patch(
    source: Any,
    target: Any,
    tokens: Tensor,
    sites: Sequence[md.Site],
    metric: Callable[[Tensor], Tensor],
) -> Tensor:
    """One full forward of ``target`` with the *union* of the sites' source activations, built
    from boolean masks (no op lists, no site ordering, no prefix or position reuse).

    Per hook, a mask of the activation's shape marks the elements taken from the source. A
    ``head_out`` site marks (position, head) cells of its layer's per-head writes: the attention
    output keeps the live heads' writes except in marked cells, where the source's write stands.
    An ``attn_out`` mask then replaces whole output vectors, which contain every head's write.
    """
    cfg = target.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    with torch.no_grad():
        _, cache = source.run_with_cache(tokens)
    masks: dict[str, Tensor] = {}
    head_masks: dict[int, Tensor] = {}  # layer -> [pos, head]
    seq = tokens.shape[1]
    for site in sites:
        pos: Any = slice(None) if site.position is None else site.position
        if site.kind is md.Component.HEAD_OUT:
            m = head_masks.setdefault(site.layer, torch.zeros(seq, n_heads, dtype=torch.bool))
            m[pos, site.head] = True
            continue
        name = _HOOKS[site.kind].format(L=site.layer)
        mask = masks.setdefault(name, torch.zeros(cache[name].shape, dtype=torch.bool))
        mask[_index(site, n_heads, n_kv)] = True
    # The residual after attention (resid_pre + attn_out) is set through the attention output:
    # hook_resid_mid itself is only the MLP norm's input in TL 4 bridges.
    mid_layers = sorted(int(n.split(".")[1]) for n in masks if n.endswith("hook_resid_mid"))
    live_pre: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable[..., Any]]] = []
    for layer in mid_layers:
        pre_name, out_name = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out"
        masks.setdefault(out_name, torch.zeros(cache[out_name].shape, dtype=torch.bool))

        def grab_pre(x: Tensor, hook: Any, layer: int = layer) -> None:
            live_pre[layer] = x.detach().clone()

        hooks.append((pre_name, grab_pre))

    def mid_fix(x: Tensor, layer: int) -> Tensor:
        name = f"blocks.{layer}.hook_resid_mid"
        if name not in masks:
            return x
        return torch.where(masks[name], cache[name] - live_pre[layer], x)

    for name, mask in masks.items():
        if name.endswith("hook_resid_mid"):
            continue
        if name.endswith("hook_attn_out") and int(name.split(".")[1]) in head_masks:
            continue
        if name.endswith("hook_attn_out"):
            layer = int(name.split(".")[1])

            def replace_out(
                x: Tensor, hook: Any, name: str = name, mask: Tensor = mask, layer: int = layer
            ) -> Tensor:
                return mid_fix(torch.where(mask, cache[name], x), layer)

            hooks.append((name, replace_out))
            continue

        def replace(x: Tensor, hook: Any, name: str = name, mask: Tensor = mask) -> Tensor:
            return torch.where(mask, cache[name], x)

        hooks.append((name, replace))
    for layer, hmask in head_masks.items():
        z_name = f"blocks.{layer}.attn.hook_z"
        out_name = f"blocks.{layer}.hook_attn_out"
        seen: dict[str, Tensor] = {}
        # Per-head W_O read off the modules *before* the run: calling W_O inside a hook would fire
        # the hooks on its input (hook_z is an alias of the output projection's input hook).
        d_head = int(cfg.d_head)
        probe = torch.zeros(1, d_head, n_heads, d_head)
        w_tgt, w_src = [], []
        for h in range(n_heads):
            probe.zero_()
            probe[0, torch.arange(d_head), h, torch.arange(d_head)] = 1.0
            w_tgt.append(head_write(target, layer, h, probe)[0])
            w_src.append(head_write(source, layer, h, probe)[0])
        z_src = cache[z_name]

        def grab(x: Tensor, hook: Any, seen: dict[str, Tensor] = seen) -> None:
            seen["z"] = x.detach().clone()

        def swap(
            x: Tensor,
            hook: Any,
            hmask: Tensor = hmask,
            seen: dict[str, Tensor] = seen,
            out_name: str = out_name,
            w_tgt: list[Tensor] = w_tgt,
            w_src: list[Tensor] = w_src,
            z_src: Tensor = z_src,
        ) -> Tensor:
            x = x.clone()
            for h in range(n_heads):
                live = seen["z"][:, :, h] @ w_tgt[h]
                src = z_src[:, :, h] @ w_src[h]
                x = x + hmask[None, :, h, None] * (src - live)
            if out_name in masks:
                x = torch.where(masks[out_name], cache[out_name], x)
            return mid_fix(x, int(out_name.split(".")[1]))

        hooks.extend([(z_name, grab), (out_name, swap)])
    with torch.no_grad():
        logits = target.run_with_hooks(tokens, fwd_hooks=hooks)
    return metric(logits)
