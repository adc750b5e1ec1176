"""The transition report of a run directory: Markdown and self-contained HTML."""
