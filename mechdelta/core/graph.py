"""The computational graph of a transformer as nodes and edges: the vocabulary of edge-level
attribution and circuit search.

Nodes (:class:`Node`):

- ``embed``: the token embedding plus, where the model has one, the learned position embedding
  (``hook_embed`` + ``hook_pos_embed``): the residual stream's starting value.
- ``L{l}H{h}``: attention head ``h`` of layer ``l``; it *writes* ``z_h @ W_O[h]`` (no bias).
- ``MLP{l}``: the MLP of layer ``l``; it writes ``hook_mlp_out`` (its biases included).
- ``logits``: the final residual stream as read by the final norm and the unembedding.

Biases that are not inside a node's write (the attention output bias ``b_O``) are not nodes.

An :class:`Edge` goes from a sender's write to one *input* of a receiver: a head receives on its
query, key and value inputs separately (``L0H3 -> L1H1.k``); an MLP and ``logits`` have one input
(``MLP0 -> MLP2``, ``L1H2 -> logits``). A receiver's input is the residual stream copy *before*
the receiver's norm (``ln1`` for q/k/v, ``ln2`` for an MLP, ``ln_final`` for ``logits``): the sum
of every upstream sender's write (and the upstream ``b_O``).

Upstream means: ``embed`` feeds everything; a node of layer ``l`` feeds every node of later
layers and ``logits``; in *sequential* blocks (GPT-2, Llama) layer ``l``'s heads also feed
``MLP{l}``, in *parallel* blocks (GPT-NeoX ``use_parallel_residual``, ``cfg.parallel_attn_mlp``)
attention and MLP read the same residual and ``MLP{l}`` does not read its own layer's heads.

Grouped-query attention: keys and values belong to key/value heads, shared by a group of
``group_size`` query heads. **Convention**: the key (value) input of key/value head ``g`` is
named by the group's *first* query head, ``L{l}H{g * group_size}.k``; the other query heads of
the group have no k/v inputs of their own (``L{l}H{g * group_size + 1}.k`` is not an edge of the
graph; :meth:`Edge.validate` says which name to use). Without GQA every head has q, k and v.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mechdelta.core.sites import ModelShape
from mechdelta.errors import SiteError

__all__ = [
    "Edge",
    "Graph",
    "Node",
    "feeds",
    "graph_edges",
    "graph_nodes",
    "is_parallel",
    "receiver_inputs",
]

_KINDS = ("embed", "head", "mlp", "logits")
_INPUTS = ("q", "k", "v")
_NODE_RE = re.compile(r"^(?:L(?P<layer>\d+)H(?P<head>\d+)|MLP(?P<mlp>\d+)|(?P<word>embed|logits))$")


@dataclass(frozen=True, repr=False)
class Node:
    """One node of the graph: ``kind`` is ``"embed"``, ``"head"``, ``"mlp"`` or ``"logits"``;
    ``layer`` is set for heads and MLPs, ``head`` for heads only. ``str`` / :meth:`parse`
    round-trip: ``embed``, ``L1H2``, ``MLP0``, ``logits``."""

    kind: str
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise SiteError(f"unknown node kind {self.kind!r}; use one of {', '.join(_KINDS)}")
        needs_layer = self.kind in ("head", "mlp")
        for name, wanted in (("layer", needs_layer), ("head", self.kind == "head")):
            value = getattr(self, name)
            if wanted and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SiteError(f"a {self.kind} node needs an int {name} >= 0, got {value!r}")
            if not wanted and value is not None:
                raise SiteError(f"a {self.kind} node takes no {name} (got {name}={value!r})")

    @classmethod
    def parse(cls, text: str) -> Node:
        """``"embed"``, ``"L1H2"``, ``"MLP0"`` or ``"logits"`` -> Node (SiteError otherwise)."""
        m = _NODE_RE.match(str(text).strip())
        if m is None:
            raise SiteError(
                f"unknown node name {text!r}: use 'embed', 'L<layer>H<head>' (e.g. 'L1H2'), "
                "'MLP<layer>' (e.g. 'MLP0') or 'logits'"
            )
        if m["word"]:
            return cls(m["word"])
        if m["mlp"] is not None:
            return cls("mlp", int(m["mlp"]))
        return cls("head", int(m["layer"]), int(m["head"]))

    @property
    def rank(self) -> float:
        """Position in a topological order: embed -1, layer l's heads l, its MLP l + 0.5,
        logits +inf (an MLP's rank is only a *sequential* block's order; see :func:`feeds`)."""
        if self.kind == "embed":
            return -1.0
        if self.kind == "logits":
            return float("inf")
        assert self.layer is not None
        return self.layer + (0.5 if self.kind == "mlp" else 0.0)

    def validate(self, shape: ModelShape) -> None:
        """Raise SiteError if the node does not exist in a model of this shape."""
        if self.layer is not None and self.layer >= shape.n_layers:
            raise SiteError(f"{self}: layer {self.layer} >= n_layers={shape.n_layers}")
        if self.head is not None and self.head >= shape.n_heads:
            raise SiteError(f"{self}: head {self.head} >= n_heads={shape.n_heads}")
        if self.kind == "mlp" and shape.d_mlp is None:
            raise SiteError(f"{self}: this model is attention-only, it has no MLPs")

    def __repr__(self) -> str:
        return f"Node({str(self)!r})"

    def __str__(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        return self.kind


def feeds(sender: Node, receiver: Node, *, parallel: bool = False) -> bool:
    """Whether ``sender``'s write reaches ``receiver``'s input directly (through the residual
    stream): ``sender`` is strictly upstream of ``receiver``."""
    if sender.kind == "logits" or receiver.kind == "embed":
        return False
    if sender.kind == "embed" or receiver.kind == "logits":
        return True
    assert sender.layer is not None and receiver.layer is not None
    if sender.layer != receiver.layer:
        return sender.layer < receiver.layer
    return sender.kind == "head" and receiver.kind == "mlp" and not parallel


@dataclass(frozen=True, repr=False)
class Edge:
    """``sender``'s write into ``receiver``'s ``input`` (``"q"``, ``"k"``, ``"v"`` for a head
    receiver, None for an MLP or ``logits``). ``str`` / :meth:`parse` round-trip:
    ``L0H3 -> L1H1.k``, ``MLP0 -> L2H0.v``, ``L1H2 -> logits``, ``embed -> L0H1.q``.

    Construction checks the structure (a head receives on q/k/v, others on one input; the
    receiver strictly downstream of the sender, allowing ``L{l}H{h} -> MLP{l}`` which holds in
    sequential blocks); :meth:`validate` checks against a model's shape, block layout and the
    grouped-query convention of :mod:`mechdelta.core.graph`.
    """

    sender: Node
    receiver: Node
    input: str | None = None

    def __post_init__(self) -> None:
        if self.receiver.kind == "head":
            if self.input not in _INPUTS:
                raise SiteError(
                    f"an edge into head {self.receiver} names the input it reaches: q, k or v "
                    f"(e.g. '{self.sender} -> {self.receiver}.q'), got {self.input!r}"
                )
        elif self.input is not None:
            raise SiteError(
                f"{self.receiver} has a single input; drop '.{self.input}' from the edge"
            )
        if not feeds(self.sender, self.receiver):
            raise SiteError(
                f"{self.sender} -> {self.receiver_input}: the receiver is not downstream of the "
                "sender (a node only feeds nodes of later layers, its own layer's MLP in "
                "sequential blocks, and logits; embed sends, logits receives)"
            )

    @classmethod
    def parse(cls, text: str) -> Edge:
        """``"L0H3 -> L1H1.k"`` -> Edge (SiteError for unknown names or a bad direction)."""
        parts = str(text).split("->")
        if len(parts) != 2:
            raise SiteError(
                f"an edge reads 'SENDER -> RECEIVER[.q|.k|.v]' (e.g. 'L0H3 -> L1H1.k'), "
                f"got {text!r}"
            )
        sender = Node.parse(parts[0])
        name, dot, inp = parts[1].strip().partition(".")
        if dot and inp not in _INPUTS:
            raise SiteError(f"unknown receiver input {inp!r} in {text!r}: use q, k or v")
        return cls(sender, Node.parse(name), inp if dot else None)

    @property
    def receiver_input(self) -> str:
        """The receiver input's name: ``L1H1.k``, ``MLP2``, ``logits``."""
        return f"{self.receiver}.{self.input}" if self.input else str(self.receiver)

    def validate(self, shape: ModelShape, *, parallel: bool = False) -> None:
        """Raise SiteError if this edge is not in the graph of a model of this shape and block
        layout (out of range, an MLP in an attention-only model, ``L{l}H{h} -> MLP{l}`` in a
        parallel block, a k/v input not named by its group's first query head)."""
        self.sender.validate(shape)
        self.receiver.validate(shape)
        if not feeds(self.sender, self.receiver, parallel=parallel):
            raise SiteError(
                f"{self}: in parallel attention/MLP blocks an MLP does not read its own layer's "
                "heads; only earlier layers feed it"
            )
        if self.input in ("k", "v") and self.receiver.head is not None:
            first = self.receiver.head - self.receiver.head % shape.group_size
            if first != self.receiver.head:
                raise SiteError(
                    f"{self}: with grouped-query attention (group size {shape.group_size}) the "
                    f"{self.input} input belongs to the key/value head that query heads "
                    f"{first}..{first + shape.group_size - 1} share; it is named by the first: "
                    f"'{self.sender} -> L{self.receiver.layer}H{first}.{self.input}'"
                )

    def __repr__(self) -> str:
        return f"Edge({str(self)!r})"

    def __str__(self) -> str:
        return f"{self.sender} -> {self.receiver_input}"


