#!/usr/bin/env bash
# The project's one test command: the README's second set-up command, and all that CI's .ci/run does.
# Installs ovss with its test extra, Debian's chromium (the demo's browser test) and fonts when missing,
# then lint, type check and the unit tests (tiny random models, no network: OVSS_OFFLINE=1).
# The tests keep their own cache in pytest's temp folder (tests/conftest.py), whatever OVSS_CACHE says.
# Arguments are passed to pytest (e.g. `bash scripts/test.sh -x tests/test_cli.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
export OVSS_OFFLINE=1
# Debian packages the tests need, installed only when missing: chromium, and fonts that draw legend names in
# any script (checked through fontconfig: a CJK character and an emoji).
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
if ! command -v chromium >/dev/null; then
    command -v apt-get >/dev/null || { echo "chromium is missing and apt-get is not here: install chromium" >&2; exit 2; }
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium
fi
if [ -z "$(fc-list ':charset=65e5' file 2>/dev/null)" ] || [ -z "$(fc-list ':charset=1f600' file 2>/dev/null)" ]; then
    command -v apt-get >/dev/null || { echo "fonts are missing and apt-get is not here: install fonts-noto-cjk and fonts-symbola" >&2; exit 2; }
    $sudo apt-get update -qq && $sudo apt-get install -y -qq fontconfig fonts-noto-core fonts-noto-cjk fonts-symbola
fi
python -m pip install torch==2.13.0 -e ".[test]"
ruff check src tests benchmarks tools
mypy
python -m pytest "$@"
