"""The ``[run]`` and ``[output]`` tables of an experiment: seeds and bootstrap settings, figure
formats and table sizes (re-exported by :mod:`mechdelta.runs.experiment`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mechdelta.errors import ConfigError
from mechdelta.runs._config import check_bool, check_int, check_keys, check_str

__all__ = ["FIGURE_FORMATS", "STATIC_FORMATS", "OutputSpec", "RunSpec"]

FIGURE_FORMATS = ("html", "png", "svg", "pdf", "jpeg", "webp")
STATIC_FORMATS = frozenset({"png", "svg", "pdf", "jpeg", "webp"})


@dataclass(frozen=True)
class RunSpec:
    """Seeds and bootstrap settings shared by every analysis of the experiment."""

    seed: int = 0
    n_boot: int = 2000
    alpha: float = 0.05

    KEYS = ("seed", "n_boot", "alpha")

    def __post_init__(self) -> None:
        check_int(self.seed, "[run] seed", minimum=0)
        check_int(self.n_boot, "[run] n_boot", minimum=100)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"[run] alpha must be a number, got {self.alpha!r}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ConfigError(f"[run] alpha must lie in (0, 1), e.g. 0.05, got {self.alpha}")

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> RunSpec:
        check_keys(table, cls.KEYS, "[run]")
        kw = dict(table)
        if "alpha" in kw and isinstance(kw["alpha"], int) and not isinstance(kw["alpha"], bool):
            kw["alpha"] = float(kw["alpha"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_boot": self.n_boot, "alpha": float(self.alpha)}


@dataclass(frozen=True)
class OutputSpec:
    """Figure formats (``<id>.json`` is always written), static-export policy, table sizes."""

    figures: tuple[str, ...] = ("html", "png")
    require_static: bool = True
    top_k: int = 10

    KEYS = ("figures", "require_static", "top_k")

    def __post_init__(self) -> None:
        bad = [f for f in self.figures if f not in FIGURE_FORMATS]
        if bad:
            raise ConfigError(
                f"[output] figures: unknown format {bad[0]!r}; choose from {FIGURE_FORMATS}"
            )
        if len(set(self.figures)) != len(self.figures):
            raise ConfigError(f"[output] figures has duplicates: {list(self.figures)}")
        check_bool(self.require_static, "[output] require_static")
        check_int(self.top_k, "[output] top_k", minimum=1)

    @property
    def static(self) -> tuple[str, ...]:
        return tuple(f for f in self.figures if f in STATIC_FORMATS)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> OutputSpec:
        check_keys(table, cls.KEYS, "[output]")
        kw = dict(table)
        if "figures" in kw:
            value = kw["figures"]
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ConfigError(
                    f"[output] figures must be a list such as ['html'], got {value!r}"
                )
            kw["figures"] = tuple(check_str(v, "[output] figures[]").lower() for v in value)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "figures": list(self.figures),
            "require_static": self.require_static,
            "top_k": self.top_k,
        }
