"""Analysis specifications: one ``[[analyses]]`` entry of an experiment, validated, with a stable id.

Kinds: ``shift``, ``weight_diff``, ``factorial`` (no parameters), ``sweep`` and ``patch``. A new
kind adds its keys to ``KIND_KEYS`` here, an executor in :data:`mechdelta.runs.run.EXECUTORS` and a
report section (:func:`mechdelta.report._build.register_section`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Component, Site
from mechdelta.errors import ConfigError, MechDeltaError
from mechdelta.runs._config import (
    check_bool,
    check_int,
    check_ints,
    check_keys,
    check_str,
    jsonable,
    short_hash,
)

__all__ = ["ANALYSIS_KINDS", "KIND_KEYS", "AnalysisSpec"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,79}$")

# Keys an analysis of each kind accepts besides ``kind`` and ``name``.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "shift": (),
    "weight_diff": (),
    "factorial": (),
    "sweep": (
        "component",
        "direction",
        "per_position",
        "layers",
        "heads",
        "positions",
        "neurons",
        "batch_budget",
    ),
    "patch": ("sites", "direction", "batch_budget"),
}
ANALYSIS_KINDS = tuple(KIND_KEYS)
_DIRECTION_SHORT = {
    Direction.REFERENCE_TO_INTERVENED: "r2i",
    Direction.INTERVENED_TO_REFERENCE: "i2r",
    Direction.BOTH: "both",
}


@dataclass(frozen=True)
class AnalysisSpec:
    """One ``[[analyses]]`` entry. Which keys apply depends on ``kind``:

    - ``shift``, ``weight_diff``, ``factorial``: none.
    - ``sweep``: ``component`` (required), ``direction``, ``per_position``, ``layers``,
      ``heads``, ``positions``, ``neurons``, ``batch_budget``.
    - ``patch``: ``sites`` (required, shorthand strings such as ``"L1H2"``), ``direction``,
      ``batch_budget``.

    ``name`` sets the analysis id; by default it is derived from the kind and the parameters
    (``batch_budget`` excluded, it does not change results), so ids are stable across runs.
    """

    kind: str
    name: str | None = None
    component: str | None = None
    direction: str = Direction.REFERENCE_TO_INTERVENED.value
    per_position: bool = False
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    sites: tuple[str, ...] | None = None
    batch_budget: int | None = None
    index: int = field(default=0, compare=False, repr=False)

    def grid(self) -> dict[str, Any]:
        """The sweep grid's keyword arguments (for :func:`~mechdelta.sweep` and its pre-flight)."""
        return {
            "per_position": self.per_position,
            "layers": self.layers,
            "heads": self.heads,
            "positions": self.positions,
            "neurons": self.neurons,
        }

    def __post_init__(self) -> None:
        where = self.where
        if self.kind not in KIND_KEYS:
            raise ConfigError(
                f"{where}: unknown kind {self.kind!r}; choose one of {', '.join(ANALYSIS_KINDS)}"
            )
        allowed = set(KIND_KEYS[self.kind])
        defaults = {f.name: f.default for f in fields(self)}
        for key in _ALL_PARAM_KEYS - allowed:
            if getattr(self, key) != defaults[key]:
                raise ConfigError(
                    f"{where}: {key!r} does not apply to kind {self.kind!r}; allowed keys: "
                    f"{', '.join(('kind', 'name', *KIND_KEYS[self.kind]))}"
                )
        if self.name is not None and not _ID_RE.match(self.name):
            raise ConfigError(
                f"{where}: name {self.name!r} must be 1-80 characters of letters, digits and "
                "'_.+-', starting with a letter or digit (it names a directory)"
            )
        try:
            direction = Direction.coerce(self.direction)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        object.__setattr__(self, "direction", direction.value)
        if self.kind == "sweep":
            if self.component is None:
                raise ConfigError(f"{where}: a sweep needs component = '...' (e.g. 'head_out')")
            try:
                object.__setattr__(self, "component", Component.coerce(self.component).value)
            except MechDeltaError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if self.kind == "patch":
            if not self.sites:
                raise ConfigError(f"{where}: a patch needs sites = ['L1H2', ...]")
            try:
                parsed = tuple(str(Site.parse(s)) for s in self.sites)
            except MechDeltaError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if len(set(parsed)) != len(parsed):
                raise ConfigError(f"{where}: sites has duplicates: {list(self.sites)}")
            object.__setattr__(self, "sites", parsed)
        if self.batch_budget is not None:
            check_int(self.batch_budget, f"{where} batch_budget", minimum=1)

    @property
    def where(self) -> str:
        return f"[[analyses]] #{self.index + 1} ({self.kind})"

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], index: int = 0) -> AnalysisSpec:
        if "kind" not in table:
            raise ConfigError(
                f"[[analyses]] #{index + 1}: needs kind = one of {', '.join(ANALYSIS_KINDS)}"
            )
        kind = table["kind"]
        if kind not in KIND_KEYS:
            raise ConfigError(
                f"[[analyses]] #{index + 1}: unknown kind {kind!r}; choose one of "
                f"{', '.join(ANALYSIS_KINDS)}"
            )
        where = f"[[analyses]] #{index + 1} ({kind})"
        check_keys(table, ("kind", "name", *KIND_KEYS[kind]), where)
        kw: dict[str, Any] = {"kind": kind, "index": index}
        for key, value in table.items():
            if key in ("kind",):
                continue
            if key in ("name", "component", "direction"):
                kw[key] = check_str(value, f"{where} {key}")
            elif key == "per_position":
                kw[key] = check_bool(value, f"{where} {key}")
            elif key in ("layers", "heads", "positions", "neurons"):
                kw[key] = check_ints(value, f"{where} {key}")
            elif key == "batch_budget":
                kw[key] = check_int(value, f"{where} {key}", minimum=1)
            elif key == "sites":
                if isinstance(value, str) or not isinstance(value, Sequence):
                    raise ConfigError(
                        f"{where} sites must be a list such as ['L1H2'], got {value!r}"
                    )
                kw[key] = tuple(check_str(s, f"{where} sites[]") for s in value)
        return cls(**kw)

    def params(self) -> dict[str, Any]:
        """The kind's parameters that were set (``positions`` implies ``per_position``)."""
        out: dict[str, Any] = {}
        for key in KIND_KEYS[self.kind]:
            out[key] = jsonable(getattr(self, key))
        if self.kind == "sweep" and self.positions is not None:
            out["per_position"] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, **self.params(), "id": self.id}

    @property
    def id(self) -> str:
        """The analysis id: ``name`` if given, else derived from the kind and parameters."""
        if self.name is not None:
            return self.name
        if self.kind in ("shift", "weight_diff", "factorial"):
            return self.kind
        short = _DIRECTION_SHORT[Direction(self.direction)]
        if self.kind == "sweep":
            stem = f"sweep-{self.component}-{short}"
            if self.per_position or self.positions is not None:
                stem += "-pos"
            restrict = {
                k: list(v)
                for k in ("layers", "heads", "positions", "neurons")
                if (v := getattr(self, k)) is not None
            }
            return f"{stem}-{short_hash(restrict)}" if restrict else stem
        assert self.sites is not None  # validated in __post_init__
        joined = "+".join(self.sites)
        if len(joined) <= 48 and _ID_RE.match(f"patch-{joined}"):
            return f"patch-{joined}-{short}"
        return f"patch-{len(self.sites)}sites-{short}-{short_hash(list(self.sites))}"


_ALL_PARAM_KEYS = frozenset(k for keys in KIND_KEYS.values() for k in keys)
