"""How long loading each zoo entry takes (warm: after the first load imported TransformerLens).

Run: ``.venv/bin/python benchmarks/bench_zoo_load.py``. Prints best-of-N wall time per entry and
whether it is under the 1 s target (offline, CPU).
"""

from __future__ import annotations

import argparse
import time

from mechdelta import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="loads per entry (best is kept)")
    parser.add_argument("--target", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    zoo.load(zoo.names()[0])  # warm-up: imports and TransformerLens's bridge machinery
    print(f"{'entry':<14} {'best (s)':>9} {'median (s)':>11}  target < {args.target:g} s")
    for name in zoo.names():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            zoo.load(name)
            times.append(time.perf_counter() - start)
        times.sort()
        best, median = times[0], times[len(times) // 2]
        verdict = "met" if best < args.target else "NOT met"
        print(f"{name:<14} {best:>9.3f} {median:>11.3f}  {verdict}")


if __name__ == "__main__":
    main()
