"""Provenance: which software and which weights produced a result."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import platform
from importlib import metadata
from typing import Any

import torch

from mechdelta._version import __version__

__all__ = ["environment", "weights_hash"]


@functools.cache
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """Versions and platform, stamped into every saved result and run manifest."""
    return {
        "mechdelta": __version__,
        "transformer_lens": _version("transformer-lens"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


@torch.no_grad()
def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a model's weights: names, dtypes, shapes and bytes, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
