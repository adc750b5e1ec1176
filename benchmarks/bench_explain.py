"""Time ``md.explain`` per stage on the zoo pairs and capture its audit report as screenshots.

    .venv/bin/python benchmarks/bench_explain.py                 # planted, null, finetune
    .venv/bin/python benchmarks/bench_explain.py --out /tmp/bx   # keep the reports there

Prints one row per pair: status, the number of warranted claims, the located components, the
steering verdict at alpha = 1, the circuit, and seconds per stage (plus the report's writing:
figures, PNGs through kaleido, the PDF through Chromium). Screenshots of ``report.html`` and of
every ``report.pdf`` page go to ``<out>/<pair>/screens/`` for a person to look at.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import mechdelta as md
from mechdelta.explain._render import screenshots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["planted", "null", "finetune"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_explain_"))
    rows = []
    for name in args.pairs:
        entry = md.zoo.load(name)
        t0 = time.perf_counter()
        e = md.explain(entry.pair, entry.task, out=root / name, n_boot=args.n_boot, overwrite=True)
        total = time.perf_counter() - t0
        shots = screenshots(root / name)
        stages = sum(e.timings.values())
        steering = ""
        if e.steering is not None:
            frame = e.steering.to_dataframe()
            at1 = frame[frame["alpha"] == 1.0]
            steering = ", ".join(
                f"{r['site']} {r['measure']} {r['fraction']:.2f} [{r['ci_low']:.2f}, "
                f"{r['ci_high']:.2f}] (random mean {r['control_mean']:.2f}, max "
                f"{r['control_max']:.2f})"
                for r in at1.to_dict("records")
            )
        screen = ""
        if e.representations is not None:
            frame = e.representations.to_dataframe()
            cka = frame[(frame["site"] == "resid_post") & (frame["measure"] == "cka")]
            screen = ", ".join(
                f"L{int(r['layer'])} {r['value']:.2f}" for r in cka.to_dict("records")
            )
            first = e.representations.candidates(1)
            screen += f"; first candidate {first[0].site}" if first else "; no candidate"
        circuit = (
            "" if e.circuit is None else f"{len(e.circuit)} nodes, f={e.circuit.faithfulness:.2f}"
        )
        rows.append((name, e.status, len(e.all_claims()), ", ".join(e.located.get("components", [])[:4]),
                     screen, steering, circuit, {k: round(v, 1) for k, v in e.timings.items()},
                     round(total - stages, 1), round(total, 1), len(shots)))  # fmt: skip
    print(f"explain on the zoo (n_boot {args.n_boot}; reports under {root})")
    print(
        "| pair | status | claims | located | resid_post CKA | steering at alpha=1 | circuit "
        "| stages s | report s | total s | screenshots |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
