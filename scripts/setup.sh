#!/usr/bin/env bash
# One-command set-up for mechdelta: a virtual environment in .venv/ at the repository root,
# torch without CUDA on a CPU machine (an existing torch is kept), then the package with its dev
# extra, and a system Chromium for plotly's static export when none is found. Idempotent.
#
# Environment knobs:
#   MECHDELTA_TORCH       torch requirement to install when the venv has none (default torch==2.13.0
#                         on machines without an NVIDIA GPU, plain "torch" on machines with one)
#   MECHDELTA_TORCH_INDEX extra pip arguments for the torch install (e.g. "--index-url URL" of a CPU
#                         wheel index on machines where the default resolve would pull CUDA wheels)
#   MECHDELTA_SKIP_BROWSER=1  do not try to install Chromium
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[setup] %s\n' "$*"; }

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    say "creating virtual environment .venv/ with $($python_bin --version 2>&1)"
    "$python_bin" -m venv .venv
else
    say "virtual environment .venv/ already exists: kept"
fi
py=.venv/bin/python
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# pip's warnings about index locations configured on some machines but absent are noise here.
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }

if "$py" -c "import torch" 2>/dev/null; then
    say "torch $("$py" -c 'import torch; print(torch.__version__)') already installed: kept"
else
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        torch_req="${MECHDELTA_TORCH:-torch}"
    else
        torch_req="${MECHDELTA_TORCH:-torch==2.13.0}"
    fi
    say "installing $torch_req first, so the package's torch range is already met"
    # shellcheck disable=SC2086
    quiet_pip install -q "$torch_req" numpy ${MECHDELTA_TORCH_INDEX:-}
    say "installed torch $("$py" -c 'import torch; print(torch.__version__)')"
fi

say "installing mechdelta (editable) with the dev extra"
quiet_pip install -q -e ".[dev]"
say "mechdelta $("$py" -c 'import mechdelta; print(mechdelta.__version__)') installed in .venv/"

find_browser() {
    for b in "${BROWSER_PATH:-}" chromium chromium-browser google-chrome google-chrome-stable; do
        [ -n "$b" ] && command -v "$b" >/dev/null 2>&1 && { command -v "$b"; return 0; }
    done
    return 1
}
if [ "${MECHDELTA_SKIP_BROWSER:-0}" = 1 ]; then
    say "MECHDELTA_SKIP_BROWSER=1: not looking for Chromium (static PNG/SVG/PDF export disabled)"
elif b=$(find_browser); then
    say "browser for static figure export: $b"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "no Chromium found: installing Debian's chromium for kaleido (static figure export)"
    if apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        say "browser for static figure export: $(find_browser)"
    else
        say "WARNING: chromium install failed; HTML figures work, PNG/SVG/PDF export will not"
    fi
else
    say "no Chromium found and apt-get unavailable (or not root): HTML figures work; for PNG/SVG/PDF"
    say "install Chromium or Chrome and/or set BROWSER_PATH"
fi
say "done. Try: .venv/bin/mechdelta demo"
