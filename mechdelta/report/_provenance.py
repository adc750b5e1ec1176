"""The provenance section that ends every transition report: software, models (the control
pair's and the series' checkpoints too), prompts, seeds, timings, warnings raised and the
resolved configuration, all read from the run's manifest and analysis records."""

from __future__ import annotations

import json
from typing import Any

from mechdelta.report._blocks import Block, Code, Section, Table, Text
from mechdelta.report._build import ReportContext

__all__ = ["provenance_section"]


def _control_rows(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Provenance rows of the control pair (none without one)."""
    control = manifest.get("control_models")
    if not control:
        return []
    return [
        (f"control {role}", f"{control[role]['name']} (weights {control[role]['weights_hash']})")
        for role in ("reference", "intervened")
    ]


def _series_rows(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Provenance rows of the series' checkpoints (none without a [series])."""
    series = manifest.get("series")
    if not series:
        return []
    return [
        (
            f"series checkpoint {c['label']}"
            + (" (reference)" if c["label"] == series["reference"] else ""),
            f"{c['name']} (weights {c['weights_hash']})",
        )
        for c in series["checkpoints"]
    ]


def provenance_section(ctx: ReportContext) -> Section:
    m = ctx.run.manifest
    env = m.get("environment", {})
    models = m["models"]
    task = m["task"]
    seeds = m.get("seeds", {})
    rows: list[tuple[str, str]] = [
        ("mechdelta", str(env.get("mechdelta"))),
        ("TransformerLens", str(env.get("transformer_lens"))),
        ("torch", str(env.get("torch"))),
        ("transformers", str(env.get("transformers"))),
        ("python / platform", f"{env.get('python')} / {env.get('platform')}"),
        ("run started", str(env.get("created"))),
        ("reference", f"{models['reference']['name']} (weights {models['reference']['weights_hash']})"),
        ("intervened", f"{models['intervened']['name']} (weights {models['intervened']['weights_hash']})"),
        *_control_rows(m),
        *_series_rows(m),
        ("tokenizer hash", str(models.get("tokenizer_hash"))),
        ("processing / dtype", f"{models.get('processing')} / {models.get('dtype')}"),
        ("task", f"{task['name']}: {task['metric']}, {task['n_prompts']} prompts of up to {task['seq_len']} tokens"),
        ("prompt-set hash", str(task["prompt_hash"])),
        ("seeds", ", ".join(f"{k}={v}" for k, v in seeds.items())),
        ("config hash", str(m.get("config_hash"))),
    ]  # fmt: skip
    timings = m.get("timings", {})
    timing_rows = [("load pair", timings.get("load_pair_s"))]
    timing_rows += list(timings.get("analyses_s", {}).items())
    timing_rows += [
        ("figures", timings.get("figures_s")),
        ("total (last session)", timings.get("total_s")),
    ]
    blocks: list[Block] = [
        Table(("item", "value"), tuple(rows), "software, models, prompts"),
        Table(
            ("step", "seconds"),
            tuple((k, "n/a" if v is None else f"{float(v):.2f}") for k, v in timing_rows),
            "timings",
        ),
    ]
    warned = [
        (i, w)
        for i in ctx.run.ids
        for rec in [ctx.run.record(i, verify=False)]
        for w in [*rec.get("warnings", []), *rec.get("notes", [])]
    ]
    if warned:
        blocks.append(Table(("analysis", "warning"), tuple(warned), "warnings raised"))
    if m.get("static_figures_skipped"):
        blocks.append(Text(f"Static figures: {m['static_figures_skipped']}"))
    blocks.append(Text("The resolved experiment configuration:"))
    blocks.append(Code(json.dumps(m["config"], indent=2, sort_keys=True), "json"))
    return Section("Provenance", tuple(blocks), "provenance")
