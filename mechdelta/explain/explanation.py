"""The result of :func:`~mechdelta.explain.explain`: :class:`Explanation`, one field per stage."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechdelta.errors import ResultFormatError
from mechdelta.explain.intervention import Intervention

if TYPE_CHECKING:
    import pandas as pd

    from mechdelta.patching.shift import ShiftResult

__all__ = ["Explanation"]


@dataclass(frozen=True, eq=False)
class Explanation:
    """Every stage of one explanation (see :mod:`mechdelta.explain.pipeline`).

    Attributes:
        status: ``"explained"`` (all stages ran) or ``"no_shift"`` (the shift's interval
            contains 0: nothing to explain; only ``shift`` is set).
        intervention: what the user declared (:class:`~mechdelta.explain.Intervention`).
        shift: the task metric on both models and the shift with its interval.
        weights: :class:`~mechdelta.WeightDiff` (which parameters changed).
        representations: :class:`~mechdelta.RepresentationDiff` (the representation screen).
        patching: component (``"head_out"``, ``"mlp_out"``) -> both directions' sweep (or
            verified attribution) of that component.
        claims: component -> :class:`~mechdelta.Claims` of that component's patching.
        steering: :class:`~mechdelta.SteeringResult` at the located layers (None without them).
        circuit: the node-level graft :class:`~mechdelta.Circuit` (None when not run).
        located: ``components`` (names, strongest first), ``layers`` (steered), ``basis``.
        plan: the patching stage's components, layers, method and why.
        params, timings, provenance: what was asked, seconds per stage, models/task/versions.
        out: the directory it was stored in (None in memory); reports: format -> path.
    """

    status: str
    intervention: Intervention
    shift: ShiftResult
    params: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    weights: Any = None
    representations: Any = None
    patching: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    steering: Any = None
    circuit: Any = None
    located: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, Path] = field(default_factory=dict)

    @property
    def explained(self) -> bool:
        return self.status == "explained"

    def with_reports(self, reports: dict[str, Path]) -> Explanation:
        return dataclasses.replace(self, reports=dict(reports))

    def all_claims(self) -> list[Any]:
        """Every warranted claim of every component, strongest |effect| first."""
        items = [c for cl in self.claims.values() for c in cl]
        return sorted(items, key=lambda c: -abs(c.effect))

    def to_dataframe(self) -> pd.DataFrame:
        """The warranted claims, one row each (component, site, direction, effect, CI, p, q)."""
        import pandas as pd

        frames = []
        for comp, cl in self.claims.items():
            df = cl.to_dataframe()
            df.insert(0, "component", comp)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def __str__(self) -> str:
        lines = [f"Explanation ({self.status}): {self.shift}"]
        if not self.explained:
            lines.append("The shift is not distinguishable from 0: nothing to explain.")
            return "\n".join(lines)
        claims = self.all_claims()
        lines.append(f"{len(claims)} warranted claim(s) at alpha = {self.params['alpha']}:")
        lines += [f"  - {c.text}" for c in claims[:8]]
        if self.steering is not None:
            from mechdelta.explain.audit import steering_lines

            lines += steering_lines(self.steering)
        if self.circuit is not None:
            lines.append(f"Circuit: {_first_line(self.circuit)}")
        for fmt, path in self.reports.items():
            lines.append(f"Report ({fmt}): {os.fspath(path)}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Explanation:
        """Read a finished explanation from its ``out`` directory (no model is loaded)."""
        from mechdelta.explain import pipeline as p
        from mechdelta.patching.shift import ShiftResult

        root = Path(path)
        meta_path = root / "explain.json"
        if not meta_path.is_file():
            raise ResultFormatError(
                f"{os.fspath(root)!r} holds no explain.json: not an explanation"
            )
        meta = json.loads(meta_path.read_text("utf-8"))
        stages = root / "stages"

        def done(name: str) -> bool:
            return (stages / f"{name}.done").is_file()

        if not done("shift"):
            raise ResultFormatError(f"{os.fspath(root)!r}: the explanation has no finished shift")
        params = meta["params"]
        common: dict[str, Any] = {
            "intervention": Intervention.coerce(meta.get("intervention")),
            "shift": ShiftResult.load(stages / "shift"),
            "params": params,
            "provenance": {k: v for k, v in meta.items() if k != "format"},
            "out": root,
            "reports": {
                fmt: root / f"report.{fmt}"
                for fmt in ("md", "html", "pdf", "json")
                if (root / f"report.{fmt}").is_file()
            },
        }
        if not common["shift"].significant:
            return cls(status="no_shift", **common)
        from mechdelta.core.weights import WeightDiff

        patching = {
            d.name.removeprefix("patching_"): p._load_both(d)
            for d in sorted(stages.glob("patching_*"))
            if d.is_dir() and done(d.name)
        }
        located_plan = json.loads((root / "located.json").read_text("utf-8"))
        return cls(
            status="explained",
            weights=WeightDiff.load(stages / "weights"),
            representations=p._load_reps(stages / "representations"),
            patching=patching,
            claims={comp: p._claims(r, params) for comp, r in patching.items()},
            steering=p._load_steering(stages / "steering") if done("steering") else None,
            circuit=p._load_circuit(stages / "circuit") if done("circuit") else None,
            located=located_plan["located"],
            plan=located_plan["plan"],
            **common,
        )


def _first_line(x: Any) -> str:
    return str(x).splitlines()[0] if str(x) else type(x).__name__
