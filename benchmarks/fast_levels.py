"""How faithful is the short admm schedule that ``pools=solved`` solves its levels with? (issue 22)

  python benchmarks/fast_levels.py [--fractions 0.1 0.2 0.4] [--rank 32]

The search and CAP with ``--alloc-opt pools=solved`` (``allocate/solvedlevels.py``) score plans on levels solved by
admm with ``solvedlevels.FAST`` (40 iterations, fast rho growth) instead of the default schedule. An allocator needs
the fast solve's *gains* between levels to follow the default's across matrices, not its errors to match. On the
layer benchmark's (W, H) pairs (``benchmarks/layers.py``; the 7-matrix subset of the admm tuning notes), for each
matrix and kept fraction f of S (rank fixed): the relative layer error and seconds of both schedules (1 thread), and
per step between neighbouring fractions the Spearman correlation over matrices of the error each one loses.
Writes benchmarks/fast_levels.json and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layers import pairs_for  # benchmarks/layers.py
from level_fidelity import spearman, write_json  # benchmarks/level_fidelity.py
from run import _start_commit  # benchmarks/run.py

HERE = Path(__file__).resolve().parent
SUBSET = ["0.self_attn.v_proj", "0.mlp.up_proj", "14.self_attn.k_proj", "14.self_attn.o_proj", "14.mlp.down_proj",
          "29.self_attn.q_proj", "29.mlp.gate_proj"]


def markdown(meta: dict, rows: list[dict], steps: list[dict]) -> str:
    fr = meta["fractions"]
    out = ["## The short admm schedule of pools=solved against the default (issue 22)", "",
           f"`python benchmarks/fast_levels.py --fractions {' '.join(f'{f:g}' for f in fr)}`, commit {meta['commit']}; "
           f"rank {meta['rank']}, S keeps a fraction f of the weights; relative layer error on the layer benchmark's "
           f"dense-propagated H; fast = `solvedlevels.FAST` {meta['fast']}; 1 thread.", "",
           "| matrix | " + " | ".join(f"f={f:g} default / fast (s)" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    by = {(r["matrix"], r["fraction"]): r for r in rows}
    for m in dict.fromkeys(r["matrix"] for r in rows):
        out.append(f"| {m} | " + " | ".join(
            f"{by[m, f]['default']:.4f} / {by[m, f]['fast']:.4f} ({by[m, f]['default_s']:.1f} / "
            f"{by[m, f]['fast_s']:.1f})" for f in fr) + " |")
    secs = [sum(r[k] for r in rows) for k in ("default_s", "fast_s")]
    out += ["", f"Seconds in all: default {secs[0]:.1f}, fast {secs[1]:.1f} ({secs[1] / secs[0]:.2f}x).", "",
            "| step | Spearman of the error lost | mean loss default | mean loss fast |", "|---|---|---|---|"]
    out += [f"| {s['step']} | {s['spearman']:.3f} | {s['default_gain']:.4f} | {s['fast_gain']:.4f} |" for s in steps]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "fast_levels"), help="path stem of the .json and .md")
    a = ap.parse_args()
    commit = _start_commit()

    import torch

    from slr.allocate.solvedlevels import FAST
    from slr.solvers import METHODS
    from slr.solvers.base import relative_error
    from slr.spec import LayerSpec

    torch.set_num_threads(1)
    pairs, _, _ = pairs_for("smollm2-135m", 32, [0, 14, 29], False)
    meta = {"commit": commit, "fractions": a.fractions, "rank": a.rank, "fast": FAST["admm"], "threads": 1,
            "matrices": SUBSET}
    rows = []
    for key in SUBSET:
        W, H = pairs[key]
        for f in a.fractions:
            row = {"matrix": key, "fraction": f}
            for name, opts in (("default", {}), ("fast", FAST["admm"])):
                t = time.perf_counter()
                res = METHODS["admm"].fn(W, H.clone(), LayerSpec(sparsity=1.0 - f, rank=a.rank), **opts)
                row[f"{name}_s"] = time.perf_counter() - t
                row[name] = relative_error(W, H, res.dense())
            rows.append(row)
            print(row, flush=True)
    by = {(r["matrix"], r["fraction"]): r for r in rows}
    steps = []
    for lo, hi in zip(a.fractions, a.fractions[1:]):
        gd = [by[m, lo]["default"] - by[m, hi]["default"] for m in SUBSET]
        gf = [by[m, lo]["fast"] - by[m, hi]["fast"] for m in SUBSET]
        steps.append({"step": f"{lo:g} -> {hi:g}", "spearman": spearman(gd, gf), "default_gain": sum(gd) / len(gd),
                      "fast_gain": sum(gf) / len(gf)})
    stem = Path(a.out)
    write_json(stem, {"meta": meta, "rows": rows, "steps": steps})
    stem.with_suffix(".md").write_text(markdown(meta, rows, steps))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
