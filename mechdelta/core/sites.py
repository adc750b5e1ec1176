"""Sites: where in a transformer an activation is read or patched.

A :class:`Site` is a frozen value (component, layer, head, position, neuron). This module is the
only place in mechdelta that turns sites into TransformerLens hook names and index tuples, so user
code never spells hook strings.

What a splice of each component carries across two models (source -> target) is documented on
:class:`Component`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from mechdelta.errors import SiteError

__all__ = ["Component", "ModelShape", "Site", "union"]


class Component(StrEnum):
    """The kinds of activation mechdelta can patch.

    What splicing the *source* model's activation into the *target* model's run carries (which
    weight changes between the two models it transfers), per component:

    - ``EMBED``: token (+ learned positional) embedding output. Carries W_E (and W_pos).
    - ``RESID_PRE`` / ``RESID_MID`` / ``RESID_POST``: the whole residual stream at that point of
      block ``layer``. Carries every upstream difference; nothing downstream.
    - ``ATTN_OUT``: the attention layer's output (all heads, W_O and b_O included), with every
      difference upstream of it and in the layer's Q/K/V/O weights and its norm.
    - ``MLP_OUT``: the MLP's output (all its weights and its norm, plus upstream differences).
    - ``HEAD_Z``: TransformerLens's ``hook_z``, a head's value-weighted sum *before* W_O. Carries the
      head's W_Q, W_K, W_V (and biases) and upstream differences; **not** W_O. Across two models
      whose W_O differs, splicing z transfers nothing of that change: use ``HEAD_OUT``.
    - ``HEAD_OUT``: the head's own write into the residual stream as the *source* computed it,
      ``z_h @ W_O[h]``; the target's own write for that head is removed and the source's added,
      other heads untouched. Carries the head's W_Q, W_K, W_V, W_O and upstream differences;
      not the layer's shared output bias b_O.
    - ``HEAD_Q`` / ``HEAD_K`` / ``HEAD_V``: the projection outputs (``hook_q/k/v``). Carry that
      projection's weights, the layer norm before it and upstream differences. With grouped-query
      attention a K/V site names the key/value head that the query head reads, shared by its
      whole group.
    - ``HEAD_PATTERN``: the attention probabilities of one head. Carries W_Q, W_K (and the norm);
      not W_V, W_O.
    - ``MLP_NEURON``: post-activation of chosen MLP neurons (``mlp.hook_post``). Carries the
      neuron's input weights (and gate); not its output weights.
    """

    EMBED = "embed"
    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    HEAD_Z = "head_z"
    HEAD_OUT = "head_out"
    HEAD_Q = "head_q"
    HEAD_K = "head_k"
    HEAD_V = "head_v"
    HEAD_PATTERN = "head_pattern"
    MLP_NEURON = "mlp_neuron"

    @property
    def per_head(self) -> bool:
        return self in _HEAD_COMPONENTS

    @property
    def is_kv(self) -> bool:
        return self in (Component.HEAD_K, Component.HEAD_V)

    @classmethod
    def coerce(cls, value: Component | str) -> Component:
        """Accept a Component or its string value (``"head_out"``); raise SiteError otherwise."""
        if isinstance(value, Component):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            known = ", ".join(c.value for c in cls)
            raise SiteError(f"unknown component {value!r}; choose one of: {known}") from None


_HEAD_COMPONENTS = frozenset(
    {
        Component.HEAD_Z,
        Component.HEAD_OUT,
        Component.HEAD_Q,
        Component.HEAD_K,
        Component.HEAD_V,
        Component.HEAD_PATTERN,
    }
)

_HOOK_SUFFIX: dict[Component, str] = {
    Component.RESID_PRE: "hook_resid_pre",
    # RESID_MID is read at hook_resid_mid but written through the attention output: in TL 4
    # bridges hook_resid_mid is the MLP norm's input hook, and an edit there never reaches the
    # residual stream (resid_post would keep the old residual plus an MLP of the new one).
    Component.RESID_MID: "hook_attn_out",
    Component.RESID_POST: "hook_resid_post",
    Component.ATTN_OUT: "hook_attn_out",
    Component.MLP_OUT: "hook_mlp_out",
    Component.HEAD_Z: "attn.hook_z",
    # HEAD_OUT is written at the attention output; the head's z is read at attn.hook_z.
    Component.HEAD_OUT: "hook_attn_out",
    Component.HEAD_Q: "attn.hook_q",
    Component.HEAD_K: "attn.hook_k",
    Component.HEAD_V: "attn.hook_v",
    Component.HEAD_PATTERN: "attn.hook_pattern",
    Component.MLP_NEURON: "mlp.hook_post",
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes a site is validated against (read from a model's ``cfg``)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int | None
    n_ctx: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1 or self.n_ctx < 1:
            raise SiteError(f"invalid model shape {self}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise SiteError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @classmethod
    def from_cfg(cls, cfg: Any) -> ModelShape:
        n_heads = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
        d_mlp = None if getattr(cfg, "attn_only", False) else getattr(cfg, "d_mlp", None)
        return cls(
            n_layers=int(cfg.n_layers),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_mlp=None if d_mlp is None else int(d_mlp),
            n_ctx=int(cfg.n_ctx),
        )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


_PARSE_RE = re.compile(
    r"^L(?P<layer>\d+)(?:H(?P<head>\d+))?(?:N(?P<neuron>\d+))?(?:P(?P<pos>\d+))?"
    r"(?:\.(?P<comp>[a-z_]+))?$",
    re.IGNORECASE,
)


@dataclass(frozen=True, order=True, repr=False)
class Site:
    """One place in the model: ``component`` at ``layer`` (and ``head``, ``position``, ``neuron``).

    ``position=None`` means every position; ``head`` is required for per-head components and
    forbidden otherwise; ``neuron`` is required for :attr:`Component.MLP_NEURON`. For
    ``HEAD_PATTERN`` the position is the *query* position.

    >>> Site.parse("L1H2")
    Site('head_out', 1, head=2)
    >>> str(Site("resid_pre", 3, position=5))
    'L3P5.resid_pre'
    """

    component: Component | str
    layer: int
    head: int | None = None
    position: int | None = None
    neuron: int | None = None

    def __post_init__(self) -> None:
        comp = Component.coerce(self.component)
        object.__setattr__(self, "component", comp)
        self._check_fields(comp)

    def _check_fields(self, comp: Component) -> None:
        for name in ("layer", "head", "position", "neuron"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                try:
                    value = int(value)  # numpy / torch integer scalars
                except (TypeError, ValueError):
                    raise SiteError(f"Site.{name} must be an int, got {value!r}") from None
                object.__setattr__(self, name, value)
            if value < 0:
                raise SiteError(
                    f"Site.{name} must be >= 0, got {value} (negative indices are ambiguous)"
                )
        if comp.per_head and self.head is None:
            raise SiteError(
                f"component {comp.value!r} needs a head: Site({comp.value!r}, layer, head=H)"
            )
        if not comp.per_head and self.head is not None:
            raise SiteError(f"component {comp.value!r} is not per head; drop head={self.head}")
        if comp is Component.MLP_NEURON and self.neuron is None:
            raise SiteError("component 'mlp_neuron' needs neuron=N (an index into d_mlp)")
        if comp is not Component.MLP_NEURON and self.neuron is not None:
            raise SiteError(f"neuron= only applies to 'mlp_neuron', not {comp.value!r}")
        if comp is Component.EMBED and self.layer != 0:
            raise SiteError("the embedding is not in a block: use Site('embed', 0)")

    @property
    def kind(self) -> Component:
        """``component`` as a :class:`Component` (a string given to the constructor is coerced)."""
        return cast(Component, self.component)

    # --- hook names -------------------------------------------------------------------------

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook the patch writes to."""
        if self.kind is Component.EMBED:
            return "hook_embed"
        return f"blocks.{self.layer}.{_HOOK_SUFFIX[self.kind]}"

    @property
    def read_hook_name(self) -> str:
        """The hook whose value is taken from the source model (differs for ``HEAD_OUT``, read at
        z, and ``RESID_MID``, read at ``hook_resid_mid`` and written through the attention
        output)."""
        if self.kind is Component.HEAD_OUT:
            return f"blocks.{self.layer}.attn.hook_z"
        if self.kind is Component.RESID_MID:
            return f"blocks.{self.layer}.hook_resid_mid"
        return self.hook_name

    def activation_head(self, shape: ModelShape) -> int | None:
        """The head index along the activation's head axis (the kv head for GQA K/V sites)."""
        if self.head is None:
            return None
        if self.kind.is_kv:
            return self.head // shape.group_size
        return self.head

    def index(self, shape: ModelShape) -> tuple[Any, ...]:
        """Index tuple into the activation at :attr:`read_hook_name` (batch axis first).

        Shapes follow TransformerLens: resid/attn_out/mlp_out ``[batch, pos, d_model]``, hook_q/k/v/z
        ``[batch, pos, head, d_head]``, hook_pattern ``[batch, head, query_pos, key_pos]``,
        mlp.hook_post ``[batch, pos, d_mlp]``.
        """
        self.validate(shape)
        pos: Any = slice(None) if self.position is None else self.position
        comp = self.kind
        if comp is Component.HEAD_PATTERN:
            return (slice(None), self.head, pos, slice(None))
        if comp.per_head:
            return (slice(None), pos, self.activation_head(shape), slice(None))
        if comp is Component.MLP_NEURON:
            return (slice(None), pos, self.neuron)
        return (slice(None), pos, slice(None))

    def validate(self, shape: ModelShape, seq_len: int | None = None) -> None:
        """Raise :class:`SiteError` when the site is out of range for ``shape`` (and ``seq_len``)."""
        if self.layer >= shape.n_layers:
            raise SiteError(
                f"{self}: layer {self.layer} out of range (model has {shape.n_layers} layers)"
            )
        if self.head is not None and self.head >= shape.n_heads:
            raise SiteError(
                f"{self}: head {self.head} out of range (model has {shape.n_heads} heads)"
            )
        limit = shape.n_ctx if seq_len is None else seq_len
        if self.position is not None and self.position >= limit:
            what = "prompt length" if seq_len is not None else "n_ctx"
            raise SiteError(f"{self}: position {self.position} out of range ({what} is {limit})")
        if self.kind in (Component.MLP_NEURON, Component.MLP_OUT) and shape.d_mlp is None:
            raise SiteError(f"{self}: the model is attention-only and has no MLP")
        if self.neuron is not None and shape.d_mlp is not None and self.neuron >= shape.d_mlp:
            raise SiteError(f"{self}: neuron {self.neuron} out of range (d_mlp is {shape.d_mlp})")

    # --- shorthand --------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse notebook shorthand.

        ``"L1H2"`` is head 2's output (``head_out``) in layer 1, ``"L1H2P5"`` the same at position 5,
        ``"L1H2.head_z"`` names another per-head component, ``"L3N17"`` neuron 17 of layer 3's MLP,
        ``"L0.resid_pre"`` / ``"L2P4.mlp_out"`` a layer-level component, ``"embed"`` the embedding.
        ``str(site)`` gives this form back.
        """
        text = text.strip()
        if text.lower() in ("embed", "l0.embed"):
            return cls(Component.EMBED, 0)
        m = _PARSE_RE.match(text)
        if m is None:
            raise SiteError(
                f"cannot parse site {text!r}: expected e.g. 'L1H2', 'L1H2P5', 'L1H2.head_z', "
                "'L3N17', 'L0.resid_pre', 'L2P4.mlp_out'"
            )
        head = None if m["head"] is None else int(m["head"])
        neuron = None if m["neuron"] is None else int(m["neuron"])
        pos = None if m["pos"] is None else int(m["pos"])
        if m["comp"] is not None:
            comp = Component.coerce(m["comp"])
        elif head is not None:
            comp = Component.HEAD_OUT
        elif neuron is not None:
            comp = Component.MLP_NEURON
        else:
            raise SiteError(
                f"site {text!r} names no component: add one, e.g. '{text}.resid_pre' or '{text}.mlp_out'"
            )
        return cls(comp, int(m["layer"]), head=head, position=pos, neuron=neuron)

    def __str__(self) -> str:
        if self.kind is Component.EMBED:
            return "embed" if self.position is None else f"L0P{self.position}.embed"
        out = f"L{self.layer}"
        if self.head is not None:
            out += f"H{self.head}"
        if self.neuron is not None:
            out += f"N{self.neuron}"
        if self.position is not None:
            out += f"P{self.position}"
        implicit = (self.kind is Component.HEAD_OUT) or (self.kind is Component.MLP_NEURON)
        return out if implicit else f"{out}.{self.kind.value}"

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={getattr(self, name)}"
            for name in ("head", "position", "neuron")
            if getattr(self, name) is not None
        )
        return f"Site({self.kind.value!r}, {self.layer}{extra})"

    def with_position(self, position: int | None) -> Site:
        return Site(self.component, self.layer, self.head, position, self.neuron)

    def covers(self, other: Site) -> bool:
        """True when the activation ``other`` splices is part of the one ``self`` splices.

        Same component, layer, head and neuron with ``self`` at every position (or the same
        one); and a layer's ``attn_out`` contains each of its heads' ``head_out`` writes (at the
        positions it covers). A covered site adds nothing to a joint patch (see :func:`union`).
        """
        if self.layer != other.layer or self.position not in (None, other.position):
            return False
        if self.kind is other.kind:
            return self.head == other.head and self.neuron == other.neuron
        return self.kind is Component.ATTN_OUT and other.kind is Component.HEAD_OUT


def union(sites: Iterable[Site]) -> tuple[Site, ...]:
    """The sites of a joint patch with duplicates and covered sites dropped (order kept).

    A joint patch splices the *union* of its sites' activations: a site contained in another
    (:meth:`Site.covers`) adds nothing, and the order of the sites never matters.
    """
    unique = list(dict.fromkeys(sites))
    return tuple(s for s in unique if not any(o != s and o.covers(s) for o in unique))
