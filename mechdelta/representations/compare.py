"""The representation screen: where, layer by layer, do the two models' activations diverge?

:func:`compare_representations` runs both models of a pair on a task's prompts (the same tokens in
both) and compares them, per layer and per head, by similarity (CKA), size of the change, the
distributions each layer decodes to, attention patterns, and the weight changes behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechdelta.core.provenance import environment
from mechdelta.core.sites import Component, ModelShape, Site
from mechdelta.errors import ConfigError, SiteError, TaskError
from mechdelta.patching._runner import CacheHooks
from mechdelta.representations._cka import debiased_linear_cka, linear_cka
from mechdelta.representations._divergence import js_divergence, kl_from_logits, relative_delta
from mechdelta.representations._weight_link import weight_delta_rows
from mechdelta.representations.result import RepresentationDiff

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair
    from mechdelta.core.task import Task

__all__ = ["compare_representations"]

_ALLOWED = (
    Component.EMBED,
    Component.RESID_PRE,
    Component.RESID_MID,
    Component.RESID_POST,
    Component.ATTN_OUT,
    Component.MLP_OUT,
    Component.HEAD_Z,
    Component.HEAD_OUT,
    Component.HEAD_Q,
    Component.HEAD_K,
    Component.HEAD_V,
)
_MODELS = ("reference", "intervened")


@torch.no_grad()
def compare_representations(
    pair: ModelPair,
    task: Task,
    *,
    sites: Sequence[Component | str | Site] | Component | str | Site = ("resid_post",),
    positions: str = "all",
    attention: bool = True,
    logit_lens: bool = True,
    weights: bool = True,
    batch_size: int = 32,
) -> RepresentationDiff:
    """Compare the reference and the intervened model's internals on the task's prompts.

    Both models run on the same tokens (the task's prompts; corrupted prompts and answers are
    not used). The *rows* every measure averages over are token positions: with
    ``positions="all"`` (default) every real (non-padding) token of every prompt, with
    ``positions="final"`` each prompt's last token (where next-token metrics read). At least 4
    rows are needed.

    ``sites``: components (``"resid_post"``, ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``,
    ``"mlp_out"``, ``"embed"``, and per head ``"head_out"``, ``"head_z"``, ``"head_q/k/v"``),
    each at every layer (and head), or :class:`~mechdelta.core.sites.Site` values for single
    layers/heads (no position). Rows of the result (:class:`RepresentationDiff`, long format):

    - ``cka``, ``cka_debiased``, ``delta_norm`` at each requested site, layer (and head): linear
      CKA (:func:`~mechdelta.representations.linear_cka`) and its unbiased-HSIC version between
      the ``[rows, features]`` activation matrices of the two models, and the relative change
      ``||a_int - a_ref||_F / ||a_ref||_F`` (Frobenius norms over all rows and features together).
      ``head_out`` is the head's own write ``z_h @ W_O[h]`` computed with each model's own W_O;
      ``head_z`` is before W_O; K/V heads under grouped-query attention are the key-value head the
      query head reads.
    - ``logit_lens_kl`` (site ``resid_post``, each layer; ``logit_lens=True``): each model's
      residual stream after block L decoded by *its own* final norm and unembedding, then
      ``KL(p_ref || p_int)`` per row, mean over rows (nats). A changed unembedding therefore shows
      at every layer; at the last layer this equals ``kl``.
    - ``kl`` (site ``logits``, no layer): ``KL(p_ref || p_int)`` of the two models' next-token
      distributions per row, mean over rows (nats).
    - ``attention_js`` (site ``head_pattern``, each layer and head; ``attention=True``): the
      Jensen-Shannon divergence (nats, at most ln 2) between the two models' attention
      distributions of the head at each query row, mean over rows.
    - ``weight_delta`` (``weights=True``): the relative weight change from ``pair.weight_diff()``
      grouped by what the parameters write: ``embed`` (layer 0), ``attn_out``, ``head_out`` (per
      head: its Q/K/V/O), ``mlp_out`` and ``block`` (everything in block L) per layer, and
      ``unembed`` (final norm + unembedding); see :mod:`mechdelta.representations._weight_link`.

    Raises :class:`~mechdelta.errors.SiteError` for an unknown or unsupported site (attention
    patterns are compared by ``attention_js``; single neurons are not screened),
    :class:`~mechdelta.errors.TaskError` for fewer than 4 rows, and
    :class:`~mechdelta.errors.ConfigError` for bad options.
    """
    from mechdelta.scale._devices import require_one_device

    require_one_device(pair, "compare_representations")
    from mechdelta.core.task import Task

    if not isinstance(task, Task):
        raise TaskError(f"task must be a mechdelta Task, got {type(task).__name__}")
    if positions not in ("all", "final"):
        raise ConfigError(
            f"positions={positions!r}: use 'all' (every real token of every prompt) or 'final' "
            "(each prompt's last token)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"batch_size must be a positive int (prompts per forward), not {batch_size!r}"
        )
    shape = pair.shape
    chosen = _resolve_sites(sites, shape)
    cfg = pair.cfg
    prepared = task.prepare(pair.tokenizer, n_ctx=int(cfg.n_ctx), d_vocab=int(cfg.d_vocab))
    lengths = prepared.lengths
    if positions == "all":
        row_b = torch.cat(
            [torch.full((int(n),), b, dtype=torch.long) for b, n in enumerate(lengths)]
        )
        row_p = torch.cat([torch.arange(int(n)) for n in lengths])
    else:
        row_b, row_p = torch.arange(len(lengths)), lengths - 1
    n_rows = int(row_b.numel())
    if n_rows < 4:
        raise TaskError(
            f"the task gives {n_rows} token row(s) with positions={positions!r}; CKA needs at "
            "least 4 (add prompts, or use positions='all')"
        )
    names = _hook_names(chosen, shape, attention=attention, logit_lens=logit_lens)
    for which in _MODELS:
        known = pair.model(which).hook_dict
        absent = sorted(n for n in names if n not in known)
        if absent:
            raise SiteError(
                f"the {which} model has no hook {absent[0]!r}: this architecture does not expose "
                "that activation (e.g. parallel attention/MLP blocks have no resid_mid)"
            )

    kept: dict[str, dict[str, list[Tensor]]] = {m: {} for m in _MODELS}
    logits: dict[str, list[Tensor]] = {m: [] for m in _MODELS}
    lens_sum = torch.zeros(shape.n_layers, dtype=torch.float64)
    js_sum = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
    w_o: dict[str, dict[int, Tensor]] = {m: {} for m in _MODELS}
    keep = sorted({s.read_hook_name for s in chosen})
    tokens = prepared.tokens.to(pair.device)
    for start in range(0, prepared.batch_size, batch_size):
        stop = start + batch_size
        in_chunk = (row_b >= start) & (row_b < stop)
        b_idx, p_idx = row_b[in_chunk] - start, row_p[in_chunk]
        caches = {}
        for which in _MODELS:
            model = pair.model(which)
            cacher = CacheHooks(sorted(names))
            out = model.run_with_hooks(tokens[start:stop], fwd_hooks=cacher.hooks())
            cacher.check()
            cache = caches[which] = cacher.store
            logits[which].append(out[b_idx, p_idx].to(torch.float64).cpu())
            for name in keep:
                kept[which].setdefault(name, []).append(cache[name][b_idx, p_idx].cpu())
            for site in chosen:
                if site.kind is Component.HEAD_OUT and site.layer not in w_o[which]:
                    w_o[which][site.layer] = _head_w_o(
                        model, site.layer, shape, cache, b_idx, p_idx
                    )
        for layer in range(shape.n_layers) if logit_lens else ():
            name = Site(Component.RESID_POST, layer).read_hook_name
            dec = [_decode(pair.model(w), caches[w][name][b_idx, p_idx]) for w in _MODELS]
            lens_sum[layer] += kl_from_logits(*dec).sum().cpu()
        for layer in range(shape.n_layers) if attention else ():
            name = Site(Component.HEAD_PATTERN, layer, head=0).hook_name
            pats = [caches[w][name][b_idx, :, p_idx, :] for w in _MODELS]  # [rows, head, key]
            js_sum[layer] += js_divergence(*pats).sum(0).cpu()

    site_col: list[str] = []
    layer_col: list[int | None] = []
    head_col: list[int | None] = []
    measure_col: list[str] = []
    values: list[float] = []

    def emit(site: str, layer: int | None, head: int | None, measure: str, value: float) -> None:
        site_col.append(site)
        layer_col.append(layer)
        head_col.append(head)
        measure_col.append(measure)
        values.append(float(value))

    acts = {w: {n: torch.cat(chunks) for n, chunks in kept[w].items()} for w in _MODELS}
    for site in chosen:
        ref, itv = (_site_rows(site, acts[w], w_o[w], shape) for w in _MODELS)
        name = site.kind.value
        emit(name, site.layer, site.head, "cka", linear_cka(ref, itv))
        emit(name, site.layer, site.head, "cka_debiased", debiased_linear_cka(ref, itv))
        emit(name, site.layer, site.head, "delta_norm", relative_delta(ref, itv))
    for layer in range(shape.n_layers) if logit_lens else ():
        emit("resid_post", layer, None, "logit_lens_kl", float(lens_sum[layer]) / n_rows)
    final = kl_from_logits(torch.cat(logits["reference"]), torch.cat(logits["intervened"]))
    emit("logits", None, None, "kl", float(final.mean()))
    for layer in range(shape.n_layers) if attention else ():
        for head in range(shape.n_heads):
            emit("head_pattern", layer, head, "attention_js", float(js_sum[layer, head]) / n_rows)
    if weights:
        for (site_name, layer_, head_), value in weight_delta_rows(pair.weight_diff(), shape):
            emit(site_name, layer_, head_, "weight_delta", value)

    settings: dict[str, Any] = {
        "sites": [str(s) for s in chosen],
        "positions": positions,
        "attention": attention,
        "logit_lens": logit_lens,
        "weights": weights,
        "batch_size": batch_size,
    }
    provenance = {
        **environment(),
        "models": pair.provenance_models(),
        "task": prepared.info(),
        "settings": settings,
    }
    return RepresentationDiff(
        site=tuple(site_col),
        layer=tuple(layer_col),
        head=tuple(head_col),
        measure=tuple(measure_col),
        values=torch.tensor(values, dtype=torch.float64),
        positions=positions,
        n_rows=n_rows,
        provenance=provenance,
    )


def _resolve_sites(
    sites: Sequence[Component | str | Site] | Component | str | Site, shape: ModelShape
) -> list[Site]:
    """The requested sites, each at one layer (and head), validated, in order, without repeats."""
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not items:
        raise ConfigError("sites= is empty: name at least one component, e.g. ('resid_post',)")
    out: list[Site] = []
    for item in items:
        if isinstance(item, Site):
            if item.position is not None:
                raise SiteError(
                    f"{item}: the screen averages over positions (positions='all'|'final'); "
                    "drop the position"
                )
            _check_kind(item.kind)
            expanded = [item]
        else:
            comp = Component.coerce(item)
            _check_kind(comp)
            layers = [0] if comp is Component.EMBED else range(shape.n_layers)
            heads: Sequence[int | None] = range(shape.n_heads) if comp.per_head else [None]
            expanded = [Site(comp, layer, head=h) for layer in layers for h in heads]
        for site in expanded:
            site.validate(shape)
            if site not in out:
                out.append(site)
    return out


def _check_kind(comp: Component) -> None:
    if comp in _ALLOWED:
        return
    if comp is Component.HEAD_PATTERN:
        raise SiteError(
            "attention patterns are compared by the 'attention_js' measure (attention=True), "
            "not as a site: drop 'head_pattern' from sites="
        )
    allowed = ", ".join(c.value for c in _ALLOWED)
    raise SiteError(f"{comp.value!r} cannot be screened; choose from: {allowed}")


def _hook_names(
    chosen: Sequence[Site], shape: ModelShape, *, attention: bool, logit_lens: bool
) -> set[str]:
    names = {s.read_hook_name for s in chosen}
    names |= {s.hook_name for s in chosen if s.kind is Component.HEAD_OUT}  # hook_attn_out: check
    if logit_lens:
        names |= {
            Site(Component.RESID_POST, layer).read_hook_name for layer in range(shape.n_layers)
        }
    if attention:
        names |= {
            Site(Component.HEAD_PATTERN, layer, head=0).hook_name for layer in range(shape.n_layers)
        }
    return names


def _decode(model: Any, resid: Tensor) -> Tensor:
    """Logits of residual rows ``[n, d_model]`` through the model's final norm and unembedding."""
    return model.unembed(model.ln_final(resid[None]))[0]


