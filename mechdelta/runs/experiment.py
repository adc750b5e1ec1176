"""Experiments: a TOML file naming the pair, the task, the analyses, the seeds and the outputs.

An experiment is plain, frozen, validated data; :func:`mechdelta.runs.run.run_experiment` executes it
into a run directory. Every unknown key is an error naming the key and the keys allowed there.

.. code-block:: toml

    name = "induction"
    description = "Where did fine-tuning change in-context copying?"

    [pair]                       # exactly one source
    zoo = "induction"            # (zoo_path = DIR: an entry built by `mechdelta zoo build`)
                                 # or: builtin = "tiny"
                                 # or: reference = "path/or/hub-id", intervened = "...",
                                 #     processing = "raw", dtype = "float32", device = "cpu"
                                 # or: series = true (the [series]' reference checkpoint vs
                                 #     its last; the default when [series] is given alone)

    [series]                     # optional: a checkpoint series for kind = "series" analyses
    zoo = "induction"            # (see mechdelta.runs._series_spec: or checkpoints = [...])
    steps = [0, 400, 800, 1500]
    reference = 0

    [control]                    # optional: a control pair, specified as [pair] is (e.g. the
    zoo = "null"                 # zoo's null pair, or the intervention re-run with another
                                 # seed); every sweep is run on it too, on the same task, and
                                 # the report's claims say whether an effect exceeds seed
                                 # variation (mechdelta.claims(..., control=...))

    [task]                       # optional for zoo/builtin pairs (they bring their own task)
    prompts = ["When Mary and John went to the store, John gave a drink to"]
    answers = [" Mary"]
    wrong = [" John"]
    metric = "logit_diff"

    [run]
    seed = 0
    n_boot = 2000
    alpha = 0.05

    [executor]                   # optional, not part of the run's identity (any executor
    kind = "ray"                 # resumes any run): "local" (default) or "ray" (address,
    address = "auto"             # num_workers, gpus_per_worker, cpus_per_worker); shards = true
                                 # (default) keeps finished shards in RUN/shards for resuming
                                 # (mechdelta.runs._executor_spec; CLI: --executor, --address)

    [output]
    figures = ["html", "png"]    # plus <id>.json, always
    require_static = true        # false: skip PNG/SVG/PDF (with a note) when no browser is found
    top_k = 10

    [[analyses]]
    kind = "shift"

    [[analyses]]
    kind = "sweep"
    component = "head_out"
    direction = "both"

    [[analyses]]
    kind = "patch"
    sites = ["L1H2", "L0H1"]
    name = "top-two-heads"       # optional: the analysis id (else derived from kind + params)

    [[analyses]]
    kind = "attribute"           # gradient estimates of a sweep grid: the sweep's keys, plus
    component = "head_out"
    method = "atp*"              # "atp" (default), "atp*", "ig" (steps = 16)
    verify = 4                   # exact patches of the top 4 sites and 4 random others
    graddrop = true              # "atp*" only

    [[analyses]]
    kind = "attribute_edges"     # every edge of the graph
    method = "eap"               # or "eap-ig" (steps = 16)
    direction = "both"

    [[analyses]]
    kind = "series"              # one analysis per pair of the [series]
    analysis = "sweep"           # or "attribute", "circuit" (their keys; one direction)
    compare = "reference"        # or "consecutive"
    component = "head_out"
    direction = "intervened->reference"

    [[analyses]]
    kind = "explain"             # the whole Δ-XAI pipeline (mechdelta.explain), resumable; keys
    budget = "auto"              # budget, alpha, min_effect, steering_alphas, circuit, pdf
    [analyses.intervention]      # (mechdelta.runs._explain_spec); the declared intervention:
    kind = "fine-tune"           # kind, description, data, date, owner, extra
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

from mechdelta.errors import ConfigError, MechDeltaError
from mechdelta.runs._config import (
    check_bool,
    check_keys,
    check_prompts,
    check_str,
    check_table,
    check_tokens,
    jsonable,
    short_hash,
)
from mechdelta.runs._executor_spec import ExecutorSpec
from mechdelta.runs._series_spec import SeriesSpec
from mechdelta.runs._settings import FIGURE_FORMATS, STATIC_FORMATS, OutputSpec, RunSpec
from mechdelta.runs.analyses import ANALYSIS_KINDS, KIND_KEYS, AnalysisSpec

__all__ = [
    "ANALYSIS_KINDS",
    "FIGURE_FORMATS",
    "STATIC_FORMATS",
    "AnalysisSpec",
    "ExecutorSpec",
    "Experiment",
    "OutputSpec",
    "PairSpec",
    "RunSpec",
    "SeriesSpec",
    "TaskSpec",
    "short_hash",
]

BUILTIN_PAIRS = ("tiny",)
#: The configuration keys results depend on (not names, texts or outputs).
COMPUTE_KEYS = ("pair", "task", "run", "analyses", "control", "series")


# --- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    """Where the two models come from: a zoo entry, a built-in pair, two checkpoints, or the
    experiment's ``[series]`` (``series = true``: its reference checkpoint vs its last)."""

    zoo: str | None = None
    zoo_path: str | None = None
    builtin: str | None = None
    reference: str | None = None
    intervened: str | None = None
    processing: str | None = None
    dtype: str | None = None
    device: str | None = None
    allow_identical: bool = False
    series: bool = False
    #: the table this spec was read from, for messages: "[pair]" or "[control]" (not stored)
    where: str = field(default="[pair]", compare=False, repr=False)

    KEYS = (
        "zoo",
        "zoo_path",
        "builtin",
        "reference",
        "intervened",
        "processing",
        "dtype",
        "device",
        "allow_identical",
        "series",
    )

    def __post_init__(self) -> None:
        sources = [s for s in ("zoo", "builtin") if getattr(self, s) is not None] + (
            ["reference/intervened"] if self.reference or self.intervened else []
        )
        sources += ["series"] if self.series else []
        if len(sources) != 1:
            raise ConfigError(
                f"{self.where} needs exactly one source: zoo = NAME, builtin = 'tiny', "
                "reference = ... with intervened = ..., or series = true (with a [series] "
                f"table); got {sources or 'none'}"
            )
        if (self.reference is None) != (self.intervened is None):
            raise ConfigError(f"{self.where} reference and intervened must be given together")
        if self.zoo_path is not None and self.zoo is None:
            raise ConfigError(
                f"{self.where} zoo_path (an entry built by `mechdelta zoo build`) needs zoo = NAME"
            )
        if self.builtin is not None and self.builtin not in BUILTIN_PAIRS:
            raise ConfigError(
                f"{self.where} builtin = {self.builtin!r} is unknown; built-in pairs: "
                f"{BUILTIN_PAIRS}"
            )
        if self.source != "checkpoints":
            extra = [k for k in ("processing", "dtype", "device") if getattr(self, k) is not None]
            if extra:
                raise ConfigError(
                    f"{self.where} {extra[0]} applies to reference/intervened checkpoints, not "
                    "to a "
                    f"{self.source} pair (which is built as its card says)"
                )
        if self.processing is not None and self.processing not in ("raw", "compat"):
            raise ConfigError(
                f"{self.where} processing must be 'raw' or 'compat', got {self.processing!r}"
            )

    @property
    def source(self) -> str:
        if self.zoo is not None:
            return "zoo"
        if self.builtin is not None:
            return "builtin"
        return "series" if self.series else "checkpoints"

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], where: str = "[pair]") -> PairSpec:
        check_keys(table, cls.KEYS, where)
        kw: dict[str, Any] = {"where": where}
        for key in cls.KEYS:
            if key in table:
                value = table[key]
                kw[key] = (
                    check_bool(value, f"{where} {key}")
                    if key in ("allow_identical", "series")
                    else check_str(value, f"{where} {key}")
                )
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "where"}

    @property
    def label(self) -> str:
        """A short name of the pair: ``zoo:null``, ``builtin:tiny`` or ``REF vs INT``."""
        if self.zoo is not None:
            return f"zoo:{self.zoo}" + (f" ({self.zoo_path})" if self.zoo_path else "")
        if self.builtin is not None:
            return f"builtin:{self.builtin}"
        if self.series:
            return "the series' reference checkpoint vs its last"
        return f"{self.reference} vs {self.intervened}"


