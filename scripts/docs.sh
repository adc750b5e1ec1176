#!/usr/bin/env bash
# Build the documentation site into site/ (git-ignored) with warnings as errors: a broken link,
# an unresolved cross-reference or a public name without a page fails. Open site/index.html, or
# serve with live reload: .venv/bin/mkdocs serve
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1
# The API pages import mechdelta (docs/_hooks.py). Not --quiet: it would hide the warnings that
# --strict counts (mkdocs 1.6); the INFO lines are filtered instead.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
.venv/bin/mkdocs build --strict --site-dir site "$@" >"$log" 2>&1 || status=$?
grep -v '^INFO' "$log" || true
if [ "$status" -ne 0 ]; then
    echo "docs: build failed (exit $status; warnings are errors, see above)" >&2
    exit "$status"
fi
echo "docs: built site/ ($(find site -name '*.html' | wc -l) pages); open site/index.html"
