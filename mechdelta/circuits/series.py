"""A series of checkpoints of one architecture (e.g. one training run): :class:`CheckpointSeries`.

Every analysis runs on :class:`~mechdelta.ModelPair`\\ s built from the series, in one of two modes:

- ``"reference"``: each checkpoint against the series' reference checkpoint (the pair's
  reference = the reference checkpoint, its intervened model = the other checkpoint; the reference
  itself gets no pair). A pair is labelled by its other checkpoint's label.
- ``"consecutive"``: each checkpoint against the one before it (reference = the earlier one). A pair
  is labelled by its later checkpoint's label.

Scores are those of :func:`~mechdelta.sweep` / :func:`~mechdelta.attribute` on each pair: the
fraction of *that pair's* shift a site explains, with a bootstrap CI over prompts.

Each analysis runs pair by pair, with a progress bar over the pairs (``progress=False``: none;
each pair's own analysis shows its own progress too), and can resume: given a ``cache`` (a
:class:`PairCache`: ``load(index, label)`` returns a stored result or None, ``save(index, label,
result)`` stores one), pairs whose result the cache holds are not recomputed, and every result
computed is saved as soon as it is done. Runs (``kind = "series"``) pass a cache in the run
directory, so an interrupted series analysis resumes at the first unfinished pair.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from mechdelta.circuits.series_result import (
    MODES,
    Label,
    SeriesCircuits,
    SeriesResult,
    _mode,
    circuit_membership,
)
from mechdelta.core._compat import check_compatible
from mechdelta.core.directions import Direction
from mechdelta.core.pair import ModelPair
from mechdelta.errors import ConfigError, IncompatibleModelsError

if TYPE_CHECKING:
    from mechdelta.circuits.circuit import Circuit

__all__ = [
    "MODES",
    "CheckpointSeries",
    "Label",
    "PairCache",
    "SeriesCircuits",
    "SeriesResult",
    "circuit_membership",
]


@runtime_checkable
class PairCache(Protocol):
    """Where a series analysis keeps each pair's finished result (see the module docstring)."""

    def load(self, index: int, label: Label) -> Any | None:
        """The stored result of pair ``index`` (labelled ``label``), or None to compute it."""

    def save(self, index: int, label: Label, result: Any) -> None:
        """Store the result of pair ``index`` (labelled ``label``), just computed."""


def _labels(labels: Sequence[Label] | None, n: int) -> tuple[Label, ...]:
    out = tuple(range(n)) if labels is None else tuple(labels)
    if len(out) != n:
        raise ConfigError(f"{len(out)} labels for {n} checkpoints")
    for x in out:
        if isinstance(x, bool) or not isinstance(x, (int, float, str)):
            raise ConfigError(f"labels are ints, floats or strings (e.g. steps), got {x!r}")
    if len(set(out)) != n:
        raise ConfigError(f"labels must be distinct, got {list(out)}")
    return out