@dataclass(frozen=True)
class TaskSpec:
    """A task written inline: prompts (strings or token-id lists), answers, wrong, corrupted."""

    prompts: tuple[str | tuple[int, ...], ...]
    answers: tuple[str | int, ...] | None = None
    wrong: tuple[str | int, ...] | None = None
    corrupted: tuple[str | tuple[int, ...], ...] | None = None
    metric: str = "logit_diff"
    prepend_bos: bool | None = None
    name: str = "task"

    KEYS = ("prompts", "answers", "wrong", "corrupted", "metric", "prepend_bos", "name")

    def __post_init__(self) -> None:
        n = len(self.prompts)
        for label in ("answers", "wrong", "corrupted"):
            value = getattr(self, label)
            if value is not None and len(value) != n:
                raise ConfigError(f"[task] {label} has {len(value)} entries for {n} prompts")
        from mechdelta.core.metrics import resolve_metric

        try:
            resolve_metric(self.metric)
        except MechDeltaError as exc:
            raise ConfigError(f"[task] metric: {exc}") from None

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> TaskSpec:
        check_keys(table, cls.KEYS, "[task]")
        if "prompts" not in table:
            raise ConfigError("[task] needs prompts = [...]")
        kw: dict[str, Any] = {"prompts": check_prompts(table["prompts"], "[task] prompts")}
        for key in ("answers", "wrong"):
            if key in table:
                kw[key] = check_tokens(table[key], f"[task] {key}")
        if "corrupted" in table:
            kw["corrupted"] = check_prompts(table["corrupted"], "[task] corrupted")
        if "metric" in table:
            kw["metric"] = check_str(table["metric"], "[task] metric")
        if "prepend_bos" in table:
            kw["prepend_bos"] = check_bool(table["prepend_bos"], "[task] prepend_bos")
        if "name" in table:
            kw["name"] = check_str(table["name"], "[task] name")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}

    def build(self) -> Any:
        """The :class:`~mechdelta.Task` this spec describes."""
        from mechdelta.core.task import Task

        def prompts(ps: tuple[str | tuple[int, ...], ...] | None) -> Any:
            return None if ps is None else [p if isinstance(p, str) else list(p) for p in ps]

        return Task(
            prompts=prompts(self.prompts),
            answers=None if self.answers is None else cast(Any, list(self.answers)),
            wrong=None if self.wrong is None else cast(Any, list(self.wrong)),
            corrupted=prompts(self.corrupted),
            metric=self.metric,
            prepend_bos=self.prepend_bos,
            name=self.name,
        )


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: what to compare, on what, which analyses, how to write them."""

    pair: PairSpec
    analyses: tuple[AnalysisSpec, ...]
    task: TaskSpec | None = None
    run: RunSpec = field(default_factory=RunSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    name: str = "experiment"
    description: str = ""
    control: PairSpec | None = None
    series: SeriesSpec | None = None
    #: where the patched forwards run; not part of the run's identity (not a COMPUTE_KEYS key)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)

    KEYS = ("name", "description", *COMPUTE_KEYS, "output", "executor")

    def __post_init__(self) -> None:
        if not self.analyses:
            raise ConfigError("the experiment has no [[analyses]]; add at least one")
        if self.pair.series and self.series is None:
            raise ConfigError("[pair] series = true needs a [series] table naming the checkpoints")
        if self.task is None and (
            self.pair.source == "checkpoints"
            or (self.series is not None and self.series.checkpoints is not None)
        ):
            raise ConfigError(
                f"[task] is required when [{'pair' if self.pair.source == 'checkpoints' else 'series'}]"
                " names checkpoints; zoo and builtin pairs (and zoo series) bring their own task"
            )
        if self.series is None:
            for a in self.analyses:
                if a.kind == "series":
                    raise ConfigError(
                        f"{a.where} needs a [series] table naming the checkpoints (e.g. [series] "
                        "zoo = 'induction')"
                    )
        seen: dict[str, AnalysisSpec] = {}
        for a in self.analyses:
            if a.id in seen:
                raise ConfigError(
                    f"{a.where} and {seen[a.id].where} have the same id {a.id!r}; give one of "
                    "them name = '...'"
                )
            seen[a.id] = a

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(a.id for a in self.analyses)

    def analysis(self, analysis_id: str) -> AnalysisSpec:
        for a in self.analyses:
            if a.id == analysis_id:
                return a
        raise ConfigError(f"no analysis {analysis_id!r}; the experiment has {list(self.ids)}")

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        data = check_table(data, "the experiment")
        check_keys(data, cls.KEYS, "the experiment (top level)")
        if data.get("pair") is None and data.get("series") is None:
            raise ConfigError("the experiment needs a [pair] table (or a [series] table)")
        series = data.get("series")
        raw = data.get("analyses")
        if raw is None:
            raise ConfigError("the experiment has no [[analyses]]; add at least one")
        if isinstance(raw, Mapping) or not isinstance(raw, Sequence):
            raise ConfigError("analyses must be an array of tables: write [[analyses]] blocks")
        return cls(
            pair=PairSpec(series=True)
            if data.get("pair") is None
            else PairSpec.from_dict(check_table(data["pair"], "[pair]")),
            task=None
            if data.get("task") is None
            else TaskSpec.from_dict(check_table(data["task"], "[task]")),
            analyses=tuple(
                AnalysisSpec.from_dict(check_table(a, f"[[analyses]] #{i + 1}"), i)
                for i, a in enumerate(raw)
            ),
            run=RunSpec.from_dict(check_table(data.get("run", {}), "[run]")),
            output=OutputSpec.from_dict(check_table(data.get("output", {}), "[output]")),
            name=check_str(data.get("name", "experiment"), "name"),
            description=str(data.get("description", "")),
            control=None
            if data.get("control") is None
            else PairSpec.from_dict(check_table(data["control"], "[control]"), "[control]"),
            series=None
            if series is None
            else SeriesSpec.from_dict(check_table(series, "[series]")),
            executor=ExecutorSpec.from_dict(check_table(data.get("executor", {}), "[executor]")),
        )

    @classmethod
    def from_toml(cls, text: str, *, where: str = "the experiment") -> Experiment:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Experiment:
        """Read an experiment TOML file (``name`` defaults to the file's stem)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"experiment file {os.fspath(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{os.fspath(p)!r} is not valid TOML: {exc}") from None
        data.setdefault("name", p.stem)
        return cls.from_dict(data)

    @classmethod
    def packaged(cls, name: str) -> Experiment:
        """An experiment shipped inside the package (``mechdelta/experiments/<name>.toml``)."""
        from importlib import resources

        res = resources.files("mechdelta").joinpath("experiments", f"{name}.toml")
        if not res.is_file():
            raise ConfigError(f"no packaged experiment {name!r}")
        return cls.from_toml(res.read_text("utf-8"), where=f"packaged experiment {name!r}")

    @classmethod
    def coerce(cls, value: Experiment | Mapping[str, Any] | str | os.PathLike[str]) -> Experiment:
        if isinstance(value, Experiment):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        return cls.load(value)

    # --- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration (defaults filled in; analysis ids included)."""
        return {
            "name": self.name,
            "description": self.description,
            "pair": self.pair.to_dict(),
            "task": None if self.task is None else self.task.to_dict(),
            "run": self.run.to_dict(),
            "output": self.output.to_dict(),
            "analyses": [a.to_dict() for a in self.analyses],
            "control": None if self.control is None else self.control.to_dict(),
            "series": None if self.series is None else self.series.to_dict(),
            "executor": self.executor.to_dict(),
        }

    def compute_dict(self) -> dict[str, Any]:
        """The part of the configuration results depend on (not names, texts or outputs)."""
        d = self.to_dict()
        return {k: d[k] for k in COMPUTE_KEYS}

    @classmethod
    def from_resolved(cls, data: Mapping[str, Any]) -> Experiment:
        """Rebuild from :meth:`to_dict` output (as stored in a run manifest)."""
        d = dict(data)
        d["pair"] = {k: v for k, v in d["pair"].items() if v is not None and v is not False}
        if d.get("control") is not None:
            d["control"] = {
                k: v for k, v in d["control"].items() if v is not None and v is not False
            }
        else:
            d.pop("control", None)
        if d.get("series") is not None:
            d["series"] = {k: v for k, v in d["series"].items() if v is not None and v is not False}
        else:
            d.pop("series", None)
        if d.get("task") is not None:
            d["task"] = {k: v for k, v in d["task"].items() if v is not None}
        else:
            d.pop("task", None)
        analyses = []
        for a in d["analyses"]:
            keys = ("kind", "name", *KIND_KEYS.get(a.get("kind", ""), ()))
            entry = {k: a[k] for k in keys if k in a and a[k] is not None}
            for key in ("per_position", "graddrop"):  # False: the default, maybe not allowed
                if entry.get(key) is False:
                    entry.pop(key)
            analyses.append(entry)
        d["analyses"] = analyses
        return cls.from_dict(d)
