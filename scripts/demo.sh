#!/usr/bin/env bash
# Command 1: install, then compress SmolLM2-135M with the best configuration measured at <= 4.25 bits per weight
# that runs in about 15 minutes on 2 cores (BENCHMARKS.md, "Accuracy per byte"): 3-bit GPTQ S plus an 8-bit
# rank-16 L, the bit width and rank of each matrix chosen under one 4.25-bpw budget; then print the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/slr compress smollm2-135m --method prune+lr --bits 3 --rank 16 --factor-bits 8 \
    --allocate knapsack --budget-bits 4.25 --alloc-opt max_samples=32 --opt actorder=true --opt clip=true \
    --embed-bits 8 --out runs/smollm2-plr-b425 --overwrite
