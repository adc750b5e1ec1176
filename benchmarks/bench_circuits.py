"""Circuit search validity and speed: planted pairs, a 4-layer planted model, induction curves.

1. Planted pairs (``mechdelta.zoo.planted.planted_pair``: the 2-layer recall model, d_model 64,
   4 heads, with only the chosen components fine-tuned to the trigger behaviour; every other
   weight bit-identical) over seeds x component sets. For each node-level search (method x
   semantics, ``intervened->reference``, ``--target``):

   - P/R vs planted: node precision / recall of the found circuit against the planted components
     (head_out L1H1 -> node L1H1, mlp_out L1 -> MLP1; ``embed``/``unembed`` never planted).
   - P/R vs necessary: against N = the planted components whose removal from the planted set
     breaks the target under exact *graft* (f_graft(P - {p}) < target). Grafting P gives the
     intervened model exactly (f = 1), so N is the part of P that graft shows is needed.
   - prec(P+down): the fraction of found nodes that are planted or downstream of a planted node.
     Under splice a downstream MLP's write carries an upstream head's effect (its input moved),
     so {MLP1} can replace {L1H1, MLP1}: a true finding about the splice semantics, not a false
     positive of the search, but it *does* count against P/R above.
   - edge ROC AUC: edge-level searches (splice, ablate) scored against ground-truth edges = the
     edges whose *sender* is a planted node. Score per edge: attribution = its first-order
     estimate's magnitude; acdc / greedy = membership of the returned circuit (0/1,
     ties count 1/2). For planted layer-0 components, downstream senders also carry the shift
     under edge splice / ablate (same caveat as above), which the definition counts as negatives.
   - time (s, search total incl. ranking and pruning) and n_exact (exact hybrid evaluations).
   Edge methods default to attribution and acdc; ``--edge-methods greedy`` adds edge greedy
   (``--edge-max-size``; one exact run per edge per step, slow).

2. Speed on a 4-layer model: planted_pair only makes the 2-layer recall model, so the "4-layer
   bench model" is built here: a seeded native bridge (4 layers, d_model 256, 8 heads, d_mlp
   1024, vocab 1000, the size of ``bench_sweep.py``'s model) whose intervened copy has only the
   planted components' weights perturbed (the same masks as planted_pair); task = random tokens,
   logit difference of two fixed tokens. attribution vs acdc, node graft (and edge splice unless
   ``--four-layer-edges``): time (and, for attribution, the part spent ranking), n_exact, the
   seconds in exact hybrid runs, and whether both return the same circuit.

3. Induction curves (zoo ``induction``): faithfulness vs size along each search's ranking (the
   prefixes growth evaluated exactly: it skips the others), for node graft attribution in both
   directions and edge splice / ablate attribution (intervened->reference).

    .venv/bin/python benchmarks/bench_circuits.py            # full run
    .venv/bin/python benchmarks/bench_circuits.py --quick    # 1 seed x 3 sets

Planted pairs are trained once and cached under ``--cache`` (training dominates a cold run:
~0.1-1 s per step on a loaded 2-core machine; ``--steps`` sets the fine-tune length). On a busy
machine pass ``--threads 1`` (OpenMP threads spin against each other).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

I2R, R2I = "intervened->reference", "reference->intervened"
METHODS = ("attribution", "acdc", "greedy")
NODE_SEMANTICS = ("graft", "splice")
EDGE_SEMANTICS = ("splice", "ablate")
SETS = {
    "A": ("L1H1", "L1.mlp_out"),
    "B": ("L0H2",),
    "C": ("L0H1", "L1H3"),
}


# --- helpers -------------------------------------------------------------------------------------


def site_node(site: Any) -> Any:
    from mechdelta.core.graph import Node

    kind = getattr(site.kind, "value", str(site.kind))
    if kind == "mlp_out":
        return Node("mlp", site.layer)
    if kind.startswith("head"):
        return Node("head", site.layer, site.head)
    raise ValueError(f"cannot map {site} to a node")


def downstream(nodes: set[Any], node: Any) -> bool:
    from mechdelta.core.graph import feeds

    return any(feeds(p, node) or p == node for p in nodes)


def prf(found: set[Any], truth: set[Any]) -> tuple[float, float]:
    tp = len(found & truth)
    prec = tp / len(found) if found else (1.0 if not truth else 0.0)
    rec = tp / len(truth) if truth else 1.0
    return prec, rec


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def search(pair: Any, task: Any, **kw: Any) -> tuple[Any, float, bool]:
    import mechdelta as md

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        c = md.search_circuit(pair, task, progress=False, **kw)
        dt = time.perf_counter() - t0
    warned = any("did not reach" in str(w.message) for w in caught)
    return c, dt, warned


def planted_entry(comps: tuple[str, ...], seed: int, steps: int, cache: Path) -> Any:
    import mechdelta as md
    from mechdelta.zoo.planted import planted_pair

    d = cache / f"s{steps}-{'+'.join(comps)}-seed{seed}"
    if (d / "card.json").exists():
        try:
            return md.zoo.load("planted", d), 0.0
        except Exception as exc:
            print(f"  (cache {d} unreadable: {exc!r}; rebuilding)")
    t0 = time.perf_counter()
    e = planted_pair(comps, seed=seed, steps=steps, out=d)
    return e, time.perf_counter() - t0


def graft_necessary(
    pair: Any, task: Any, planted: set[Any], target: float
) -> tuple[set[Any], float]:
    from mechdelta.circuits._evaluate import Evaluator
    from mechdelta.core.directions import Direction

    ev = Evaluator(
        pair, task, level="node", semantics="graft",
        direction=Direction.coerce(I2R), batch_budget=None, progress=False,
    )  # fmt: skip
    full = list(planted)
    fs = ev.faithfulness([full] + [[q for q in full if q != p] for p in full])
    need = {p for p, f in zip(full, fs[1:], strict=True) if f < target}
    return need, fs[0]


def fmt(x: float, w: int = 5, p: int = 2) -> str:
    return f"{x:{w}.{p}f}" if isinstance(x, float) and math.isfinite(x) else f"{'-':>{w}}"


# --- 1. planted pairs ----------------------------------------------------------------------------


def bench_planted(args: argparse.Namespace) -> dict[str, Any]:
    from mechdelta.core.graph import Node

    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    edge_rows: list[dict[str, Any]] = []
    for set_name in args.sets:
        comps = SETS[set_name]
        for seed in args.seeds:
            entry, built = planted_entry(comps, seed, args.steps, cache)
            pair, task = entry.pair, entry.task
            planted = {site_node(s) for s in entry.ground_truth}
            need, f_p = graft_necessary(pair, task, planted, args.target)
            shift = entry.card.behaviours[0] if hasattr(entry.card, "behaviours") else None
            print(
                f"\n[{set_name}] planted {sorted(map(str, planted))}, seed {seed}"
                + (f" (built in {built:.0f} s)" if built else " (cached)")
                + f": graft f(P) = {f_p:.3f}; graft-necessary N = {sorted(map(str, need))}"
                + (f"; {shift}" if shift is not None and args.verbose else "")
            )
            for sem in NODE_SEMANTICS:
                for m in METHODS:
                    c, dt, _ = search(
                        pair, task, level="node", method=m, semantics=sem, target=args.target
                    )
                    found = {n for n in c.nodes if n != Node("logits")}
                    p, r = prf(found, planted)
                    pn, rn = prf(found, need)
                    pd = sum(downstream(planted, n) for n in found) / len(found) if found else 1.0
                    row = dict(
                        set=set_name, seed=seed, sem=sem, method=m, names=",".join(c.names),
                        f=c.faithfulness, reached=c.reached, p=p, r=r, pn=pn, rn=rn, pd=pd,
                        t=dt, n=int(c.provenance["n_exact"]),
                    )  # fmt: skip
                    rows.append(row)
                    print(
                        f"  node {sem:6} {m:11} f {c.faithfulness:6.3f}{'' if c.reached else '!'} "
                        f"P/R {p:.2f}/{r:.2f}  vsN {pn:.2f}/{rn:.2f}  P+down {pd:.2f}  "
                        f"{dt:6.1f} s  n_exact {row['n']:4}  {{{row['names']}}}"
                    )
            if args.no_edges:
                continue
            for sem in EDGE_SEMANTICS:
                for m in args.edge_methods:
                    c, dt, _warned = search(
                        pair, task, level="edge", method=m, semantics=sem, target=args.target,
                        max_size=args.edge_max_size if m == "greedy" else None,
                    )  # fmt: skip
                    from mechdelta.core.graph import Graph

                    edges = Graph.from_model(pair).edges
                    if m == "attribution":
                        est = c.provenance["estimates"]
                        scores = [abs(float(est[str(e)])) for e in edges]
                    else:
                        members = set(c.edges)
                        scores = [float(e in members) for e in edges]
                    labels = [e.sender in planted for e in edges]
                    auc = roc_auc(scores, labels)
                    row = dict(
                        set=set_name, seed=seed, sem=sem, method=m, auc=auc, f=c.faithfulness,
                        reached=c.reached, size=len(c), t=dt, n=int(c.provenance["n_exact"]),
                    )  # fmt: skip
                    edge_rows.append(row)
                    print(
                        f"  edge {sem:6} {m:11} f {c.faithfulness:6.3f}{'' if c.reached else '!'} "
                        f"AUC {fmt(auc, 4)}  size {len(c):3}/{len(edges)}  {dt:6.1f} s  "
                        f"n_exact {row['n']:4}"
                    )
    return {"rows": rows, "edge_rows": edge_rows}


def summarize_planted(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    out = []
    rows, edge_rows = res["rows"], res["edge_rows"]
    out.append(
        f"Node level, planted pairs (sets {', '.join(args.sets)} x seeds "
        f"{', '.join(map(str, args.seeds))}; target {args.target}; intervened->reference). "
        "Means over pairs; 'exact' = pairs with precision = recall = 1.0 vs planted."
    )
    out.append(
        "| semantics | method | P vs planted | R vs planted | exact | P vs N | R vs N | "
        "P vs planted+downstream | reached | time s | n_exact |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for sem in NODE_SEMANTICS:
        for m in METHODS:
            rs = [r for r in rows if r["sem"] == sem and r["method"] == m]
            if not rs:
                continue
            k = len(rs)

            def mean(key: str, rs: list[dict[str, Any]] = rs, k: int = k) -> float:
                return sum(float(r[key]) for r in rs) / k

            exact = sum(r["p"] == 1.0 and r["r"] == 1.0 for r in rs)
            out.append(
                f"| {sem} | {m} | {mean('p'):.2f} | {mean('r'):.2f} | {exact}/{k} | "
                f"{mean('pn'):.2f} | {mean('rn'):.2f} | {mean('pd'):.2f} | "
                f"{sum(bool(r['reached']) for r in rs)}/{k} | {mean('t'):.1f} | {mean('n'):.0f} |"
            )
    if edge_rows:
        out.append("")
        out.append(
            "Edge level (ground truth = edges whose sender is a planted node; attribution scored "
            "by its estimate, acdc/greedy by membership). Means over pairs."
        )
        out.append(
            "| semantics | method | ROC AUC | faithfulness | reached | size | time s | n_exact |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for sem in EDGE_SEMANTICS:
            for m in args.edge_methods:
                rs = [r for r in edge_rows if r["sem"] == sem and r["method"] == m]
                if not rs:
                    continue
                k = len(rs)
                aucs = [r["auc"] for r in rs if math.isfinite(r["auc"])]
                auc = sum(aucs) / len(aucs) if aucs else math.nan
                out.append(
                    f"| {sem} | {m} | {fmt(auc, 4)} | {sum(r['f'] for r in rs) / k:.3f} | "
                    f"{sum(bool(r['reached']) for r in rs)}/{k} | "
                    f"{sum(r['size'] for r in rs) / k:.1f} | {sum(r['t'] for r in rs) / k:.1f} | "
                    f"{sum(r['n'] for r in rs) / k:.0f} |"
                )
    return out


# --- 2. the 4-layer model ------------------------------------------------------------------------


def four_layer_pair(args: argparse.Namespace) -> tuple[Any, Any, set[Any]]:
    import mechdelta as md
    from mechdelta.core.sites import Site
    from mechdelta.zoo._models import build_model
    from mechdelta.zoo.planted import component_masks

    cfg: dict[str, Any] = {
        "n_layers": 4, "d_model": 256, "n_heads": 8, "d_head": 32, "d_mlp": 1024,
        "d_vocab": 1000, "n_ctx": 64, "act_fn": "gelu", "model_name": "bench-circuits-4l",
    }  # fmt: skip
    reference, intervened = build_model(cfg, seed=0), build_model(cfg, seed=0)
    comps = [Site.parse(s) for s in args.four_layer_components]
    masks = component_masks(intervened, comps)
    gen = torch.Generator().manual_seed(7)
    state = intervened.state_dict()
    with torch.no_grad():
        for key, mask in masks.items():
            w = state[key]
            noise = torch.randn(w.shape, generator=gen) * float(w.std()) * args.four_layer_scale
            w.add_(noise * mask)
    intervened.load_state_dict(state)
    pair = md.ModelPair(reference, intervened, names=("bench-4l-ref", "bench-4l-planted"))
    tok = torch.randint(0, cfg["d_vocab"], (args.four_layer_batch, 20), generator=gen)
    task = md.Task(
        tok, answers=torch.full((len(tok),), 11), wrong=torch.full((len(tok),), 12),
        metric="logit_diff", name="4l-logit-diff",
    )  # fmt: skip
    return pair, task, {site_node(s) for s in comps}


def bench_four_layer(
    args: argparse.Namespace,
) -> tuple[list[str], list[tuple[str, str, float, bool]]]:
    from mechdelta.core.graph import Node

    pair, task, planted = four_layer_pair(args)
    print(
        f"\n4-layer model, planted {sorted(map(str, planted))} (weights perturbed x{args.four_layer_scale} std)"
    )
    configs = [("node", "graft")] + ([("edge", "splice")] if args.four_layer_edges else [])
    out = [
        f"4-layer model (4 layers, d_model 256, 8 heads, d_mlp 1024; planted "
        f"{', '.join(sorted(map(str, planted)))}; {args.four_layer_batch} prompts; target "
        f"{args.target}):",
        "| level / semantics | method | time s | of which ranking s | exact runs s | n_exact |"
        " faithfulness | size | nodes P/R vs planted | same circuit as acdc | speed-up vs acdc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for level, sem in configs:
        res = {}
        for m in ("acdc", "attribution"):
            c, dt, _ = search(pair, task, level=level, method=m, semantics=sem, target=args.target)
            res[m] = (c, dt)
            found = {n for n in c.nodes if n != Node("logits")}
            p, r = prf(found, planted)
            print(
                f"  {level} {sem:6} {m:11} {dt:7.2f} s  n_exact {c.provenance['n_exact']:5}  "
                f"(ranking {fmt(c.provenance['timings'].get('rank_s', math.nan), 1, 2)} s, exact "
                f"runs {c.provenance['exact_seconds']:.2f} s)  "
                f"f {c.faithfulness:.3f}{'' if c.reached else '!'}  size {len(c)}  "
                f"P/R {p:.2f}/{r:.2f}  {{{','.join(c.names)}}}"
            )
        ca, ta = res["attribution"]
        cc, tc = res["acdc"]
        same = set(ca.members) == set(cc.members)
        for m in ("acdc", "attribution"):
            c, dt = res[m]
            found = {n for n in c.nodes if n != Node("logits")}
            p, r = prf(found, planted)
            rank_s = c.provenance["timings"].get("rank_s", math.nan)
            out.append(
                f"| {level} {sem} | {m} | {dt:.2f} | {fmt(rank_s, 1, 2)} | "
                f"{c.provenance['exact_seconds']:.2f} | {c.provenance['n_exact']} | "
                f"{c.faithfulness:.3f}{'' if c.reached else ' (not reached)'} | {len(c)} | "
                f"{p:.2f}/{r:.2f} | {'-' if m == 'acdc' else ('yes' if same else 'no')} | "
                f"{'-' if m == 'acdc' else f'{tc / ta:.1f}x'} |"
            )
        verdicts.append((level, sem, tc / ta, same))
    return out, verdicts


# --- 3. induction curves -------------------------------------------------------------------------


def bench_induction(args: argparse.Namespace) -> list[str]:
    import mechdelta as md

    entry = md.zoo.load("induction")
    pair, task = entry.pair, entry.task
    runs = [
        ("node", "graft", I2R, None, "attribution"),
        ("node", "graft", R2I, None, "attribution"),
        ("node", "graft", R2I, None, "greedy"),
        ("edge", "splice", I2R, args.induction_edge_max, "attribution"),
        ("edge", "ablate", I2R, args.induction_edge_max, "attribution"),
        ("edge", "graft", R2I, args.induction_edge_max, "attribution"),
    ]
    if args.induction_graft_i2r:  # minutes: mostly the pruning of a ~36-member circuit
        runs.append(("edge", "graft", I2R, args.induction_edge_max, "attribution"))
    out = [
        "Induction (zoo 'induction', task second_copy_loss): faithfulness of the prefixes of the "
        "attribution ranking that growth evaluated exactly (size: f; growth skips the others); "
        "* = the returned (pruned) circuit.",
    ]
    print("\ninduction curves:")
    for level, sem, d, cap, method in runs:
        c, dt, _ = search(
            pair, task, level=level, method=method, semantics=sem, direction=d,
            target=args.target, max_size=cap,
        )  # fmt: skip
        pts = sorted(c.curve)
        if len(pts) > 24:  # thin long edge curves for the printout
            step = math.ceil(len(pts) / 24)
            pts = pts[::step] + ([pts[-1]] if pts[-1] not in pts[::step] else [])
        curve = ", ".join(f"{s}: {f:.2f}" for s, f in pts)
        head = (
            f"- {level} {sem} ({method}), {d}{'' if cap is None else f', max_size {cap}'}: returned "
            f"{len(c)}* members, f = {c.faithfulness:.3f}{'' if c.reached else ' (NOT reached)'}, "
            f"{dt:.1f} s, {c.provenance['n_exact']} exact"
        )
        if level == "node":
            head += f" {{{', '.join(c.names)}}}"
        else:
            k_comp = [str(e) for e in c.edges if str(e).startswith("L0H3 -> L1") and e.input == "k"]
            head += f"; K-composition edges: {', '.join(k_comp) or 'none'}"
            head += "; with unembed" if "unembed" in c.names else ""
        print(head + "\n    " + curve)
        out.append(head)
        out.append(f"  - curve: {curve}")
    return out


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed (0) instead of 3")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--steps", type=int, default=300, help="planted fine-tune steps")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--cache", default=os.path.join("~", ".cache", "mechdelta", "bench_circuits"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-edges", action="store_true", help="skip the planted edge-level searches")
    ap.add_argument("--edge-methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--edge-max-size", type=int, default=24, help="edge greedy's max_size")
    ap.add_argument("--induction-edge-max", type=int, default=None)
    ap.add_argument(
        "--induction-graft-i2r",
        action="store_true",
        help="also the edge graft intervened->reference search on the induction pair (minutes)",
    )
    ap.add_argument("--four-layer-components", nargs="+", default=["L1H3", "L3H5"])
    ap.add_argument("--four-layer-scale", type=float, default=1.0)
    ap.add_argument("--four-layer-batch", type=int, default=16)
    ap.add_argument(
        "--four-layer-edges",
        action="store_true",
        help="also edge splice on the 4-layer model (slow)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["planted", "4layer", "induction"])
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.edge_methods is None:
        args.edge_methods = ["attribution", "acdc"]
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    print(
        f"bench_circuits: threads {args.threads}, load {os.getloadavg()[0]:.1f}, "
        f"{'quick' if args.quick else 'full'} run"
    )

    lines: list[str] = []
    targets: list[str] = []
    if "planted" not in args.skip:
        res = bench_planted(args)
        lines += summarize_planted(res, args)
        for m in ("attribution", "acdc"):
            for sem in NODE_SEMANTICS:
                rs = [r for r in res["rows"] if r["method"] == m and r["sem"] == sem]
                ok = all(r["p"] == 1.0 and r["r"] == 1.0 for r in rs)
                okn = all(r["pn"] == 1.0 and r["rn"] == 1.0 for r in rs)
                targets.append(
                    f"target precision = recall = 1.0 vs planted ({m}, node {sem}): "
                    f"{'met' if ok else 'NOT met'} "
                    f"({sum(r['p'] == 1.0 and r['r'] == 1.0 for r in rs)}/{len(rs)} pairs; vs "
                    f"graft-necessary set: {'met' if okn else 'not met'})"
                )
        for sem in EDGE_SEMANTICS:  # the 2-layer edge graphs (110 edges): speed at edge level
            ea = [r for r in res["edge_rows"] if r["sem"] == sem and r["method"] == "attribution"]
            ec = [r for r in res["edge_rows"] if r["sem"] == sem and r["method"] == "acdc"]
            if ea and ec:
                ratio = sum(r["t"] for r in ec) / sum(r["t"] for r in ea)
                same = sum(ra["size"] == rc["size"] for ra, rc in zip(ea, ec, strict=True))
                targets.append(
                    f"(2-layer planted, edge {sem}) attribution {ratio:.1f}x faster than acdc; "
                    f"equal circuit size in {same}/{len(ea)} pairs"
                )
    if "4layer" not in args.skip:
        out, verdicts = bench_four_layer(args)
        lines += ["", *out]
        for level, sem, ratio, same in verdicts:
            ok = ratio >= 10 and same
            targets.append(
                f"target attribution >= 10x faster than acdc at equal result (4-layer, {level} "
                f"{sem}): {'met' if ok else 'NOT met'} ({ratio:.1f}x, "
                f"{'same' if same else 'different'} circuit)"
            )
    if "induction" not in args.skip:
        lines += ["", *bench_induction(args)]

    print("\n" + "=" * 100)
    print("\n".join(lines))
    print()
    for t in targets:
        print(t)
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
