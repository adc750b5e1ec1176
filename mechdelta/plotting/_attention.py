"""One head's attention pattern in reference vs intervened."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mechdelta.core.sites import Component, Site
from mechdelta.errors import ResultFormatError

if TYPE_CHECKING:
    from mechdelta.core.pair import ModelPair

from mechdelta.plotting._style import (
    SCORE_SCALE,
    _finish,
    _nested,
    _sym_max,
    _title,
    position_labels,
)

# --- attention patterns --------------------------------------------------------------------------


@torch.no_grad()
def attention_patterns(
    pair: ModelPair, tokens: torch.Tensor | Sequence[int], layer: int, head: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities of one head on both models: two ``[batch, query, key]`` tensors.

    One forward per model, caching only the head's pattern hook.
    """
    site = Site(Component.HEAD_PATTERN, layer, head=head)
    toks = torch.as_tensor(tokens, dtype=torch.long)
    if toks.dim() == 1:
        toks = toks[None]
    site.validate(pair.shape, seq_len=int(toks.shape[1]))
    index = site.index(pair.shape)
    out = []
    for model in (pair.reference, pair.intervened):
        _, cache = model.run_with_cache(toks.to(pair.device), names_filter=site.hook_name)
        out.append(cache[site.hook_name][index].detach().float().cpu())
    return out[0], out[1]


def _prompt_tokens(pair: ModelPair, tokens_or_task: Any, prompt: int) -> tuple[Any, list[str]]:
    from mechdelta.core.task import PreparedTask, Task

    src = tokens_or_task
    if isinstance(src, str):
        src = Task([src], name="prompt")
    if isinstance(src, Task):
        src = src.prepare(pair.tokenizer, n_ctx=pair.shape.n_ctx, d_vocab=int(pair.cfg.d_vocab))
    if isinstance(src, PreparedTask):
        n = int(src.lengths[prompt])
        return src.tokens[prompt, :n], src.str_tokens(prompt)
    toks = torch.as_tensor(src, dtype=torch.long)
    row = toks[prompt] if toks.dim() == 2 else toks
    tok = pair.tokenizer
    ids = [int(i) for i in row.tolist()]
    labels = [str(i) for i in ids] if tok is None else [tok.decode([i]) for i in ids]
    return row, labels


def attention_figure(
    pair: ModelPair, tokens_or_task: Any, layer: int, head: int, prompt: int = 0
) -> go.Figure:
    """Attention of head ``layer``/``head`` on one prompt: reference, intervened, difference.

    ``tokens_or_task``: a :class:`~mechdelta.Task` / ``PreparedTask`` (``prompt`` picks the
    prompt), a string, or token ids ``[pos]`` / ``[batch, pos]``.
    """
    toks, labels = _prompt_tokens(pair, tokens_or_task, prompt)
    ref, itv = attention_patterns(pair, toks, layer, head)
    return attention_figure_from_patterns(ref[0], itv[0], labels, layer, head)


def attention_figure_from_patterns(
    reference: Any, intervened: Any, labels: Sequence[str] | None, layer: int, head: int
) -> go.Figure:
    """The figure of :func:`attention_figure` from stored ``[query, key]`` patterns (no model)."""
    ref = np.asarray(torch.as_tensor(reference).double().cpu())
    itv = np.asarray(torch.as_tensor(intervened).double().cpu())
    if ref.shape != itv.shape or ref.ndim != 2 or ref.shape[0] != ref.shape[1]:
        raise ResultFormatError(
            f"attention patterns must be two square [query, key] arrays of one shape, got "
            f"{ref.shape} and {itv.shape}"
        )
    n = ref.shape[0]
    if labels is not None and len(labels) != n:
        raise ResultFormatError(f"{len(labels)} token labels for a {n}-token pattern")
    ticks = position_labels(range(n), labels)
    future = np.triu(np.ones((n, n), dtype=bool), k=1)  # causal: a query never sees later keys
    diff = itv - ref
    ref, itv, diff = (np.where(future, np.nan, a) for a in (ref, itv, diff))
    m = _sym_max(diff)
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=["reference", "intervened", "intervened − reference"],
        horizontal_spacing=0.05,
        shared_yaxes=True,
    )
    for col, (name, z, axis) in enumerate(
        (("reference", ref, "coloraxis"), ("intervened", itv, "coloraxis"), ("Δ", diff, "coloraxis2")),
        start=1,
    ):  # fmt: skip
        fig.add_trace(
            go.Heatmap(
                z=_nested(z),
                x=ticks,
                y=ticks,
                coloraxis=axis,
                xgap=1,
                ygap=1,
                hovertemplate=f"query %{{y}}<br>key %{{x}}<br>{name} %{{z:.3f}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        dense = {"dtick": 1} if n <= 48 else {}
        fig.update_xaxes(type="category", title_text="key", row=1, col=col, **dense)
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=col, **dense)
    fig.update_yaxes(title_text="query", row=1, col=1)
    fig.update_layout(
        coloraxis={
            "colorscale": "Blues",
            "cmin": 0.0,
            "cmax": 1.0,
            "colorbar": {"title": {"text": "attention"}, "len": 0.45, "y": 0.78, "x": 1.01},
        },
        coloraxis2={
            "colorscale": SCORE_SCALE,
            "cmid": 0.0,
            "cmin": -m,
            "cmax": m,
            "colorbar": {"title": {"text": "Δ"}, "len": 0.45, "y": 0.22, "x": 1.01},
        },
    )
    side = max(260, 22 * n + 120)
    title = _title(
        f"attention of head L{layer}H{head}: reference vs intervened",
        "rows: query token, columns: key token; blank: future keys (causal mask)",
    )
    return _finish(fig, title, side + 170, 3 * side + 220)
