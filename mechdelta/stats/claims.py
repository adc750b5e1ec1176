"""Warranted claims: the statements about a shift's parts that the data support.

:func:`claims` turns a patching result into sentences a researcher or an auditor can put in a
paper or an incident record, and keeps out the ones the data do not warrant:

1. Claims are about the *shift*. When the shift itself (mean ``intervened - reference`` over the
   prompts) is not distinguishable from zero, by its bootstrap interval and a sign-flip test at
   ``alpha``, there is no claim at all and :attr:`Claims.reason` says why.
2. A site is claimed when its splice changes the target's metric with ``q < alpha`` (the result's
   per-site test, adjusted across its whole grid: :attr:`~mechdelta.SweepResult.q`) and its effect
   (fraction of the shift, the result's score) is at least ``min_effect`` in magnitude.
3. With ``control=`` (the same analysis on a control pair: a re-run of the intervention with
   another seed, or a pair with no intervention such as the zoo's ``null`` pair), every claim also
   states whether its effect exceeds what seed variation alone produces: the site's effect in
   metric units, ``|mean(patched - target)|``, against the ``1 - alpha`` quantile of the same
   quantity over the sites of the control result whose splice moves the metric at all (the null
   distribution of per-site effects; sites with exactly zero effect in the control are left out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Site
from mechdelta.errors import ConfigError
from mechdelta.stats.testing import Correction, SiteTest, TestKind, format_p, p_values

if TYPE_CHECKING:
    import pandas as pd

    from mechdelta.patching.results import PatchResult, SweepResult
    from mechdelta.patching.shift import ShiftResult
    from mechdelta.stats.reliability import Reliability

__all__ = ["Claim", "Claims", "claims"]


@dataclass(frozen=True)
class Claim:
    """One warranted statement: splicing ``site`` in ``direction`` moves ``effect`` of the shift.

    ``effect``: fraction of the shift (reference -> intervened: undone by restoring the site from
    the reference; intervened -> reference: carried by the site into the reference). ``ci``: its
    bootstrap interval over prompts. ``q``: the adjusted p-value of the site's test. ``exceeds_control``
    is None without a control, else whether ``|delta|`` (metric units) is above
    ``control_threshold``.
    """

    site: Site | tuple[Site, ...]
    direction: Direction
    effect: float
    ci: tuple[float, float]
    p: float
    q: float
    n_prompts: int
    test: str
    delta: float
    exceeds_control: bool | None = None
    control_threshold: float | None = None

    @property
    def label(self) -> str:
        if isinstance(self.site, Site):
            return str(self.site)
        return "{" + ", ".join(str(s) for s in self.site) + "}"

    @property
    def text(self) -> str:
        """The claim as one sentence."""
        pct = f"{abs(self.effect):.0%} [{_pct(self.ci[0])}, {_pct(self.ci[1])}]"
        verb_sign = self.effect >= 0
        if self.direction.toward_reference:
            verb = "undoes" if verb_sign else "widens the shift by"
            head = f"restoring {self.label} from the reference {verb} {pct}"
        else:
            verb = "carries" if verb_sign else "pushes against the shift by"
            head = f"putting {self.label} from the intervened model into the reference {verb} {pct}"
        if verb_sign:
            head += " of the shift"
        out = f"{head}; {format_p(self.q)}; {self.n_prompts} prompts"
        if self.exceeds_control is not None and self.control_threshold is not None:
            word = "exceeds" if self.exceeds_control else "does not exceed"
            out += (
                f"; {word} seed variation (|effect| {abs(self.delta):.3g} vs "
                f"{self.control_threshold:.3g} in metric units)"
            )
        return out

    def __str__(self) -> str:
        return self.text


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x * 100:.0f}"


@dataclass(frozen=True)
class Claims(Sequence[Claim]):
    """The warranted claims of one result (possibly both directions), strongest first.

    Empty with a :attr:`reason` when nothing is warranted (the shift is not distinguishable from
    zero, or no site passes). :attr:`reliability` is set when a split-half agreement was attached
    (:func:`~mechdelta.split_half`); report it next to the table.
    """

    items: tuple[Claim, ...]
    alpha: float
    min_effect: float
    reason: str | None
    shift_summary: str
    n_tests: int
    test: str
    reliability: Reliability | None = None
    notes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Claim]:
        return iter(self.items)

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]

    def __bool__(self) -> bool:
        return bool(self.items)

    def with_reliability(self, reliability: Reliability) -> Claims:
        """The same claims with a split-half reliability attached (shown with the table)."""
        import dataclasses

        return dataclasses.replace(self, reliability=reliability)

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        cols = [
            "site",
            "direction",
            "effect",
            "ci_low",
            "ci_high",
            "p",
            "q",
            "n_prompts",
            "delta",
            "exceeds_control",
            "control_threshold",
            "test",
            "text",
        ]
        rows = [
            {
                "site": c.label,
                "direction": c.direction.value,
                "effect": c.effect,
                "ci_low": c.ci[0],
                "ci_high": c.ci[1],
                "p": c.p,
                "q": c.q,
                "n_prompts": c.n_prompts,
                "delta": c.delta,
                "exceeds_control": c.exceeds_control,
                "control_threshold": c.control_threshold,
                "test": c.test,
                "text": c.text,
            }
            for c in self.items
        ]
        return pd.DataFrame(rows, columns=cols)

    def to_markdown(self) -> str:
        """A markdown section: the criteria, the claims table (or the reason there is none), and
        the reliability line when attached."""
        lines = [
            f"Shift: {self.shift_summary}.",
            "",
            f"Criteria: q < {self.alpha:g} ({self.test}; {self.n_tests} tests) and "
            f"|effect| >= {self.min_effect:.0%} of the shift.",
            "",
        ]
        if not self.items:
            lines.append(f"No warranted claims: {self.reason}")
        else:
            has_control = any(c.exceeds_control is not None for c in self.items)
            head = "| site | direction | effect | 95% CI | q | prompts |"
            sep = "|---|---|---|---|---|---|"
            if has_control:
                head += " beyond seed variation |"
                sep += "---|"
            lines += [head, sep]
            for c in self.items:
                row = (
                    f"| {c.label} | {c.direction.value} | {c.effect:+.0%} | "
                    f"[{_pct(c.ci[0])}%, {_pct(c.ci[1])}%] | {format_p(c.q, '').strip()} | "
                    f"{c.n_prompts} |"
                )
                if has_control:
                    row += f" {'yes' if c.exceeds_control else 'no'} |"
                lines.append(row)
            lines += ["", *[f"- {c.text}" for c in self.items]]
        if self.reliability is not None:
            lines += ["", f"Reliability (split halves): {self.reliability.summary}"]
        for note in self.notes:
            lines += ["", f"Note: {note}"]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        if not self.items:
            return f"no warranted claims ({self.shift_summary}): {self.reason}"
        return "\n".join(c.text for c in self.items)


def _shift_check(shift: ShiftResult, alpha: float, spec: SiteTest) -> tuple[bool, str, str]:
    """Whether the shift is distinguishable from zero, a one-line summary, and why not."""
    diff = (shift.intervened.double() - shift.reference.double()).unsqueeze(0)
    p = float(p_values(diff, spec)[0])
    lo, hi = shift.ci
    summary = (
        f"{shift.metric} {shift.reference_mean:.4g} (reference) -> {shift.intervened_mean:.4g} "
        f"(intervened), shift {shift.shift:+.4g} [{lo:+.4g}, {hi:+.4g}], {format_p(p, 'p')}, "
        f"{len(shift.reference)} prompts"
    )
    if math.isnan(lo) or math.isnan(hi):
        return False, summary, "too few prompts for an interval of the shift"
    if lo <= 0.0 <= hi:
        return False, summary, "the shift's interval contains 0: the shift itself is not warranted"
    if not p < alpha:
        return False, summary, f"the shift's sign-flip test gives p = {p:.3g} >= alpha = {alpha:g}"
    return True, summary, ""


def _deltas(result: Any) -> torch.Tensor:
    """Per-site effect in metric units: mean(patched - target) over prompts (flattened)."""
    from mechdelta.patching.results import target_metric

    per = result.per_prompt.double()
    per = per.reshape(-1, per.shape[-1])
    return (per - target_metric(result.direction, result.shift).double()).mean(1)


def _exact_rows(result: Any, sites: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, intervals and deltas (flattened grid, NaN at unverified sites) of a verified
    attribution's *exact* patches."""
    from mechdelta.patching.results import target_metric
    from mechdelta.stats.bootstrap import Bootstrap, score_ci

    ver = result.verification
    n = len(sites)
    scores = torch.full((n,), float("nan"), dtype=torch.float64)
    cis = torch.full((n, 2), float("nan"), dtype=torch.float64)
    deltas = torch.full((n,), float("nan"), dtype=torch.float64)
    if ver is None or not ver.sites:
        return scores, cis, deltas
    index = {s: i for i, s in enumerate(sites)}
    at = torch.tensor([index[s] for s in ver.sites])
    shift = result.shift
    boot = Bootstrap(shift.n_boot, shift.alpha, int(result.provenance.get("seed", 0)))
    exact = ver.exact.double()
    scores[at] = ver.exact_scores.double()
    cis[at] = score_ci(
        shift.reference,
        shift.intervened,
        exact,
        boot,
        toward_reference=result.direction.toward_reference,
    ).double()
    deltas[at] = (exact - target_metric(result.direction, shift).double()).mean(1)
    return scores, cis, deltas


