#!/usr/bin/env bash
# Command 2: install, lint, then run the whole test suite (unit tests + a few on the real default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# headless Chromium for the report rendering test (tests/test_report.py), from Debian, pinned
CHROMIUM_VERSION=150.0.7871.100-1~deb12u1
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "chromium=$CHROMIUM_VERSION" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "chromium=$CHROMIUM_VERSION" >/dev/null; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check src tests benchmarks
# pytest exits 5 when it collects no tests: treat that as a failure, like any other non-zero code
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
