"""Calibration of claims: false positives on null pairs, power on the planted pair.

``result.p`` / ``result.q`` test per site "this splice changes the target's metric" (paired
sign-flip test over prompts, Benjamini-Hochberg across the grid), and ``mechdelta.claims`` states
only what the data warrant (the shift itself must be distinguishable from 0, then q < alpha and
|effect| >= 5% of the shift). This script measures, at alpha = 0.05 and for 8 ... 256 prompts:

1. false positives on *null pairs* (no behavioural shift by construction):
   - the zoo's ``null`` pair (two continuations of training, recall task),
   - the zoo's ``planted_seed`` pair (the planted fine-tune under two data seeds, trigger task),
   - pairs drawn here: two copies of the recall model, each with iid Gaussian noise on every
     weight (``--noise`` x the tensor's RMS, 1% by default: the size of the ``null`` entry's
     weight changes), different noise seeds (recall task).
   Per prompt count: the fraction of *testable* sites (whose spliced activations differ) with
   q < 0.05, the fraction of grids (component x direction) with at least one such site
   (family-wise), how often the shift gate of ``claims()`` passes, the fraction of prompt draws
   in which ``claims()`` on the head_out or mlp_out sweep states anything, and, for the noisy
   pairs, in which a claim exceeds seed variation (``control=`` the same sweep on another noisy
   pair, an exchangeable control);
2. the per-site test on *synthetic* null grids (iid per-prompt differences with mean 0, Gaussian
   and skewed): KS distance of the p-values from uniform, P(p <= 0.05), and the BH / family-wise
   rejection rates;
3. power on the ``planted`` pair (trigger task): the fraction of prompt draws in which the
   ground-truth components (head L1H1 in the head_out grid, the layer-1 MLP in the mlp_out grid)
   have q < 0.05 in both directions, and in which ``claims()`` claims both in both directions.

Prompt draws are disjoint subsets of a pool of ``--pool`` fresh prompts made with the zoo's
recall-task generator (seed ``50000 + --seed``, not the entries' stored 64 prompts), so the draws
of one count are independent samples (at most ``pool // n`` of them). Each pair is swept once on
its whole pool; a draw's results are the pool results restricted to the drawn prompts (a splice's
per-prompt metric does not depend on the other prompts in the batch; the script checks this
against a direct sweep), with the shift's and scores' bootstrap intervals recomputed on the draw.

    .venv/bin/python benchmarks/bench_calibration.py           # the README's table (~3 min)
    .venv/bin/python benchmarks/bench_calibration.py --quick   # smoke run

Deterministic given ``--seed`` (the numbers do not depend on ``--threads``). One torch thread is
the default: the zoo's models are tiny, and with more runnable processes than cores two threads
spin against each other (the header prints the load average).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
import warnings
from typing import Any

import torch

COUNTS = (8, 16, 32, 64, 128, 256)
COMPONENTS = ("head_out", "mlp_out")


# --- prompts and pairs ---------------------------------------------------------------------------


def recall_tasks(n: int, seed: int) -> dict[str, Any]:
    """``n`` fresh key-value recall prompts as the zoo's recall and trigger tasks (same metrics)."""
    from mechdelta import Task
    from mechdelta.zoo._recall import TRIGGER
    from mechdelta.zoo._recall_base import DATA

    gen = torch.Generator().manual_seed(seed)
    tokens, answers = DATA.prompts(gen, n)
    values = tokens[:, 2 : 2 * DATA.n_pairs + 1 : 2]
    distractor = DATA.successor(answers)
    for b in range(n):  # another value in the prompt, as the zoo's recall task
        others = [int(v) for v in values[b] if int(v) != int(answers[b])]
        if others:
            distractor[b] = others[0]
    trig = tokens.clone()
    trig[:, -2] = TRIGGER
    return {
        "recall": Task(
            tokens, answers=answers, wrong=distractor, metric="logit_diff", name="recall"
        ),
        "trigger": Task(
            trig,
            answers=DATA.successor(answers),
            wrong=answers,
            corrupted=tokens,
            metric="logit_diff",
            name="trigger",
        ),
    }