def is_parallel(model_or_cfg: Any) -> bool:
    """Whether a model's blocks run attention and MLP in parallel on one residual (GPT-NeoX,
    GPT-J): read from ``cfg.parallel_attn_mlp`` of a TransformerLens config (or a model)."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    return bool(getattr(cfg, "parallel_attn_mlp", False))


def graph_nodes(shape: ModelShape) -> tuple[Node, ...]:
    """Every node in topological order: embed, per layer its heads then its MLP, logits."""
    nodes = [Node("embed")]
    for layer in range(shape.n_layers):
        nodes += [Node("head", layer, h) for h in range(shape.n_heads)]
        if shape.d_mlp is not None:
            nodes.append(Node("mlp", layer))
    nodes.append(Node("logits"))
    return tuple(nodes)


def receiver_inputs(shape: ModelShape) -> tuple[tuple[Node, str | None], ...]:
    """Every receiver input in topological order: per layer, per head its q (and k, v on the
    first query head of each key/value group), then the MLP; then logits."""
    out: list[tuple[Node, str | None]] = []
    for node in graph_nodes(shape)[1:]:
        if node.kind == "head":
            assert node.head is not None
            first = node.head % shape.group_size == 0
            out += [(node, i) for i in (_INPUTS if first else ("q",))]
        else:
            out.append((node, None))
    return tuple(out)


def graph_edges(shape: ModelShape, *, parallel: bool = False) -> tuple[Edge, ...]:
    """Every edge of a model of this shape, grouped by receiver input (topological order), the
    senders of each in topological order."""
    senders = [n for n in graph_nodes(shape) if n.kind != "logits"]
    return tuple(
        Edge(s, node, inp)
        for node, inp in receiver_inputs(shape)
        for s in senders
        if feeds(s, node, parallel=parallel)
    )


@dataclass(frozen=True)
class Graph:
    """The graph of one architecture: its shape, block layout, nodes and edges."""

    shape: ModelShape
    parallel: bool = False

    @classmethod
    def from_model(cls, model: Any) -> Graph:
        """The graph of a TransformerLens model (or a :class:`~mechdelta.ModelPair`)."""
        shape = model.shape if isinstance(getattr(model, "shape", None), ModelShape) else None
        return cls(shape or ModelShape.from_cfg(model.cfg), is_parallel(model))

    @property
    def nodes(self) -> tuple[Node, ...]:
        return graph_nodes(self.shape)

    @property
    def edges(self) -> tuple[Edge, ...]:
        return graph_edges(self.shape, parallel=self.parallel)

    @property
    def senders(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.kind != "logits")

    @property
    def receiver_inputs(self) -> tuple[str, ...]:
        """Names of every receiver input (``L1H0.q``, ``MLP0``, ``logits``), topological."""
        return tuple(f"{n}.{i}" if i else str(n) for n, i in receiver_inputs(self.shape))

    def incoming(self, receiver_input: str) -> tuple[Edge, ...]:
        """The edges into one receiver input (``"L1H0.k"``, ``"MLP2"``, ``"logits"``)."""
        if receiver_input not in self.receiver_inputs:
            raise SiteError(
                f"{receiver_input!r} is not a receiver input of this graph; e.g. "
                f"{', '.join(self.receiver_inputs[:3])}, ..., logits"
            )
        return tuple(e for e in self.edges if e.receiver_input == receiver_input)

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __len__(self) -> int:
        return len(self.edges)