class CheckpointSeries:
    """Checkpoints of one architecture, compared against a reference or with their neighbours.

    Args:
        checkpoints: at least two TransformerLens bridges, or local checkpoint directories / hub
            names (loaded like :meth:`ModelPair.load <mechdelta.ModelPair.load>`), in order.
        reference: index of the reference checkpoint (negative counts from the end).
        labels: one distinct label per checkpoint, e.g. training steps (default ``0..n-1``).
        names: display names (default: the paths given, else ``"checkpoint <label>"``).
        device, dtype, processing, tokenizer: for checkpoints given as paths or names.
        allow_identical: pass to every :class:`ModelPair` (identical neighbours then warn).

    Every checkpoint must match the first one's architecture, hooks, tokenizer, processing, dtype
    and device: otherwise the :class:`~mechdelta.errors.IncompatibleModelsError` subclass that
    :class:`ModelPair` raises, naming the offending checkpoint.
    """

    def __init__(
        self,
        checkpoints: Sequence[Any],
        reference: int = 0,
        *,
        labels: Sequence[Label] | None = None,
        names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        processing: str = "raw",
        tokenizer: Any = None,
        allow_identical: bool = False,
    ) -> None:
        items = list(checkpoints)
        if len(items) < 2:
            raise ConfigError(f"a checkpoint series needs at least 2 checkpoints, got {len(items)}")
        self.labels = _labels(labels, len(items))
        n = len(items)
        if isinstance(reference, bool) or not isinstance(reference, int) or not -n <= reference < n:
            raise ConfigError(
                f"reference must be a checkpoint index in [-{n}, {n}), got {reference!r}"
            )
        self.reference = reference % n
        self.models = _load(items, device, dtype, processing, tokenizer)
        if names is None:
            names = [
                os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"checkpoint {lab}"
                for x, lab in zip(items, self.labels, strict=True)
            ]
        if len(names) != n:
            raise ConfigError(f"{len(names)} names for {n} checkpoints")
        self.names = tuple(str(x) for x in names)
        self.allow_identical = allow_identical
        first = self.models[0]
        for i in range(1, n):
            try:
                check_compatible(first, self.models[i])
            except IncompatibleModelsError as exc:
                raise type(exc)(
                    f"checkpoint {i} (label {self.labels[i]!r}, {self.names[i]}) does not match "
                    f"checkpoint 0 (label {self.labels[0]!r}); a series holds checkpoints of one "
                    f"architecture. Here 'reference' = checkpoint 0, 'intervened' = checkpoint "
                    f"{i}: {exc}"
                ) from exc
        self._pairs: dict[str, list[ModelPair]] = {}

    @classmethod
    def from_revisions(
        cls,
        name: str,
        revisions: Sequence[str],
        *,
        reference: int = 0,
        labels: Sequence[Label] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        processing: str = "raw",
        tokenizer: Any = None,
        allow_duplicates: bool = False,
        trust_remote_code: bool = False,
    ) -> CheckpointSeries:
        """The revisions of one hub repository as a series, e.g. Pythia's training checkpoints:
        ``CheckpointSeries.from_revisions("EleutherAI/pythia-70m", ["step1000", "step2000"])``.

        Each revision (branch, tag or commit hash) is loaded like :meth:`ModelPair.load
        <mechdelta.ModelPair.load>` with that revision, through the standard Hugging Face cache
        (offline with ``HF_HUB_OFFLINE=1``: every revision is checked to be cached before any is
        loaded, else :class:`~mechdelta.errors.MissingRevisionError` naming what is cached).
        Labels default to the revision strings; names are ``name@revision``.

        Duplicates are found by weight hash across the *whole* series (not only neighbours): when
        two or more revisions hold identical weights this raises
        :class:`~mechdelta.errors.DuplicateCheckpointsError` listing each group of revisions
        with the same weights; ``allow_duplicates=True`` warns instead (and the series' pairs
        then accept identical models).
        """
        import warnings

        from mechdelta.core._loading import (
            Processing,
            load_bridges,
            resolve_device,
            resolve_dtype,
        )
        from mechdelta.core._revisions import check_revision, label
        from mechdelta.core.provenance import weights_hash
        from mechdelta.errors import DuplicateCheckpointsError

        if isinstance(revisions, str) or len(revisions) < 2:
            raise ConfigError(
                f"from_revisions needs a list of at least 2 revisions, got {revisions!r}"
            )
        revs = [check_revision(r) or "main" for r in revisions]
        if len(set(revs)) != len(revs):
            raise ConfigError(f"revisions must be distinct, got {list(revs)}")
        labs = tuple(revs) if labels is None else _labels(labels, len(revs))
        proc, dt, dev = Processing.coerce(processing), resolve_dtype(dtype), resolve_device(device)
        models = load_bridges(  # all checked before any (slow) load
            [(name, rev, dev) for rev in revs],
            dtype=dt,
            processing=proc,
            tokenizer=tokenizer,
            trust_remote_code=trust_remote_code,
        )
        by_hash: dict[str, list[int]] = {}
        for i, model in enumerate(models):
            by_hash.setdefault(weights_hash(model.state_dict()), []).append(i)
        groups = [idx for idx in by_hash.values() if len(idx) > 1]
        if groups:
            listed = "; ".join(
                " = ".join(f"{revs[i]!r} (label {labs[i]!r})" for i in idx) for idx in groups
            )
            msg = (
                f"{sum(len(g) for g in groups)} of the {len(revs)} revisions of {name!r} hold "
                f"duplicate weights (same weight hash): {listed}. Comparing them shows no shift."
            )
            if not allow_duplicates:
                raise DuplicateCheckpointsError(
                    msg + " Drop all but one revision of each group, or pass "
                    "allow_duplicates=True to keep them (with a warning)",
                    groups=tuple(tuple(labs[i] for i in idx) for idx in groups),
                )
            warnings.warn(msg, UserWarning, stacklevel=2)
        return cls(
            models,
            reference,
            labels=labs,
            names=[label(name, r) for r in revs],
            allow_identical=allow_duplicates,
        )

    def __len__(self) -> int:
        return len(self.models)

    def __repr__(self) -> str:
        return (
            f"CheckpointSeries({len(self)} checkpoints, labels={list(self.labels)}, "
            f"reference={self.labels[self.reference]!r})"
        )

    # --- pairs ------------------------------------------------------------------------------------

    def pair_indices(self, mode: str = "reference") -> list[tuple[int, int]]:
        """``(reference index, intervened index)`` of each pair of ``mode``, in series order."""
        if _mode(mode) == "reference":
            return [(self.reference, i) for i in range(len(self)) if i != self.reference]
        return [(i - 1, i) for i in range(1, len(self))]

    def pair_labels(self, mode: str = "reference") -> list[Label]:
        """Each pair's label: its intervened (non-reference / later) checkpoint's label."""
        return [self.labels[i] for _, i in self.pair_indices(mode)]

    def pairs(self, mode: str = "reference") -> list[ModelPair]:
        """The :class:`ModelPair` of each pair of ``mode`` (built once, then cached)."""
        m = _mode(mode)
        if m not in self._pairs:
            self._pairs[m] = [
                ModelPair(
                    self.models[r],
                    self.models[i],
                    names=(self.names[r], self.names[i]),
                    allow_identical=self.allow_identical,
                )
                for r, i in self.pair_indices(m)
            ]
        return self._pairs[m]

    # --- analyses ---------------------------------------------------------------------------------

    def _each(
        self,
        mode: str,
        fn: Callable[[ModelPair], Any],
        desc: str,
        progress: bool | None,
        cache: PairCache | None,
    ) -> list[Any]:
        """``fn(pair)`` for every pair of ``mode`` in series order: through ``cache`` (pairs it
        holds are not recomputed; each new result is saved at once), with a progress bar over
        the pairs (``progress=None`` shows it too: each item is a whole analysis)."""
        from mechdelta.core.progress import progress as bar

        m = _mode(mode)
        labels, pairs = self.pair_labels(m), self.pairs(m)
        out: list[Any] = []
        shown = progress is not False
        for k in bar(range(len(pairs)), total=len(pairs), desc=desc, enabled=shown):
            got = None if cache is None else cache.load(k, labels[k])
            if got is None:
                got = fn(pairs[k])
                if cache is not None:
                    cache.save(k, labels[k], got)
            out.append(got)
        return out

    def _run(self, kind: str, fn: Any, task: Any, args: tuple[Any, ...], mode: str,
             direction: Any, kw: dict[str, Any], progress: bool | None,
             cache: PairCache | None) -> SeriesResult:  # fmt: skip
        d = Direction.coerce(direction)
        if d is Direction.BOTH:
            raise ConfigError("a series analysis takes one direction; call it once per direction")
        m = _mode(mode)
        inner = {"progress": progress, **kw}
        what = " ".join(str(getattr(a, "value", a)) for a in args)
        results = self._each(
            m,
            lambda p: fn(p, task, *args, d, **inner),
            f"series {kind} {what} ({m} mode)",
            progress,
            cache,
        )
        idx = self.pair_indices(m)
        return SeriesResult(
            kind=kind,
            mode=m,
            labels=tuple(self.pair_labels(m)),
            pair_labels=tuple((self.labels[r], self.labels[i]) for r, i in idx),
            results=tuple(results),
            checkpoints=self.labels,
        )

    def sweep(
        self,
        task: Any,
        component: Any,
        direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
        *,
        mode: str = "reference",
        progress: bool | None = None,
        cache: PairCache | None = None,
        **kw: Any,
    ) -> SeriesResult:
        """:func:`~mechdelta.sweep` on every pair of ``mode`` (``**kw`` and ``progress`` passed
        through; ``cache``: see :class:`PairCache`)."""
        from mechdelta.patching.sweep import sweep

        return self._run("sweep", sweep, task, (component,), mode, direction, kw, progress, cache)

    def attribute(
        self,
        task: Any,
        component: Any,
        direction: Direction | str = Direction.REFERENCE_TO_INTERVENED,
        *,
        mode: str = "reference",
        progress: bool | None = None,
        cache: PairCache | None = None,
        **kw: Any,
    ) -> SeriesResult:
        """:func:`~mechdelta.attribute` on every pair of ``mode`` (``**kw`` and ``progress`` passed
        through; ``cache``: see :class:`PairCache`)."""
        from mechdelta.attribution.nodes import attribute

        return self._run(
            "attribution", attribute, task, (component,), mode, direction, kw, progress, cache
        )

    def search_circuit(
        self,
        task: Any,
        *,
        mode: str = "reference",
        progress: bool | None = None,
        cache: PairCache | None = None,
        **kw: Any,
    ) -> dict[Label, Circuit]:
        """:func:`~mechdelta.circuits.search_circuit` on every pair of ``mode``, by pair label
        (``**kw`` and ``progress`` passed through; ``cache``: see :class:`PairCache`)."""
        from mechdelta.circuits.search import search_circuit

        m = _mode(mode)
        inner = {"progress": progress, **kw}
        found = self._each(
            m, lambda p: search_circuit(p, task, **inner), f"series circuit ({m} mode)",
            progress, cache,
        )  # fmt: skip
        return dict(zip(self.pair_labels(m), found, strict=True))


def _load(items: list[Any], device: Any, dtype: Any, processing: str, tokenizer: Any) -> list[Any]:
    paths = [x for x in items if isinstance(x, (str, os.PathLike))]
    if not paths:
        return items
    from mechdelta.core._loading import Processing, load_bridges, resolve_device, resolve_dtype

    proc, dt, dev = Processing.coerce(processing), resolve_dtype(dtype), resolve_device(device)
    loaded = iter(  # all checked before any (slow) load
        load_bridges(
            [(p, None, dev) for p in paths], dtype=dt, processing=proc, tokenizer=tokenizer
        )
    )
    return [next(loaded) if isinstance(x, (str, os.PathLike)) else x for x in items]