def _control_threshold(control: Any, result: Any, alpha: float) -> float:
    from mechdelta.patching.results import PatchResult

    values = []
    for r in _singles(control):
        if isinstance(r, PatchResult):
            raise ConfigError(
                "control= needs a grid (a sweep of the control pair) to form a null distribution "
                "of per-site effects, not a single joint patch"
            )
        values.append(_deltas(r).abs())
    mine = {str(s) for r in _singles(result) if not isinstance(r, PatchResult) for s in r.sites}
    theirs = {str(s) for r in _singles(control) for s in r.sites}
    if mine and mine != theirs:
        raise ConfigError(
            "control= covers a different grid than the result: run the same analysis (component, "
            "layers, heads, positions, task) on the control pair"
        )
    allv = torch.cat(values)
    if bool(torch.isnan(allv).all()):
        raise ConfigError("control= holds no finite per-site effects")
    # sites whose splice moves nothing in the control pair (identical activations in its two
    # models) say nothing about how much seed variation moves a component: left out
    allv = allv[~torch.isnan(allv) & (allv != 0)]
    return float(torch.quantile(allv, 1 - alpha)) if allv.numel() else 0.0


def _singles(result: Any) -> list[Any]:
    from mechdelta.patching.results import BothDirections

    if isinstance(result, BothDirections):
        return list(result)
    return [result]


