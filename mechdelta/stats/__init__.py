"""Statistics over prompts: bootstrap intervals, per-site tests with multiple-comparison control,
warranted claims and the reliability of site rankings."""
