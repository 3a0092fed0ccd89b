#!/usr/bin/env bash
# Command 1: install, then compress SmolLM2-135M with the best uniform configuration measured at <= 4.25 bits per
# weight (BENCHMARKS.md, "Accuracy per byte") and print the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/slr compress smollm2-135m --method gptq --bits 4 --group-size 64 --opt actorder=true --opt clip=true \
    --embed-bits 8 --out runs/smollm2-gptq-q4g64 --overwrite
