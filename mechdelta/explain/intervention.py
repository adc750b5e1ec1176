"""What the user declares about an intervention: :class:`Intervention`.

mechdelta cannot know how the intervened checkpoint was made; an audit report must say it. The
declaration is copied verbatim into the transition report (section "Intervention") and its
``report.json`` (``intervention``), marked as *declared by the user*, never inferred.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mechdelta.errors import ConfigError

__all__ = ["Intervention"]

_KEYS = ("kind", "description", "data", "date", "owner")


@dataclass(frozen=True)
class Intervention:
    """A declared intervention (every field optional free text).

    Attributes:
        kind: what was done: ``"fine-tune"``, ``"RLHF"``, ``"LoRA"``, ``"model edit"``, ...
        description: one or two sentences.
        data: the data it used (name, version, size).
        date: when (ISO date recommended).
        owner: who is responsible for it.
        extra: further key -> value pairs, shown in the report as given.
    """

    kind: str = ""
    description: str = ""
    data: str = ""
    date: str = ""
    owner: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _KEYS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(
                    f"Intervention.{name} must be text, got {type(value).__name__}: {value!r}"
                )
        if not isinstance(self.extra, Mapping):
            raise ConfigError("Intervention.extra must be a mapping of text to text")
        for k, v in self.extra.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(f"Intervention.extra must map text to text, got {k!r}: {v!r}")
        object.__setattr__(self, "extra", dict(self.extra))

    @classmethod
    def coerce(cls, value: Intervention | Mapping[str, Any] | None) -> Intervention:
        """An Intervention from itself, a mapping (unknown keys go to ``extra``) or None."""
        if value is None:
            return cls()
        if isinstance(value, Intervention):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                "intervention must be an Intervention or a mapping like {'kind': 'fine-tune', "
                f"'data': ..., 'date': ..., 'owner': ...}}, got {type(value).__name__}"
            )
        known = {k: value[k] for k in _KEYS if k in value}
        extra = {str(k): str(v) for k, v in value.items() if k not in _KEYS and k != "extra"}
        extra.update({str(k): str(v) for k, v in dict(value.get("extra", {})).items()})
        return cls(**known, extra=extra)

    @property
    def declared(self) -> bool:
        return any(getattr(self, k) for k in _KEYS) or bool(self.extra)

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs of what was declared, in a fixed order."""
        out = [(k, getattr(self, k)) for k in _KEYS if getattr(self, k)]
        return out + sorted(self.extra.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: dict(self.extra) if f.name == "extra" else getattr(self, f.name)
            for f in fields(self)
        }