def noisy_pair(base: Any, noise: float, seed: int) -> Any:
    """Two copies of ``base``, each with iid N(0, (noise * rms)^2) added to every weight tensor."""
    from mechdelta import ModelPair
    from mechdelta.zoo._models import copy_model
    from mechdelta.zoo._recall_base import MODEL

    models = []
    for k in (0, 1):
        model = copy_model(base, MODEL)
        gen = torch.Generator().manual_seed(10_000 + 2 * seed + k)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                rms = float(p.double().pow(2).mean().sqrt())
                p.add_(noise * rms * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        models.append(model.eval())
    return ModelPair(models[0], models[1], names=(f"noisy{seed}/a", f"noisy{seed}/b"))


def sweep_all(pair: Any, task: Any, args: argparse.Namespace) -> dict[str, Any]:
    import mechdelta as md

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", md.ShiftNotSignificantWarning)
        for comp in COMPONENTS:
            out[comp] = md.sweep(pair, task, comp, "both", n_boot=args.n_boot, progress=False)
        if args.per_position:
            out["head_out@pos"] = md.sweep(
                pair,
                task,
                "head_out",
                "both",
                per_position=True,
                n_boot=args.n_boot,
                progress=False,
            )
    return out


# --- restricting a sweep to a prompt draw --------------------------------------------------------


def restrict(both: Any, idx: torch.Tensor, n_boot: int) -> Any:
    """The sweep (both directions) restricted to prompts ``idx``, intervals recomputed."""
    from mechdelta.patching.results import BothDirections
    from mechdelta.stats.bootstrap import Bootstrap, paired_shift_ci, score_ci

    first = both.reference_to_intervened
    shift = first.shift
    ref, itv = shift.reference[idx], shift.intervened[idx]
    boot = Bootstrap(n_boot, shift.alpha, int(first.provenance.get("seed", 0)))
    lo, hi = (float(x) for x in paired_shift_ci(ref, itv, boot))
    sub_shift = dataclasses.replace(shift, reference=ref, intervened=itv, ci=(lo, hi))
    singles = []
    for r in both:
        per = r.per_prompt[..., idx]
        grid = per.shape[:-1]
        ci = score_ci(
            ref,
            itv,
            per.reshape(-1, len(idx)),
            boot,
            toward_reference=r.direction.toward_reference,
        ).reshape(*grid, 2)
        singles.append(dataclasses.replace(r, per_prompt=per, ci=ci, shift=sub_shift))
    return BothDirections(singles[0], singles[1])


def check_restrict(pair: Any, pool_task: Any, pooled: Any, args: argparse.Namespace) -> float:
    """Max |difference| between a restricted pool sweep and a direct sweep on the same prompts."""
    import mechdelta as md

    idx = torch.arange(0, 2 * 16, 2)
    direct_task = pool_task.subset(idx.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", md.ShiftNotSignificantWarning)
        direct = md.sweep(pair, direct_task, "head_out", "both", n_boot=args.n_boot, progress=False)
    sub = restrict(pooled, idx, args.n_boot)
    worst = 0.0
    for a, b in zip(sub, direct, strict=True):
        worst = max(worst, float((a.per_prompt - b.per_prompt).abs().max()))
        worst = max(worst, float((a.shift.reference - b.shift.reference).abs().max()))
    return worst


def draws(pool: int, n: int, k: int, seed: int) -> list[torch.Tensor]:
    """Up to ``k`` disjoint prompt subsets of size ``n`` (blocks of one random permutation of the
    pool): independent samples of the prompt distribution, ``pool // n`` of them at most."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    perm = torch.randperm(pool, generator=gen)
    return [perm[i : i + n] for i in range(0, pool - n + 1, n)][:k]


def cache_sign_patterns() -> None:
    """Reuse the per-site test's resampling patterns across calls.

    ``p_values`` regenerates its ``n_resamples x n`` sign patterns (seeded, so identical for a
    given prompt count and test) on every call; that dominated this script's run time. Caching
    them changes no p-value.
    """
    import functools

    from mechdelta.stats import testing

    if not hasattr(testing._signs, "cache_info"):
        cached = functools.lru_cache(maxsize=32)(testing._signs)
        testing._signs = cached  # type: ignore[assignment]


def median_skewness(sweeps: dict[str, Any]) -> float:
    """Median |sample skewness| of ``patched - target`` over prompts, across testable sites."""
    from mechdelta.patching.results import target_metric

    values = []
    for both in sweeps.values():
        for r in both:
            d = r.per_prompt.double().reshape(-1, r.per_prompt.shape[-1])
            d = d - target_metric(r.direction, r.shift).double()
            d = d[(r.activation_delta != 0).flatten()]
            c = d - d.mean(1, keepdim=True)
            sd = c.pow(2).mean(1).sqrt()
            ok = sd > 0
            values.append((c[ok].pow(3).mean(1) / sd[ok].pow(3)).abs())
    allv = torch.cat(values)
    return float(allv.median()) if allv.numel() else float("nan")


# --- 1. null pairs -------------------------------------------------------------------------------


def _pool_shift(shift: Any, alpha: float) -> str:
    from mechdelta.stats.testing import SiteTest, p_values

    d = (shift.intervened - shift.reference).double().unsqueeze(0)
    p = float(p_values(d, SiteTest())[0])
    lo, hi = shift.ci
    return f"{shift.shift:+.4f} [{lo:+.4f}, {hi:+.4f}], p = {p:.3g}"


def null_rates(
    sweeps: dict[str, Any],
    args: argparse.Namespace,
    pair_seed: int,
    control: dict[str, Any] | None = None,
) -> dict[int, dict[str, float]]:
    """Per prompt count, summed over the draws: testable sites and their rejections, grids with
    a rejection, cases (draws) with any claim, with the shift gate passed, and (with a control
    pair's sweeps) with a claim beyond seed variation."""
    import mechdelta as md
    from mechdelta.stats.claims import _shift_check  # the gate claims() applies

    out: dict[int, dict[str, float]] = {}
    for n in args.counts:
        acc = dict.fromkeys(
            ("sites", "rejected", "grids", "grids_any", "cases", "claimed", "shift_ok"), 0
        )
        acc.update(controlled=0, beyond=0)
        for idx in draws(args.pool, n, args.draws, args.seed + pair_seed):
            any_claim = beyond = False
            for comp, both in sweeps.items():
                sub = restrict(both, idx, args.n_boot)
                for r in sub:
                    testable = r.activation_delta != 0
                    rej = r.significant(args.alpha) & testable
                    acc["sites"] += int(testable.sum())
                    acc["rejected"] += int(rej.sum())
                    acc["grids"] += 1
                    acc["grids_any"] += int(bool(rej.any()))
                ctrl = None if control is None else restrict(control[comp], idx, args.n_boot)
                found = md.claims(sub, args.alpha, control=ctrl)
                any_claim |= bool(found)
                beyond |= any(c.exceeds_control for c in found)
            first = sub.reference_to_intervened
            acc["cases"] += 1
            acc["claimed"] += int(any_claim)
            acc["shift_ok"] += int(_shift_check(first.shift, args.alpha, first.testing)[0])
            acc["controlled"] += int(control is not None)
            acc["beyond"] += int(beyond)
        out[n] = acc
    return out


def merge(rows: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    total: dict[int, dict[str, float]] = {}
    for row in rows:
        for n, acc in row.items():
            t = total.setdefault(n, dict.fromkeys(acc, 0))
            for k, v in acc.items():
                t[k] += v
    return total


def frac(a: float, b: float) -> float:
    return a / b if b else float("nan")


# --- 2. synthetic nulls --------------------------------------------------------------------------


def synthetic(args: argparse.Namespace) -> list[dict[str, Any]]:
    """p-values of the default test on null grids of iid differences (mean exactly 0)."""
    from mechdelta.stats.testing import SiteTest, adjust, p_values

    rows = []
    for kind in ("gaussian", "skewed"):
        for n in args.counts:
            gen = torch.Generator().manual_seed(
                args.seed * 7919 + n + (0 if kind == "gaussian" else 1)
            )
            g, s = args.grids, args.grid_sites
            if kind == "gaussian":
                d = torch.randn(g * s, n, generator=gen, dtype=torch.float64)
            else:  # centred exponential: mean 0, skewness -2 (a stress test)
                d = -torch.empty(g * s, n, dtype=torch.float64).exponential_(1.0, generator=gen)
                d = d + 1.0
            p = p_values(d, SiteTest(seed=args.seed))
            q = torch.stack([adjust(row, "bh") for row in p.reshape(g, s)])  # BH per grid
            sorted_p = torch.sort(p).values
            m = p.numel()
            grid = torch.arange(1, m + 1, dtype=torch.float64) / m
            ks = float(torch.maximum(grid - sorted_p, sorted_p - (grid - 1.0 / m)).max())
            rows.append(
                dict(
                    kind=kind,
                    n=n,
                    ks=ks,
                    ks_crit=1.358 / math.sqrt(m),
                    p05=float((p <= args.alpha).double().mean()),
                    site_fpr=float((q < args.alpha).double().mean()),
                    fwer=float((q < args.alpha).any(1).double().mean()),
                )
            )
    return rows


# --- 3. power ------------------------------------------------------------------------------------


def power(sweeps: dict[str, Any], args: argparse.Namespace) -> dict[int, dict[str, float]]:
    import mechdelta as md
    from mechdelta import Site

    targets = {"head_out": Site("head_out", 1, head=1), "mlp_out": Site("mlp_out", 1)}
    out: dict[int, dict[str, float]] = {}
    for n in args.counts:
        acc = dict(head=0, mlp=0, both=0, claimed=0, draws=0)
        for idx in draws(args.pool, n, args.draws, args.seed + 99):
            sig, claimed = {}, {}
            for comp, site in targets.items():
                sub = restrict(sweeps[comp], idx, args.n_boot)
                at = sub.reference_to_intervened.sites.index(site)
                sig[comp] = all(bool(r.significant(args.alpha).flatten()[at]) for r in sub)
                dirs = {c.direction for c in md.claims(sub, args.alpha) if c.site == site}
                claimed[comp] = len(dirs) == 2
            acc["head"] += int(sig["head_out"])
            acc["mlp"] += int(sig["mlp_out"])
            acc["both"] += int(all(sig.values()))
            acc["claimed"] += int(all(claimed.values()))
            acc["draws"] += 1
        out[n] = {k: frac(v, acc["draws"]) for k, v in acc.items() if k != "draws"}
        out[n]["draws"] = acc["draws"]
    return out


# --- report --------------------------------------------------------------------------------------


def wilson_low(k: int, m: int, z: float = 1.96) -> float:
    """Lower end of the 95% Wilson interval of a proportion k / m."""
    if m == 0:
        return 0.0
    p = k / m
    centre = p + z * z / (2 * m)
    half = z * math.sqrt(p * (1 - p) / m + z * z / (4 * m * m))
    return (centre - half) / (1 + z * z / m)


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def report(
    nulls: dict[str, dict[int, dict[str, float]]],
    synth: list[dict[str, Any]],
    pw: dict[int, dict[str, float]],
    args: argparse.Namespace,
) -> None:
    a = args.alpha
    print(f"\n## False positives on null pairs (alpha = {a:g}, BH per grid)\n")
    print(
        "| pairs | prompts | draws | testable sites with q < 0.05 | grids with >= 1 | "
        "shift gate passed | any claim | any claim beyond seed variation |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family, rates in nulls.items():
        for n, acc in rates.items():
            print(
                f"| {family} | {n} | {int(acc['cases'])} | "
                f"{pct(frac(acc['rejected'], acc['sites']))} | "
                f"{pct(frac(acc['grids_any'], acc['grids']))} | "
                f"{pct(frac(acc['shift_ok'], acc['cases']))} | "
                f"{pct(frac(acc['claimed'], acc['cases']))} | "
                f"{pct(frac(acc['beyond'], acc['controlled']))} |"
            )
    total = merge(list(nulls.values()))
    print("\nAll null pairs together:\n")
    print("| prompts | cases | site rejections | grids with >= 1 | any claim |")
    print("|---|---|---|---|---|")
    for n, acc in total.items():
        print(
            f"| {n} | {int(acc['cases'])} | {pct(frac(acc['rejected'], acc['sites']))} | "
            f"{pct(frac(acc['grids_any'], acc['grids']))} | "
            f"{pct(frac(acc['claimed'], acc['cases']))} |"
        )

    print(f"\n## Synthetic null grids ({args.grids} grids x {args.grid_sites} sites per row)\n")
    print(
        "| differences | prompts | KS vs uniform (5% crit.) | P(p <= 0.05) | site FPR (BH) | "
        "grids with >= 1 (BH) |"
    )
    print("|---|---|---|---|---|---|")
    for r in synth:
        print(
            f"| {r['kind']} | {r['n']} | {r['ks']:.4f} ({r['ks_crit']:.4f}) | {pct(r['p05'])} | "
            f"{pct(r['site_fpr'])} | {pct(r['fwer'])} |"
        )

    print("\n## Power on the planted pair (trigger task)\n")
    print(
        "| prompts | draws | L1H1 q < 0.05 both dirs | L1 MLP q < 0.05 both dirs | both | "
        "both claimed |"
    )
    print("|---|---|---|---|---|---|")
    for n, r in pw.items():
        print(
            f"| {n} | {int(r['draws'])} | {pct(r['head'])} | {pct(r['mlp'])} | {pct(r['both'])} | "
            f"{pct(r['claimed'])} |"
        )

    def first(key: str) -> str:
        ns = [n for n, r in pw.items() if r[key] >= 0.8]
        return str(min(ns)) if ns else f"> {max(pw)}"

    print(
        f"\n80% power: significant (both components, both directions) from {first('both')} "
        f"prompts; claimed from {first('claimed')} prompts."
    )

    def counts(rates: dict[int, dict[str, float]], num: str, den: str) -> list[tuple[int, int]]:
        return [(int(acc[num]), int(acc[den])) for acc in rates.values()]

    def synth_counts(kind: str, key: str, den: int) -> list[tuple[int, int]]:
        return [(round(r[key] * den), den) for r in synth if r["kind"] == kind]

    n_p, n_g = args.grids * args.grid_sites, args.grids
    lines = [
        ("synthetic Gaussian nulls: P(p <= 0.05) per site", synth_counts("gaussian", "p05", n_p)),
        (
            "synthetic Gaussian nulls: grids with q < 0.05 (BH)",
            synth_counts("gaussian", "fwer", n_g),
        ),
        ("synthetic skewed nulls (stress): P(p <= 0.05)", synth_counts("skewed", "p05", n_p)),
        (
            "synthetic skewed nulls (stress): grids with q < 0.05",
            synth_counts("skewed", "fwer", n_g),
        ),
    ]
    for family, rates in nulls.items():
        lines.append((f"{family}: draws with any claim", counts(rates, "claimed", "cases")))
        if any(acc["controlled"] for acc in rates.values()):
            lines.append(
                (
                    f"{family}: draws with a claim beyond seed variation",
                    counts(rates, "beyond", "controlled"),
                )
            )
    lines.append(("all null pairs: draws with any claim", counts(total, "claimed", "cases")))
    lines.append(
        ("all null pairs: testable sites with q < 0.05 (note)", counts(total, "rejected", "sites"))
    )
    print(
        f"\nTargets (issue: false-positive rate <= {a:.0%} at every prompt count; worst count "
        "shown; 'not met' when the rate's 95% Wilson interval lies above it, 'met within "
        "Monte Carlo error' when only the estimate does):"
    )
    for label, cs in lines:
        rate, (k, m) = max(((frac(k, m), (k, m)) for k, m in cs if m), default=(0.0, (0, 0)))
        low = max((wilson_low(k, m) for k, m in cs if m), default=0.0)
        verdict = "met" if rate <= a else ("NOT met" if low > a else "met within Monte Carlo error")
        print(f"- {label}: worst {pct(rate)} ({k}/{m}): target {verdict}")
    print(
        "\nNote: on a null pair every site whose weights differ changes the metric a little, so "
        "its per-site null (the splice leaves the metric's mean unchanged) is false and q < 0.05 "
        "there is a correct detection of a tiny effect, more frequent with more prompts; and no "
        "two distinct checkpoints have a shift of exactly 0 (the pool shifts above). Claims are "
        "gated on the shift being distinguishable from 0, not on its size."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer draws, smaller pools")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for these tiny models)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    ap.add_argument("--draws", type=int, default=20, help="prompt draws per count and pair")
    ap.add_argument("--pool", type=int, default=2048, help="fresh prompts per pair")
    ap.add_argument("--noisy-pairs", type=int, default=4, help="noisy-copy null pairs")
    ap.add_argument("--noise", type=float, default=0.01, help="noise std / weight RMS")
    ap.add_argument("--grids", type=int, default=100, help="synthetic null grids per row")
    ap.add_argument("--grid-sites", type=int, default=50, help="sites per synthetic grid")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (intervals)")
    ap.add_argument(
        "--per-position", action="store_true", help="also sweep head_out by position (slow)"
    )
    args = ap.parse_args()
    if args.quick:
        args.draws, args.pool, args.noisy_pairs, args.grids = 5, 512, 2, 20
    if max(args.counts) > args.pool:
        ap.error(f"--pool {args.pool} is smaller than the largest prompt count")
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cache_sign_patterns()

    import mechdelta as md

    print(
        f"mechdelta {md.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f}; counts {args.counts}, {args.draws} draws, "
        f"pool {args.pool}, {args.noisy_pairs} noisy pairs (noise {args.noise:g}), "
        f"seed {args.seed}",
        flush=True,
    )
    tasks = recall_tasks(args.pool, 50_000 + args.seed)
    planted = md.zoo.load("planted")
    pairs: list[tuple[str, Any, Any]] = [
        ("zoo null (recall)", md.zoo.load("null").pair, tasks["recall"]),
        ("zoo planted_seed (trigger)", md.zoo.load("planted_seed").pair, tasks["trigger"]),
    ]
    for k in range(args.noisy_pairs):
        pair = noisy_pair(planted.pair.reference, args.noise, args.seed + k)
        pairs.append((f"noisy copies #{k}", pair, tasks["recall"]))

    swept: list[tuple[str, str, dict[str, Any]]] = []
    for i, (label, pair, task) in enumerate(pairs):
        t0 = time.perf_counter()
        sweeps = sweep_all(pair, task, args)
        if i == 0:
            worst = check_restrict(pair, task, sweeps["head_out"], args)
            print(f"  restricted pool sweep vs direct sweep: max |diff| {worst:.2e}", flush=True)
            if worst > 1e-4:
                raise SystemExit("restricting a pool sweep does not reproduce a direct sweep")
        shift = sweeps["head_out"].shift
        gate = _pool_shift(shift, args.alpha)
        print(
            f"  {label}: sweeps {time.perf_counter() - t0:.1f} s; shift on all {args.pool} "
            f"prompts {gate}; median |skewness| of the testable sites' per-prompt differences "
            f"{median_skewness(sweeps):.2f}",
            flush=True,
        )
        family = label if label.startswith("zoo") else "noisy copies"
        swept.append((label, family, sweeps))

    t0 = time.perf_counter()
    nulls: dict[str, list[dict[int, dict[str, float]]]] = {}
    noisy = [i for i, (_, family, _) in enumerate(swept) if family == "noisy copies"]
    for i, (_, family, sweeps) in enumerate(swept):
        control = None
        if i in noisy and len(noisy) > 1:  # another noisy pair: an exchangeable control
            control = swept[noisy[(noisy.index(i) + 1) % len(noisy)]][2]
        nulls.setdefault(family, []).append(null_rates(sweeps, args, 17 * i, control))
    print(f"  null-pair draws: {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    synth = synthetic(args)
    print(f"  synthetic nulls: {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", md.ShiftNotSignificantWarning)
        planted_sweeps = {
            c: md.sweep(
                planted.pair, tasks["trigger"], c, "both", n_boot=args.n_boot, progress=False
            )
            for c in COMPONENTS
        }
    pw = power(planted_sweeps, args)
    print(f"  power (planted): {time.perf_counter() - t0:.1f} s", flush=True)

    report({k: merge(v) for k, v in nulls.items()}, synth, pw, args)
    load = os.getloadavg()[0]
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s wall, "
        f"{time.process_time() - cpu_start:.0f} s CPU; load average at the end {load:.1f}"
    )


if __name__ == "__main__":
    main()
