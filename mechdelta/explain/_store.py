"""Resumable storage of :func:`~mechdelta.explain.explain`'s stages in its ``out`` directory.

Layout::

    out/explain.json          params + the pair's weight hashes + the task's prompt hash
    out/stages/<stage>/       each stage's result (its own ``save``: safetensors + JSON)
    out/stages/<stage>.done   written last, atomically: the stage is complete

A re-run with the same pair, task and parameters loads every completed stage instead of computing
it (an interrupted run resumes at the first missing stage); a directory written for a different
pair, task or parameters is refused (:class:`~mechdelta.errors.RunError`) unless ``overwrite``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mechdelta.core._io import atomic_write_json
from mechdelta.errors import RunError

__all__ = ["StageStore"]

T = TypeVar("T")
_FORMAT = 1


class StageStore:
    """Completed stages of one explanation (in memory only when ``root`` is None)."""

    def __init__(self, root: Path | None, identity: dict[str, Any], *, overwrite: bool) -> None:
        self.root = root
        self.loaded: list[str] = []
        if root is None:
            return
        meta = root / "explain.json"
        record = {"format": _FORMAT, **identity}
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RunError(f"{meta} is unreadable ({exc}); delete the directory") from None
            if _canon(old) != _canon(record):
                if not overwrite:
                    changed = sorted(
                        k
                        for k in set(old) | set(record)
                        if _canon(old.get(k)) != _canon(record.get(k))
                    )
                    raise RunError(
                        f"{root} holds an explanation of another pair, task or parameters "
                        f"(differs in: {', '.join(changed)}); use another out directory or "
                        "overwrite=True (CLI: --overwrite)"
                    )
                shutil.rmtree(root / "stages", ignore_errors=True)
        elif (root / "stages").exists() and overwrite:
            shutil.rmtree(root / "stages", ignore_errors=True)
        atomic_write_json(meta, record)

    def stage(self, name: str, compute: Callable[[], T], load: Callable[[Path], T]) -> T:
        """The stage's result: loaded when complete on disk, else computed and stored."""
        if self.root is None:
            return compute()
        path = self.root / "stages" / name
        done = path.with_name(name + ".done")
        if done.is_file():
            self.loaded.append(name)
            return load(path)
        shutil.rmtree(path, ignore_errors=True)
        result = compute()
        save = getattr(result, "save", None)
        if save is None:
            raise RunError(f"stage {name!r}: {type(result).__name__} cannot be stored")
        save(path)
        atomic_write_json(done, {"stage": name})
        return result

    def value(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A JSON-able stage (a dict), stored as ``stages/<name>.json``."""
        if self.root is None:
            return compute()
        path = self.root / "stages" / f"{name}.json"
        if path.is_file():
            self.loaded.append(name)
            loaded: dict[str, Any] = json.loads(path.read_text())
            return loaded
        value = compute()
        atomic_write_json(path, value)
        return value


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)
