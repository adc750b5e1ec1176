"""The resumable store of a sharded work: one safetensors file per finished shard.

``<shard_dir>/<work key>/shard-<index>.safetensors`` holds the shard's values and, in its metadata,
the shard's rows and variants; files are written to a temporary name and renamed into place, so
a shard is either complete or absent (a run killed mid-write leaves no half shard). A stored file
whose rows or variants differ from the plan's shard of that index is a different work that
collided: it is not used (a :class:`~mechdelta.errors.ResultFormatError` says so).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load, save
from torch import Tensor

from mechdelta.core._io import atomic_write_bytes
from mechdelta.errors import ResultFormatError

if TYPE_CHECKING:
    from mechdelta.scale.executor import Shard

__all__ = ["ShardStore"]


class ShardStore:
    """Finished shards of one work (see the module docstring)."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.root = Path(root) / key

    def path(self, index: int) -> Path:
        return self.root / f"shard-{index:06d}.safetensors"

    def write(self, shard: Shard, values: Tensor) -> None:
        meta = {"rows": json.dumps(list(shard.rows)), "variants": json.dumps(list(shard.variants))}
        data = save({"values": values.detach().cpu().contiguous()}, metadata=meta)
        atomic_write_bytes(self.path(shard.index), data)

    def read(self, shard: Shard) -> Tensor | None:
        path = self.path(shard.index)
        if not path.is_file():
            return None
        raw = path.read_bytes()
        try:
            values = load(raw)["values"]
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
        except Exception as exc:  # a corrupt file is reported, not silently re-run
            raise ResultFormatError(
                f"stored shard {path} is unreadable ({exc}); delete it to re-run that shard"
            ) from exc
        if json.loads(meta.get("rows", "null")) != list(shard.rows) or json.loads(
            meta.get("variants", "null")
        ) != list(shard.variants):
            raise ResultFormatError(
                f"stored shard {path} holds rows/variants other than the plan's shard "
                f"{shard.index}: the folder belongs to another work; delete {self.root}"
            )
        return values

    def finished(self, shards: Sequence[Shard]) -> dict[int, Tensor]:
        """The stored values of every shard of the plan already written."""
        out: dict[int, Tensor] = {}
        for shard in shards:
            got = self.read(shard)
            if got is not None:
                out[shard.index] = got
        return out
