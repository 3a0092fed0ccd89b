#!/usr/bin/env bash
# Command 1: install, then compress SmolLM2-135M with the best method so far and print the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/slr compress smollm2-135m --method admm --pattern 2:4 --rank 32 --out runs/smollm2-admm-nm24r32 --overwrite
