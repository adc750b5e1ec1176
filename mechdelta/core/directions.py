"""Patch directions, named by source and target model."""

from __future__ import annotations

from enum import StrEnum

from mechdelta.errors import ConfigError

__all__ = ["Direction"]


class Direction(StrEnum):
    """Which model's activations are spliced into which model's run.

    - ``REFERENCE_TO_INTERVENED`` (``"reference->intervened"``): reference activations spliced
      into the intervened run. Does restoring this component undo the shift? Score
      ``(m_I - m_patched) / (m_I - m_R)``.
    - ``INTERVENED_TO_REFERENCE`` (``"intervened->reference"``): intervened activations spliced into
      the reference run. Does this component alone carry the shift? Score
      ``(m_patched - m_R) / (m_I - m_R)``.
    - ``BOTH``: run both and return both results.
    """

    REFERENCE_TO_INTERVENED = "reference->intervened"
    INTERVENED_TO_REFERENCE = "intervened->reference"
    BOTH = "both"

    @classmethod
    def coerce(cls, value: Direction | str) -> Direction:
        if isinstance(value, Direction):
            return value
        text = str(value).strip().lower().replace(" ", "").replace("→", "->")
        text = {"r->i": "reference->intervened", "i->r": "intervened->reference"}.get(text, text)
        try:
            return cls(text)
        except ValueError:
            known = ", ".join(repr(d.value) for d in cls)
            raise ConfigError(f"unknown direction {value!r}; use one of {known}") from None

    @property
    def source(self) -> str:
        self._single()
        return self.value.split("->")[0]

    @property
    def target(self) -> str:
        self._single()
        return self.value.split("->")[1]

    @property
    def toward_reference(self) -> bool:
        """True when the patch moves the intervened model back toward the reference."""
        return self is Direction.REFERENCE_TO_INTERVENED

    @property
    def singles(self) -> tuple[Direction, ...]:
        if self is Direction.BOTH:
            return (Direction.REFERENCE_TO_INTERVENED, Direction.INTERVENED_TO_REFERENCE)
        return (self,)

    def _single(self) -> None:
        if self is Direction.BOTH:
            raise ConfigError("'both' has no single source/target; iterate over .singles")
