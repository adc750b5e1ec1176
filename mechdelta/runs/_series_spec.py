"""The ``[series]`` table of an experiment: a checkpoint series that ``kind = "series"`` analyses
run over (re-exported by :mod:`mechdelta.runs.experiment`).

.. code-block:: toml

    [series]                     # exactly one source
    zoo = "induction"            # the zoo's induction training series (shipped with the
                                 # package; zoo_path = DIR: one written by build_series or
                                 # `mechdelta zoo build induction --series`)
    steps = [0, 400, 800, 1500]  # zoo only: these of its steps (default: all it has)
                                 # or: checkpoints = ["ckpt/step-0", "ckpt/step-1000", ...],
                                 #     labels = [0, 1000, ...] (default 0, 1, ...),
                                 #     processing = "raw", dtype = "float32", device = "cpu"
    reference = 0                # index of the reference checkpoint (negative: from the end)

The pairs the analyses run on (``compare = "reference"``: every checkpoint against the
reference; ``"consecutive"``: every checkpoint against the previous one) are chosen per analysis.
Without a ``[pair]`` table, the experiment's pair (for its other analyses and its provenance) is
the series' reference checkpoint against its last checkpoint (its first, when the reference is
the last).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mechdelta.errors import ConfigError
from mechdelta.runs._config import check_bool, check_int, check_keys, check_str, jsonable

__all__ = ["SERIES_ZOO", "SeriesSpec"]

#: Zoo entries that ship a checkpoint series.
SERIES_ZOO = ("induction",)
_WHERE = "[series]"


def _labels(value: Any) -> tuple[int | float | str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"{_WHERE} labels must be a list (one label per checkpoint), got {value!r}"
        )
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float, str)):
            raise ConfigError(
                f"{_WHERE} labels[{i}] must be an integer, a number or a string (e.g. a training "
                f"step), got {x!r}"
            )
    out = tuple(value)
    if len(set(out)) != len(out):
        raise ConfigError(f"{_WHERE} labels must be distinct, got {list(out)}")
    return out


@dataclass(frozen=True)
class SeriesSpec:
    """Where the checkpoints of a series come from: a zoo series, or checkpoint directories."""

    zoo: str | None = None
    zoo_path: str | None = None
    steps: tuple[int, ...] | None = None
    checkpoints: tuple[str, ...] | None = None
    labels: tuple[int | float | str, ...] | None = None
    reference: int = 0
    processing: str | None = None
    dtype: str | None = None
    device: str | None = None
    allow_identical: bool = False

    KEYS = (
        "zoo",
        "zoo_path",
        "steps",
        "checkpoints",
        "labels",
        "reference",
        "processing",
        "dtype",
        "device",
        "allow_identical",
    )

    def __post_init__(self) -> None:
        if (self.zoo is None) == (self.checkpoints is None):
            raise ConfigError(
                f"{_WHERE} needs exactly one source: zoo = 'induction' (a zoo series) or "
                "checkpoints = ['dir/step-0', ...] (two or more checkpoint directories or hub names)"
            )
        if self.zoo is not None:
            if self.zoo not in SERIES_ZOO:
                raise ConfigError(
                    f"{_WHERE} zoo = {self.zoo!r} has no checkpoint series; zoo series: "
                    f"{', '.join(SERIES_ZOO)}"
                )
            extra = [
                k
                for k in ("labels", "processing", "dtype", "device")
                if getattr(self, k) is not None
            ]
            if extra:
                raise ConfigError(
                    f"{_WHERE} {extra[0]} applies to checkpoints = [...], not to a zoo series "
                    "(labelled by its training steps; choose them with steps = [...])"
                )
        else:
            for key in ("zoo_path", "steps"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"{_WHERE} {key} applies to a zoo series (zoo = 'induction'), not to "
                        "checkpoints = [...]"
                    )
            assert self.checkpoints is not None
            if len(self.checkpoints) < 2:
                raise ConfigError(
                    f"{_WHERE} checkpoints lists {len(self.checkpoints)}; a series needs at least 2"
                )
            if self.labels is not None and len(self.labels) != len(self.checkpoints):
                raise ConfigError(
                    f"{_WHERE} has {len(self.labels)} labels for {len(self.checkpoints)} "
                    "checkpoints: give one label per checkpoint (or none: 0, 1, ...)"
                )
        if self.steps is not None and (
            len(self.steps) < 2 or list(self.steps) != sorted(set(self.steps))
        ):
            raise ConfigError(
                f"{_WHERE} steps must list at least 2 steps in increasing order, got "
                f"{list(self.steps)}"
            )
        check_int(self.reference, f"{_WHERE} reference")
        n = self.size
        if n is not None and not -n <= self.reference < n:
            raise ConfigError(
                f"{_WHERE} reference = {self.reference} is not a checkpoint index: the series has "
                f"{n} checkpoints, so use 0..{n - 1} (or -1 for the last)"
            )
        if self.processing is not None and self.processing not in ("raw", "compat"):
            raise ConfigError(
                f"{_WHERE} processing must be 'raw' or 'compat', got {self.processing!r}"
            )
        check_bool(self.allow_identical, f"{_WHERE} allow_identical")

    @property
    def size(self) -> int | None:
        """The number of checkpoints (None: all of a zoo series, known once it is read)."""
        if self.checkpoints is not None:
            return len(self.checkpoints)
        return None if self.steps is None else len(self.steps)

    @property
    def label(self) -> str:
        """A short description: ``zoo:induction steps [0, 400, 1500]`` or ``3 checkpoints``."""
        if self.zoo is not None:
            text = f"zoo:{self.zoo}" + (f" ({self.zoo_path})" if self.zoo_path else "")
            return text + (f" steps {list(self.steps)}" if self.steps is not None else "")
        return f"{self.size} checkpoints"

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> SeriesSpec:
        check_keys(table, cls.KEYS, _WHERE)
        kw: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{_WHERE} {key}"
            if key == "steps":
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise ConfigError(f"{where} must be a list of training steps, got {value!r}")
                kw[key] = tuple(
                    check_int(v, f"{where}[{i}]", minimum=0) for i, v in enumerate(value)
                )
            elif key == "checkpoints":
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise ConfigError(
                        f"{where} must be a list of checkpoint directories or hub names, got "
                        f"{value!r}"
                    )
                kw[key] = tuple(check_str(v, f"{where}[{i}]") for i, v in enumerate(value))
            elif key == "labels":
                kw[key] = _labels(value)
            elif key == "reference":
                kw[key] = check_int(value, where)
            elif key == "allow_identical":
                kw[key] = check_bool(value, where)
            else:
                kw[key] = check_str(value, where)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {k: jsonable(getattr(self, k)) for k in self.KEYS}

    @classmethod
    def from_resolved(cls, data: Mapping[str, Any]) -> SeriesSpec:
        """From :meth:`to_dict` output (unset keys are None or False there)."""
        return cls.from_dict(
            {
                k: v
                for k, v in data.items()
                if v is not None and not (k == "allow_identical" and not v)
            }
        )

    def load(self) -> Any:
        """The :class:`~mechdelta.circuits.CheckpointSeries` this table names."""
        if self.zoo is not None:
            from mechdelta.zoo.series import load_series

            return load_series(self.zoo_path, steps=self.steps, reference=self.reference)
        from mechdelta.circuits.series import CheckpointSeries

        assert self.checkpoints is not None  # validated in __post_init__
        return CheckpointSeries(
            list(self.checkpoints),
            self.reference,
            labels=self.labels,
            device=self.device,
            dtype=self.dtype,
            processing=self.processing or "raw",
            allow_identical=self.allow_identical,
        )

    def default_task(self) -> Any:
        """The task a zoo series brings (its zoo entry's), None for checkpoints."""
        if self.zoo == "induction":
            from mechdelta.zoo import induction

            return induction.task()
        return None
