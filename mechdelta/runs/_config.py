"""Typed readers for configuration tables (TOML / dicts): each raises ConfigError naming where
the bad value is and what was expected. Private to :mod:`mechdelta.runs.experiment` and
:mod:`mechdelta.runs.analyses`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from mechdelta.errors import ConfigError

__all__ = [
    "check_bool",
    "check_int",
    "check_ints",
    "check_keys",
    "check_prompts",
    "check_str",
    "check_table",
    "check_tokens",
    "jsonable",
    "short_hash",
]


def check_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys: {', '.join(allowed) or '(none)'}"
        )


def check_table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(value).__name__}")
    return value


def check_int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value}")
    return value


def check_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def check_ints(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{where} must be a non-empty list of integers, got {value!r}")
    out = tuple(check_int(v, f"{where}[{i}]", minimum=0) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        raise ConfigError(f"{where} has duplicates: {list(out)}")
    return out


def check_tokens(value: Any, where: str) -> tuple[str | int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{where} must be a non-empty list (one entry per prompt)")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ConfigError(f"{where}[{i}] must be a string or a token id, got {v!r}")
    return tuple(value)


def check_prompts(value: Any, where: str) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"{where} must be a non-empty list of strings or of token-id lists, got {value!r}"
        )
    out: list[str | tuple[int, ...]] = []
    for i, p in enumerate(value):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and p:
            out.append(
                tuple(check_int(t, f"{where}[{i}][{j}]", minimum=0) for j, t in enumerate(p))
            )
        else:
            raise ConfigError(f"{where}[{i}] must be a string or a non-empty list of token ids")
    return tuple(out)


def jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value


def short_hash(obj: Any) -> str:
    """A short content hash of JSON-able data (canonical: sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]
