"""MkDocs hook: the API reference pages, generated from ``mechdelta.__all__`` at every build.

Each public name is documented on the page of the subpackage that defines it (``mechdelta.core``,
``mechdelta.patching``, ...), in ``__all__`` order, through mkdocstrings (``::: mechdelta.NAME``):
the reference follows the public API without hand-kept lists. A name whose subpackage has no page
below fails the build.
"""

from __future__ import annotations

import importlib
from typing import Any

from mkdocs.structure.files import File, Files

# Page -> (title, what it covers, subpackages whose public names it shows).
PAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "core": (
        "Pairs, tasks and sites",
        "`mechdelta.core`: the pair of models, the task, sites and components, directions, "
        "metrics, the graph vocabulary and weight differences.",
        ("core",),
    ),
    "patching": (
        "Patching",
        "`mechdelta.patching`: exact cross-model patching (shift, patches, sweeps, grafts, edges, "
        "paths) and its results.",
        ("patching",),
    ),
    "attribution": (
        "Attribution",
        "`mechdelta.attribution`: gradient estimates of sweep grids and edge scores, and their "
        "exact verification.",
        ("attribution",),
    ),
    "circuits": (
        "Circuits",
        "`mechdelta.circuits`: circuit search, comparison and checkpoint series.",
        ("circuits",),
    ),
    "stats": (
        "Statistics and claims",
        "`mechdelta.stats`: bootstrap intervals, per-site tests, warranted claims, reliability.",
        ("stats",),
    ),
    "representations": (
        "Representations",
        "`mechdelta.representations`: representation similarity between the two models.",
        ("representations",),
    ),
    "steering": (
        "Steering",
        "`mechdelta.steering`: steering vectors from the pair and their test.",
        ("steering",),
    ),
    "explain": (
        "Explanations",
        "`mechdelta.explain`: the whole pipeline in one call, and its audit report.",
        ("explain",),
    ),
    "runs": (
        "Runs and reports",
        "`mechdelta.runs` and `mechdelta.report`: experiment files, run directories, reports.",
        ("runs", "report"),
    ),
    "scale": (
        "Scaling out",
        "`mechdelta.scale`: where patched passes run (in-process, resumable shards, a Ray "
        "cluster).",
        ("scale",),
    ),
    "zoo": (
        "Zoo and plotting",
        "`mechdelta.zoo` (the offline model zoo) and `mechdelta.plotting` (figure functions).",
        ("zoo", "plotting"),
    ),
    "errors": (
        "Errors",
        "`mechdelta.errors`: every error mechdelta raises on purpose derives from "
        "`MechDeltaError`.",
        ("errors",),
    ),
}


def subpackage(name: str, obj: Any) -> str:
    """The subpackage of ``mechdelta`` that defines a public object (``core``, ``patching``...)."""
    module = obj.__name__ if isinstance(obj, type(importlib)) else obj.__module__
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mechdelta"


def grouped() -> dict[str, list[str]]:
    """Public names (``mechdelta.__all__``) per API page, in ``__all__`` order."""
    md = importlib.import_module("mechdelta")
    where = {sub: page for page, (_, _, subs) in PAGES.items() for sub in subs}
    groups: dict[str, list[str]] = {page: [] for page in PAGES}
    for name in md.__all__:
        if name == "__version__":
            continue
        sub = subpackage(name, getattr(md, name))
        if sub not in where:
            raise RuntimeError(
                f"public name mechdelta.{name} is defined in subpackage {sub!r}, which no API "
                "page covers: add it to PAGES in docs/_hooks.py"
            )
        groups[where[sub]].append(name)
    return groups


def page_text(page: str, names: list[str]) -> str:
    title, blurb, _ = PAGES[page]
    lines = [f"# {title}", "", blurb, ""]
    lines += [f"- [`{n}`](#mechdelta.{n})" for n in names]
    lines.append("")
    for name in names:
        lines += [f"::: mechdelta.{name}", ""]
    return "\n".join(lines)


def index_text(groups: dict[str, list[str]]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings of `mechdelta`'s public API (`mechdelta.__all__`), grouped "
        "by the subpackage that defines each name. Import everything from the top level: "
        "`import mechdelta as md; md.sweep(...)`.",
        "",
        "| page | names |",
        "|---|---|",
    ]
    for page, names in groups.items():
        shown = ", ".join(f"`{n}`" for n in names)
        lines.append(f"| [{PAGES[page][0]}]({page}.md) | {shown} |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    groups = grouped()
    files.append(File.generated(config, "api/index.md", content=index_text(groups)))
    for page, names in groups.items():
        files.append(File.generated(config, f"api/{page}.md", content=page_text(page, names)))
    return files
