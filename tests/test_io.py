"""Atomic result storage: files appear whole, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import torch

from mechdelta.core._io import atomic_write_text, load_result, save_result


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        save_result(tmp_path / "r", "demo", {}, {"x": torch.ones(2)})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "r" / "tensors.safetensors") == 0o644
    assert _mode(tmp_path / "r" / "result.json") == 0o644
    meta, tensors = load_result(tmp_path / "r", "demo")
    assert torch.equal(tensors["x"], torch.ones(2)) and meta["kind"] == "demo"
    assert meta["tensor_keys"] == ["x"]
    assert not [p for p in tmp_path.rglob("*.tmp")]
