"""Wall time of each global allocator on its own (plan only, no compression), and how close each plan lands.

  python benchmarks/alloc_time.py [--model smollm2-135m] [--method admm] [--calib-samples 128] [--skip cap]
                                  [--cap-pools whitened|rpca]

Plans the g50 configuration (global retained fraction 0.50, S+LR with rank 32 for the uniform plan) with every
allocator in one process, on the same calibration windows the compression would use, and writes
benchmarks/alloc_time.json and benchmarks/alloc_time.md. The seconds are make_plan's wall time, which is what
`slr compress --allocate A` adds in front of the compression (results.json "seconds.allocate").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run import CONFIGS, _start_commit  # benchmarks/run.py

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="admm")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--skip", action="append", default=[], help="allocator to leave out (repeatable)")
    ap.add_argument("--cap-pools", default="whitened", choices=("whitened", "rpca"),
                    help="CAP's candidate pools (the g50 admm run used whitened)")
    a = ap.parse_args()
    commit = _start_commit()

    import torch

    from slr.allocate import ALLOCATORS, make_plan
    from slr.api import open_model
    from slr.config import AllocConfig, CompressConfig
    from slr.data.calib import calibration_windows, tokenize_text
    from slr.data.corpora import load_text

    model, tok, info = open_model(a.model, "cpu")
    bos = tok.bos_token_id if info["bos_per_window"] else None
    torch.manual_seed(0)
    calib = calibration_windows(tokenize_text(tok, load_text(None, "calibration")[0]), a.calib_samples, 512, 0,
                                bos_id=bos)
    rows = []
    for name in ALLOCATORS:
        if name in a.skip:
            continue
        c = dict(CONFIGS["g50"])
        budget = c.pop("budget")
        cfg = CompressConfig(method=a.method, calib_samples=a.calib_samples, **c,
                             alloc=AllocConfig(method=name, budget=budget))
        t = time.perf_counter()
        opts = {"pools": a.cap_pools} if name == "cap" else {}
        _, inf = make_plan(model, cfg, calib, **opts)
        sec = time.perf_counter() - t
        rows.append({"allocator": name, "options": opts, "seconds": round(sec, 1), "budget": inf["budget"],
                     "achieved_fraction": inf["achieved_fraction"],
                     "rel_budget_error": (inf["achieved_fraction"] - inf["budget"]) / inf["budget"]})
        print(rows[-1], flush=True)
    out = {"model": a.model, "method": a.method, "config": "g50", "calib_samples": a.calib_samples,
           "threads": torch.get_num_threads(), "git_commit": commit, "rows": rows}
    (HERE / "alloc_time.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["## Allocator wall time (plan only, g50)", "",
          f"`python benchmarks/alloc_time.py` — {a.model}, method {a.method}, {a.calib_samples} calibration windows, "
          f"{out['threads']} threads, commit {commit}. Seconds = make_plan alone (what `--allocate` adds before the "
          "compression); budget error = (achieved − budget) / budget.", "",
          "| allocator | options | seconds | achieved fraction | budget error |", "|---|---|---|---|---|"]
    md += [f"| {r['allocator']} | {', '.join(f'{k}={v}' for k, v in r['options'].items()) or 'defaults'} | "
           f"{r['seconds']} | {r['achieved_fraction']:.6f} | {r['rel_budget_error']:+.2e} |"
           for r in rows]
    if a.skip:
        md += ["", f"Left out here: {', '.join(a.skip)} (the g50 table's `allocate s` column has its time inside a "
               "full run)."]
    (HERE / "alloc_time.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
