"""The schema of ``report.json`` (:func:`mechdelta.explain.audit.report_document`).

Top-level fields (JSON Schema draft 2020-12 below; numbers are JSON numbers or null where not
finite):

- ``schema``: ``"mechdelta.transition-report/1"``.
- ``status``: ``"explained"`` or ``"no_shift"`` (then every stage field below is null / empty).
- ``intervention``: what the user declared (``kind``, ``description``, ``data``, ``date``,
  ``owner``, ``extra``) and ``declared_by: "user"``: unverified by mechdelta.
- ``behaviour``: ``task``, ``metric``, ``n_prompts``, ``reference_mean``, ``intervened_mean``,
  ``shift`` (intervened - reference), ``ci`` ([lo, hi] bootstrap interval at 1 - ``alpha``),
  ``alpha``, ``significant``.
- ``weights``: changed components, ``relative_change`` = ||W_int - W_ref|| / ||W_ref||.
- ``representations``: ``candidates`` (layers where divergence starts) and ``measures`` (long
  format: ``site``, ``layer``, ``head``, ``measure``, ``value``; see
  :class:`~mechdelta.RepresentationDiff`).
- ``patching``: component -> ``method`` (exact / attribution), ``layers``, ``directions``:
  direction -> strongest sites with ``score`` = fraction of the shift (splice semantics).
- ``circuit``: ``level``, ``semantics``, ``direction``, ``members``, ``faithfulness``,
  ``faithfulness_per_prompt``, ``reached``, ``target``; null when not searched.
- ``steering``: ``rows`` (the :class:`~mechdelta.SteeringResult` table) and ``summary``; null
  when not run.
- ``claims``: each warranted claim: ``site``, ``direction``, ``effect`` (fraction of the shift),
  ``ci``, ``p``, ``q`` (BH-adjusted), ``n_prompts``, ``test``, ``text``.
- ``monitor``: ``metric``, ``components``, ``basis``, ``baseline`` (both models' metric means).
- ``params``: the pipeline's parameters; ``provenance``: models (names, weight hashes), task
  (name, metric, sizes, prompt hash), environment (versions, creation time), ``pdf``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REPORT_SCHEMA", "SCHEMA_ID"]

SCHEMA_ID = "mechdelta.transition-report/1"

_NUM = {"type": ["number", "null"]}
_PAIR = {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "type": "object",
    "required": [
        "schema",
        "status",
        "intervention",
        "behaviour",
        "weights",
        "representations",
        "patching",
        "circuit",
        "steering",
        "claims",
        "monitor",
        "params",
        "provenance",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "status": {"enum": ["explained", "no_shift"]},
        "intervention": {
            "type": "object",
            "required": ["kind", "description", "data", "date", "owner", "extra", "declared_by"],
            "properties": {"declared_by": {"const": "user"}, "extra": {"type": "object"}},
        },
        "behaviour": {
            "type": "object",
            "required": [
                "task",
                "metric",
                "n_prompts",
                "reference_mean",
                "intervened_mean",
                "shift",
                "ci",
                "alpha",
                "significant",
            ],
            "properties": {
                "n_prompts": {"type": "integer", "minimum": 1},
                "ci": _PAIR,
                "significant": {"type": "boolean"},
                "shift": _NUM,
            },
        },
        "weights": {
            "type": ["array", "null"],
            "items": {"type": "object", "required": ["component", "relative_change"]},
        },
        "representations": {"type": ["object", "null"], "required": ["candidates", "measures"]},
        "patching": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["method", "layers", "directions"],
            },
        },
        "circuit": {"type": ["object", "null"]},
        "steering": {"type": ["object", "null"]},
        "claims": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "site",
                    "direction",
                    "effect",
                    "ci",
                    "p",
                    "q",
                    "n_prompts",
                    "test",
                    "text",
                ],
                "properties": {
                    "ci": _PAIR,
                    "direction": {"enum": ["reference->intervened", "intervened->reference"]},
                },
            },
        },
        "monitor": {"type": ["object", "null"]},
        "params": {"type": "object"},
        "provenance": {"type": "object", "required": ["models", "task", "environment"]},
    },
}
