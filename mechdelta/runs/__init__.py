"""Reproducible runs: experiment files (TOML), analysis specs, run directories with manifests and
resumable per-analysis results, and the driver that executes an experiment into a run directory."""
