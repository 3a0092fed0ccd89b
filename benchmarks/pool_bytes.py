"""Bytes that CAP's and search's candidate pools hold per linear weight on a real model (issue 22, point 3).

Builds every matrix's pools as ``slr.allocate.cap.make_pools`` does (data-free scores: the sizes do not depend on the
metric) for pure pruning and for S+LR (whitened directions up to the budget's rank, residual rank ``--rank``), and
sums the bytes of the tensors each pool keeps. Writes benchmarks/pool_bytes.json and prints a markdown line.

    python benchmarks/pool_bytes.py --budget 0.5 --rank 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def held_bytes(pools) -> int:
    return sum(t.numel() * t.element_size() for t in vars(pools).values() if isinstance(t, torch.Tensor))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=32, help="residual rank r0 of the S+LR pools")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).with_name("pool_bytes.json")))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from run import _start_commit

    from slr.allocate.base import matrices
    from slr.allocate.cap import make_pools
    from slr.api import open_model

    model, _, _ = open_model(a.model)
    mats = matrices(model)
    total = sum(m.numel for m in mats)
    rec = {"model": a.model, "budget": a.budget, "rank": a.rank, "linear_weights": total, "git_commit": _start_commit()}
    for mode in ("sparse", "slr"):
        t = time.perf_counter()
        held = sum(held_bytes(make_pools(m, None, mode, "whitened", a.budget, 5, a.rank)) for m in mats)
        rec[mode] = {"bytes": held, "bytes_per_weight": held / total, "seconds": round(time.perf_counter() - t, 1)}
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{a.model} (commit {rec['git_commit']}): CAP pools hold {rec['sparse']['bytes_per_weight']:.2f} bytes per "
          f"linear weight for pruning and {rec['slr']['bytes_per_weight']:.2f} for S+LR (budget {a.budget}, "
          f"r0 {a.rank})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
