"""Scale-out: the same by-position sweep in this process and on a local Ray cluster.

For each model size the script runs one by-position ``resid_pre`` sweep (both directions' worth
of work in one direction: every layer x position) three ways and checks the numbers agree bit
for bit before printing times:

- ``local``: the default in-process engine (``executor=None``);
- ``ray``: :class:`mechdelta.RayExecutor` with ``--workers`` actors on a local cluster started
  here (``ray.init(num_cpus=...)``); the first call pays for the actors (start-up, torch
  import, loading the pair once per actor), reported as ``ray (cold)``; the next call reuses
  them (``ray (warm)``);

and prints the sweep's peak memory from its provenance (``engine.peak_memory``).

    .venv/bin/python benchmarks/bench_scale.py                       # small + medium, 2 workers
    .venv/bin/python benchmarks/bench_scale.py --sizes large          # 12 layers, d_model 768
    .venv/bin/python benchmarks/bench_scale.py --device cuda --gpus-per-worker 1 --workers 1

On a 2-core machine the Ray workers share the cores the in-process run uses alone, so Ray can
only add overhead here; the point of the table is the overhead's size and where it stops
mattering. Real speed-up needs more cores, GPUs or machines than this one has.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {  # layers, d_model, heads, prompts, seq
    "small": (2, 128, 4, 8, 12),
    "medium": (6, 256, 8, 16, 16),
    "large": (12, 768, 12, 32, 16),
}


def _bench_sweep() -> Any:
    path = Path(__file__).with_name("bench_sweep.py")
    spec = importlib.util.spec_from_file_location("_bench_sweep", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(size: str, device: str) -> tuple[Any, Any]:
    import mechdelta as md

    layers, d_model, heads, prompts, seq = SIZES[size]
    args = argparse.Namespace(
        family="native", layers=layers, d_model=d_model, heads=heads, vocab=1000, seq=seq,
        device=device,
    )  # fmt: skip
    pair = _bench_sweep().build_pair(args)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (prompts, seq), generator=gen)
    return pair, md.Task(tokens, answers=tokens[:, 0], wrong=tokens[:, 1])


def run(pair: Any, task: Any, executor: Any, budget: int) -> tuple[float, Any]:
    import mechdelta as md

    t0 = time.perf_counter()
    res = md.sweep(pair, task, "resid_pre", per_position=True, batch_budget=budget, n_boot=100,
                   progress=False, executor=executor)  # fmt: skip
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(SIZES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-budget", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    import ray

    import mechdelta as md

    warnings.simplefilter("ignore")  # the random pairs' shifts are small: not the point here
    ray.init(num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, "
          f"device {args.device}; in-process threads {args.threads}, {args.workers} Ray workers x "
          f"{args.threads_per_worker} thread(s)")  # fmt: skip
    print(f"{'size':7s} {'sites':>6s} {'rows':>5s} | {'local':>8s} {'ray cold':>9s} "
          f"{'ray warm':>9s} {'warm/local':>10s} | {'peak MiB':>8s} | equal")  # fmt: skip
    for size in args.sizes:
        pair, task = build(size, args.device)
        t_local, local = run(pair, task, None, args.batch_budget)
        with md.RayExecutor(
            num_workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            threads_per_worker=args.threads_per_worker,
        ) as ex:
            t_cold, cold = run(pair, task, ex, args.batch_budget)
            t_warm, warm = run(pair, task, ex, args.batch_budget)
        equal = torch.equal(local.per_prompt, cold.per_prompt) and torch.equal(
            local.per_prompt, warm.per_prompt
        )
        diff = (local.per_prompt - warm.per_prompt).abs().max().item()
        peak = local.provenance.get("engine", {}).get("peak_memory", {})
        mib = peak.get("bytes", float("nan")) / 2**20 if isinstance(peak, dict) else float("nan")
        n_sites = local.per_prompt[..., 0].numel()
        print(f"{size:7s} {n_sites:6d} {SIZES[size][3]:5d} | "
              f"{t_local:7.2f}s {t_cold:8.2f}s {t_warm:8.2f}s {t_warm / t_local:9.2f}x | "
              f"{mib:8.1f} | {'yes' if equal else f'NO (max |Δ| {diff:.2g})'}", flush=True)  # fmt: skip
        del pair
    ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
