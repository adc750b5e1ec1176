"""Atomic, pickle-free storage for results: safetensors for tensors, JSON for everything else.

A stored result is a directory holding ``result.json`` (kind, format version, metadata, provenance)
and, when it has tensors, ``tensors.safetensors``. Writes go to a temporary name and are renamed
into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mechdelta.errors import ResultFormatError

FORMAT_VERSION = 1
_META = "result.json"
_TENSORS = "tensors.safetensors"


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_result(
    path: str | os.PathLike[str],
    kind: str,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a result directory; tensors first, metadata last (its presence marks completion).

    The metadata records ``kind``, the format version and ``tensor_keys`` (checked on load)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if tensors:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{_TENSORS}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, out / _TENSORS)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    header = {"kind": kind, "format_version": FORMAT_VERSION, "tensor_keys": sorted(tensors or {})}
    atomic_write_json(out / _META, {**header, **meta})
    return out


def load_result(
    path: str | os.PathLike[str], kind: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a result directory written by :func:`save_result`; raise ResultFormatError if bad."""
    src = Path(path)
    meta_path = src / _META
    if not meta_path.is_file():
        raise ResultFormatError(
            f"{os.fspath(src)!r} holds no {_META}: not a saved mechdelta result, or its save was "
            "interrupted. Re-run the analysis that produced it."
        )
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFormatError(f"{os.fspath(meta_path)!r} is corrupt: {exc}") from exc
    if meta.get("kind") != kind:
        raise ResultFormatError(
            f"{os.fspath(src)!r} holds a {meta.get('kind')!r} result, not a {kind!r} result"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ResultFormatError(
            f"{os.fspath(src)!r} has format version {meta.get('format_version')}, this mechdelta "
            f"reads version {FORMAT_VERSION}"
        )
    tensors: dict[str, torch.Tensor] = {}
    tpath = src / _TENSORS
    if meta.get("tensor_keys"):
        if not tpath.is_file():
            raise ResultFormatError(f"{os.fspath(src)!r} is missing {_TENSORS}")
        try:
            tensors = load_file(os.fspath(tpath))
        except Exception as exc:  # safetensors raises its own error types
            raise ResultFormatError(f"{os.fspath(tpath)!r} is corrupt: {exc}") from exc
        missing = set(meta["tensor_keys"]) - set(tensors)
        if missing:
            raise ResultFormatError(f"{os.fspath(tpath)!r} lacks tensors {sorted(missing)}")
    return meta, tensors
