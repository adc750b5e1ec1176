"""One run of the built-in tiny pair per test session, shared by the run, report and CLI tests
(tests that change a run work on a copy)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

ANALYSES: list[dict[str, Any]] = [
    {"kind": "shift"},
    {"kind": "sweep", "component": "head_out", "direction": "both"},
    {"kind": "patch", "sites": ["L1H1", "L0H2"], "direction": "both"},
    {"kind": "weight_diff"},
    {"kind": "factorial"},
]
IDS = ("shift", "sweep-head_out-both", "patch-L1H1+L0H2-both", "weight_diff", "factorial")


def fingerprint(run_dir: Path, ids: tuple[str, ...]) -> dict[str, object]:
    """Every tensor, parquet table and figure JSON of the given analyses of a run."""
    out: dict[str, object] = {}
    for i in ids:
        for p in sorted((run_dir / "results" / i).rglob("*.safetensors")):
            out[str(p.relative_to(run_dir))] = load_file(p)
        out[f"{i}.parquet"] = pd.read_parquet(run_dir / "results" / i / "table.parquet")
        out[f"{i}.figure"] = (run_dir / "figures" / f"{i}.json").read_text()
    return out


def tiny_config(analyses: list[dict[str, Any]] | None = None, **output: Any) -> dict[str, Any]:
    return {
        "name": "tiny-test",
        "description": "the built-in tiny pair: head L1H1's W_O doubled",
        "pair": {"builtin": "tiny"},
        "run": {"n_boot": 200, "seed": 3},
        "output": {"figures": ["html"], **output},
        "analyses": ANALYSES if analyses is None else analyses,
    }


TOML = """name = "tiny-test"
[pair]
builtin = "tiny"
[run]
n_boot = 200
seed = 3
[output]
figures = ["html"]
[[analyses]]
kind = "shift"
[[analyses]]
kind = "sweep"
component = "head_out"
direction = "both"
"""

# A shift the bootstrap cannot tell from zero (6 prompts, logit difference) and a sweep of layer 0
# only, which the tiny pair's intervention (in layer 1) leaves untouched: every score is exactly 0.
NOT_SIGNIFICANT_TOML = """name = "not-significant"
[pair]
builtin = "tiny"
[task]
prompts = [
    [1, 2, 3, 4, 5, 6, 7, 8],
    [9, 10, 11, 12, 13, 14, 15, 16],
    [3, 5, 7, 9, 11, 13, 15, 17],
    [20, 21, 22, 23, 24, 25, 26, 27],
    [30, 2, 31, 4, 32, 6, 33, 8],
    [40, 41, 40, 41, 40, 41, 40, 41],
]
answers = [1, 2, 3, 4, 5, 6]
wrong = [7, 8, 9, 10, 11, 12]
metric = "logit_diff"
[run]
n_boot = 200
[output]
figures = ["html"]
[[analyses]]
kind = "shift"
[[analyses]]
kind = "sweep"
component = "head_out"
layers = [0]
"""


@functools.cache
def base_run_dir() -> Path:
    """A complete run of :func:`tiny_config` (read only: copy it before changing anything)."""
    from mechdelta.runs.run import run_experiment

    root = Path(tempfile.mkdtemp(prefix="mechdelta-test-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    run_experiment(tiny_config(), root / "base", quiet=True)
    return root / "base"


def copy_run(tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run_dir(), dst)
    return dst


# Attribution analyses (test_runs_attribution.py): node estimates in both directions checked by
# exact patches, integrated gradients on one layer in one direction, edges in both directions.
ATTRIBUTION_ANALYSES: list[dict[str, Any]] = [
    {"kind": "shift"},
    {
        "kind": "attribute",
        "component": "head_out",
        "direction": "both",
        "method": "atp",
        "verify": 2,
    },
    {
        "kind": "attribute",
        "component": "head_out",
        "method": "ig",
        "steps": 2,
        "layers": [1],
        "verify": 1,
    },
    {"kind": "attribute_edges", "direction": "both"},
]


@functools.cache
def attribution_run_dir() -> Path:
    """A complete run of :data:`ATTRIBUTION_ANALYSES` (read only: copy it first)."""
    from mechdelta.runs.run import run_experiment

    root = Path(tempfile.mkdtemp(prefix="mechdelta-test-attribution-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    run_experiment(tiny_config(ATTRIBUTION_ANALYSES), root / "base", quiet=True)
    return root / "base"


def assert_same_files(a: dict[str, object], b: dict[str, object]) -> None:
    """Two run-directory fingerprints (path -> tensors / table / text) hold equal contents."""
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert isinstance(y, dict) and sorted(x) == sorted(y), key
            for name in x:
                assert torch.equal(x[name], y[name]), f"{key}:{name}"
        elif isinstance(x, pd.DataFrame):
            assert isinstance(y, pd.DataFrame), key
            pd.testing.assert_frame_equal(x, y)
        else:
            assert x == y, key