def _head_w_o(
    model: Any,
    layer: int,
    shape: ModelShape,
    cache: dict[str, Tensor],
    b_idx: Tensor,
    p_idx: Tensor,
) -> Tensor:
    """Each head's slice ``[head, d_head, d_model]`` of the output projection (float64), read off
    the module (any weight layout); checked against the cached attention output."""
    o = model.blocks[layer].attn.o
    width = shape.n_heads * int(model.cfg.d_head)
    param = next(iter(model.parameters()))
    eye = torch.eye(width, device=param.device, dtype=param.dtype)
    bias = o(torch.zeros(1, width, device=param.device, dtype=param.dtype))
    w = (o(eye) - bias).reshape(shape.n_heads, width // shape.n_heads, -1)
    z = cache[f"blocks.{layer}.attn.hook_z"][b_idx, p_idx]
    out = cache[f"blocks.{layer}.hook_attn_out"][b_idx, p_idx]
    recon = torch.einsum("nhd,hdm->nm", z, w) + bias
    err = float((recon - out).abs().max()) if out.numel() else 0.0
    if err > 1e-4 * max(1.0, float(out.abs().max()) if out.numel() else 0.0):
        raise SiteError(
            f"layer {layer}'s attention output is not z @ W_O + b_O (max error {err:.3g}) in this "
            "architecture, so a head's own write is undefined: use 'head_z' instead"
        )
    return w.detach().to(torch.float64).cpu()


def _site_rows(
    site: Site, acts: dict[str, Tensor], w_o: dict[int, Tensor], shape: ModelShape
) -> Tensor:
    """The ``[rows, features]`` activation matrix of one site (float64)."""
    x = acts[site.read_hook_name].to(torch.float64)
    if site.kind is Component.HEAD_OUT:
        assert site.head is not None
        return x[:, site.head] @ w_o[site.layer][site.head]
    head = site.activation_head(shape)
    return x if head is None else x[:, head]
