"""Zoo cards: how a pair was trained, what it does, and what is known about where its shift lives.

A card is plain data (JSON-able): written by the build code from values it measured, stored as
``card.json`` next to the checkpoints, and checked against the loaded models by the tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mechdelta.errors import ZooError

__all__ = ["Behaviour", "Stage", "ZooCard"]

CARD_VERSION = 1


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ZooError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _finite(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ZooError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ZooError(f"{what} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class Stage:
    """One training stage: what was trained, on what, with which settings, and its loss curve."""

    name: str
    spec: Mapping[str, Any]
    trainable: str
    data: str
    loss: Mapping[str, Any]
    seconds: float
    threads: int

    def __post_init__(self) -> None:
        _text(self.name, "Stage.name")
        _text(self.trainable, "Stage.trainable")
        if "steps" not in self.spec or "seed" not in self.spec:
            raise ZooError(f"Stage.spec needs steps and seed, got {dict(self.spec)}")
        object.__setattr__(self, "spec", dict(self.spec))
        object.__setattr__(self, "loss", dict(self.loss))

    @property
    def steps(self) -> int:
        return int(self.spec["steps"])


@dataclass(frozen=True)
class Behaviour:
    """A metric measured on both models: means over the task's prompts, the shift and its CI."""

    name: str
    metric: str
    description: str
    n_prompts: int
    reference: float
    intervened: float
    ci: tuple[float, float]

    def __post_init__(self) -> None:
        _text(self.name, "Behaviour.name")
        _text(self.metric, "Behaviour.metric")
        if self.n_prompts < 1:
            raise ZooError(f"Behaviour.n_prompts must be >= 1, got {self.n_prompts}")
        object.__setattr__(self, "reference", _finite(self.reference, "Behaviour.reference"))
        object.__setattr__(self, "intervened", _finite(self.intervened, "Behaviour.intervened"))
        lo, hi = (_finite(v, "Behaviour.ci") for v in self.ci)
        object.__setattr__(self, "ci", (lo, hi))

    @property
    def shift(self) -> float:
        """``intervened - reference``."""
        return self.intervened - self.reference

    @property
    def significant(self) -> bool:
        lo, hi = self.ci
        return lo > 0 or hi < 0

    def line(self) -> str:
        lo, hi = self.ci
        flag = "" if self.significant else " (not distinguishable from 0)"
        return (
            f"{self.name}: {self.metric} on {self.n_prompts} prompts: reference "
            f"{self.reference:.4g}, intervened {self.intervened:.4g}, shift {self.shift:+.4g} "
            f"[95% CI {lo:+.4g}, {hi:+.4g}]{flag}"
        )