def claims(
    result: SweepResult | PatchResult | Any,
    alpha: float = 0.05,
    *,
    min_effect: float = 0.05,
    control: Any = None,
) -> Claims:
    """The claims ``result`` warrants (see the module docstring for the criteria).

    Args:
        result: a :class:`~mechdelta.SweepResult`, a verified
            :class:`~mechdelta.AttributionResult` (only exactly patched sites can be claimed), a
            :class:`~mechdelta.PatchResult` (one joint claim), or a
            :class:`~mechdelta.BothDirections` of either (claims in each direction; the multiple-
            comparison family is each direction's grid).
        alpha: the level for the shift's test and for ``q``.
        min_effect: the smallest |fraction of the shift| worth a claim.
        control: the same analysis on a control pair (same grid) whose per-site effects are the
            null distribution of seed variation.
    """
    from mechdelta.attribution.results import AttributionResult
    from mechdelta.patching.results import PatchResult

    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} must lie in (0, 1), e.g. 0.05")
    if not 0.0 <= min_effect < 10.0:
        raise ConfigError(f"min_effect={min_effect!r}: a fraction of the shift, e.g. 0.05")
    singles = _singles(result)
    first = singles[0]
    spec: SiteTest = first.testing
    ok, summary, why = _shift_check(first.shift, alpha, spec)
    n_prompts = len(first.shift.reference)
    threshold = None if control is None else _control_threshold(control, result, alpha)
    items: list[Claim] = []
    n_tests = 0
    for r in singles:
        if isinstance(r, PatchResult):
            sites_list: list[Any] = [r.sites]
            scores = torch.tensor([r.score])
            cis = torch.tensor([r.ci])
            ps, qs = torch.tensor([r.p]), torch.tensor([r.q])
        else:
            sites_list = list(r.sites)
            scores = r.scores.flatten()
            cis = r.ci.reshape(-1, 2)
            ps, qs = r.p.flatten(), r.q.flatten()
        n_tests += len(sites_list)
        if not ok:
            continue
        deltas = _deltas(r)
        if isinstance(r, AttributionResult):
            # only the exactly patched sites carry p/q: their claims state the exact patches'
            # effect, interval and delta, never the first-order estimate of the same site
            scores, cis, deltas = _exact_rows(r, sites_list)
        for i, site in enumerate(sites_list):
            q, eff = float(qs[i]), float(scores[i])
            if math.isnan(q) or not q < alpha or math.isnan(eff) or abs(eff) < min_effect:
                continue
            delta = float(deltas[i])
            items.append(
                Claim(
                    site=site,
                    direction=r.direction,
                    effect=eff,
                    ci=(float(cis[i, 0]), float(cis[i, 1])),
                    p=float(ps[i]),
                    q=q,
                    n_prompts=n_prompts,
                    test=r.testing.label,
                    delta=delta,
                    exceeds_control=None if threshold is None else abs(delta) > threshold,
                    control_threshold=threshold,
                )
            )
    items.sort(key=lambda c: (-abs(c.effect), c.q, c.label))
    reason = None
    if not ok:
        reason = why
    elif not items:
        reason = f"no site has q < {alpha:g} and |effect| >= {min_effect:.0%} of the shift"
    notes = []
    # sign-flip enumerates all patterns only for few prompts (then p >= 2 / 2**n: a pattern and
    # its negation tie); the bootstrap and Monte Carlo sign flips never go below 1 / (1 + B)
    exact = spec.test is TestKind.SIGNFLIP and n_prompts <= 20 and 2**n_prompts <= spec.n_resamples
    floor = 2.0 / 2**n_prompts if exact else 1.0 / (1 + spec.n_resamples)
    if n_tests * floor > alpha:
        corr = "Benjamini-Hochberg" if spec.correction is Correction.BH else "Holm"
        notes.append(
            f"the smallest attainable p-value is {floor:.1e}; across "
            f"{n_tests} tests {corr} may not reach q < {alpha:g} for a single site: "
            "use more prompts or result.tested(n_resamples=...) for more resamples"
        )
    return Claims(
        items=tuple(items),
        alpha=alpha,
        min_effect=min_effect,
        reason=reason,
        shift_summary=summary,
        n_tests=n_tests,
        test=spec.label,
        notes=tuple(notes),
    )
