"""The vocabulary everything else builds on: the model pair and its loading and compatibility
contract, sites and components, tasks and metrics, directions, weight diffs, provenance and
result storage. Public names are re-exported from :mod:`mechdelta`."""