@dataclass(frozen=True)
class ZooCard:
    """Everything known about a zoo pair.

    Attributes:
        name, description: the entry and a one-paragraph account of it.
        model: the model config (``TransformerBridgeConfig`` fields).
        seed: the build seed.
        stages: the training stages, in order, each with its settings and loss-curve summary.
        data_recipe: how training and evaluation data were drawn.
        behaviours: metrics measured on both models; the first is the entry's task.
        ground_truth: the sites carrying the shift (``str(Site)`` form), or ``None`` if unknown.
        ground_truth_reason: how the ground truth was determined, or why there is none.
        known, unknown: plain statements of what is and is not established about the pair.
        measurements: further measured values (attention scores, weight changes, ...).
        hashes: content hashes of the reference and intervened weights.
        environment: software versions and platform at build time.
    """

    name: str
    description: str
    model: Mapping[str, Any]
    seed: int
    stages: tuple[Stage, ...]
    data_recipe: str
    behaviours: tuple[Behaviour, ...]
    ground_truth: tuple[str, ...] | None
    ground_truth_reason: str
    known: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    measurements: Mapping[str, Any] = field(default_factory=dict)
    hashes: Mapping[str, str] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = CARD_VERSION

    def __post_init__(self) -> None:
        _text(self.name, "ZooCard.name")
        _text(self.description, "ZooCard.description")
        _text(self.data_recipe, "ZooCard.data_recipe")
        _text(self.ground_truth_reason, "ZooCard.ground_truth_reason")
        if self.format_version != CARD_VERSION:
            raise ZooError(
                f"card format version {self.format_version}; this mechdelta reads {CARD_VERSION}"
            )
        if not self.behaviours:
            raise ZooError("ZooCard needs at least one behaviour (the entry's task)")
        names = [b.name for b in self.behaviours]
        if len(set(names)) != len(names):
            raise ZooError(f"behaviour names repeat: {names}")
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "behaviours", tuple(self.behaviours))
        if self.ground_truth is not None:
            object.__setattr__(self, "ground_truth", tuple(self.ground_truth))
        object.__setattr__(self, "known", tuple(self.known))
        object.__setattr__(self, "unknown", tuple(self.unknown))
        for attr in ("model", "measurements", "hashes", "environment"):
            object.__setattr__(self, attr, dict(getattr(self, attr)))

    # --- accessors --------------------------------------------------------------------------

    @property
    def steps(self) -> dict[str, int]:
        """Training steps per stage."""
        return {s.name: s.steps for s in self.stages}

    @property
    def behaviour(self) -> Behaviour:
        """The entry task's behaviour (the first one)."""
        return self.behaviours[0]

    def get_behaviour(self, name: str) -> Behaviour:
        for b in self.behaviours:
            if b.name == name:
                return b
        raise ZooError(f"card {self.name!r} has no behaviour {name!r}; it has {self.names()}")

    def names(self) -> list[str]:
        return [b.name for b in self.behaviours]

    # --- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ground_truth"] = None if self.ground_truth is None else list(self.ground_truth)
        return json.loads(json.dumps(out))  # tuples -> lists, a plain JSON tree

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZooCard:
        try:
            d = dict(data)
            stages = tuple(Stage(**s) for s in d.pop("stages"))
            behaviours = tuple(
                Behaviour(**{**b, "ci": tuple(b["ci"])}) for b in d.pop("behaviours")
            )
            gt = d.pop("ground_truth")
            for key in ("known", "unknown"):
                d[key] = tuple(d.get(key, ()))
            return cls(
                stages=stages,
                behaviours=behaviours,
                ground_truth=None if gt is None else tuple(gt),
                **d,
            )
        except (KeyError, TypeError) as exc:
            raise ZooError(f"malformed zoo card: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    # --- display ----------------------------------------------------------------------------

    def to_markdown(self) -> str:
        m = self.model
        arch = (
            f"{m.get('n_layers')} layers, d_model {m.get('d_model')}, {m.get('n_heads')} heads x "
            f"d_head {m.get('d_head')}, "
            + ("attention-only" if m.get("attn_only") else f"d_mlp {m.get('d_mlp')}")
            + f", vocab {m.get('d_vocab')}, n_ctx {m.get('n_ctx')}"
        )
        lines = [f"# zoo: {self.name}", "", self.description, "", f"- model: {arch}"]
        lines.append(f"- seed: {self.seed}")
        lines.append(f"- data: {self.data_recipe}")
        lines += ["", "## Training"]
        for s in self.stages:
            sp = s.spec
            loss = s.loss
            lines.append(
                f"- {s.name}: {s.steps} steps, {sp.get('optimizer')} lr {sp.get('lr')}, batch "
                f"{sp.get('batch_size')}, seed {sp.get('seed')}; trains {s.trainable}; "
                f"loss {loss.get('first', float('nan')):.3f} -> {loss.get('last', float('nan')):.3f}"
                f" ({s.seconds:.0f} s on {s.threads} thread(s))"
            )
        lines += ["", "## Behaviour"]
        lines += [f"- {b.line()}" for b in self.behaviours]
        lines += ["", "## Ground truth"]
        if self.ground_truth is None:
            lines.append("- none given")
        else:
            lines.append("- " + (", ".join(self.ground_truth) or "(empty: nothing shifts)"))
        lines.append(f"- {self.ground_truth_reason}")
        if self.known:
            lines += ["", "## Known", *[f"- {k}" for k in self.known]]
        if self.unknown:
            lines += ["", "## Not known", *[f"- {u}" for u in self.unknown]]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()
