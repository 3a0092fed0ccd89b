"""How faithful are the allocators' pool rebuilds to the deployed admm solve? (issue 22)

  python benchmarks/level_fidelity.py [--blocks 0 14 29] [--fractions 0.05 0.1 0.2 0.3 0.4] [--rank 32]

CAP and the search allocator score plans on matrices rebuilt from whitened pools (``allocate.cap.Pools.rebuild``:
the top ``rank`` directions of W G mapped back, W itself on each row's top-scored entries); the run then deploys admm's
solve at the chosen (rank, kept fraction). A plan is chosen by how much each matrix's error falls when it gets more
sparse entries, so the proxy is faithful when those falls match admm's, across matrices and along f.

On the layer benchmark's (W, H) pairs (``benchmarks/layers.py``: dense-propagated H of 32 windows, cached), for every
matrix and every kept fraction f of S (rank fixed), the relative layer error ||X (W - What)^T||^2 / ||X W^T||^2 of:
the pool rebuild; the knapsack's loss model (``allocate.knapsack.matrix_curve``); a refit (the pool rebuild, then S
backsolved on its support and L refitted, ``--rounds`` times); and admm (its defaults, 1 thread). Summary per proxy:
the mean error ratio admm / proxy per fraction, and per step between neighbouring fractions the Spearman correlation
over matrices of the error each one loses (proxy vs admm) and the mean losses.
Writes benchmarks/level_fidelity.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from layers import pairs_for  # benchmarks/layers.py
from run import _start_commit  # benchmarks/run.py

HERE = Path(__file__).resolve().parent
PROXIES = ("pool", "knapsack", "refit")


def refit_rebuild(W, H, white, pools, m, rank: int, entries: int, rounds: int, cg_iters: int = 10):
    """The pool rebuild, then ``rounds`` x (S backsolved on the pool's support given L, L refitted to W - S in the
    whitened metric): admm's polish from the pool's start, without the ADMM loop."""
    import torch

    from slr.solvers.admm import masked_cg

    G, Gi, _ = white
    k = int(round(entries / m.d_out))
    mask = (pools.pos < k).double()
    r = min(rank, pools.sigma.numel())
    L = ((pools.U[:, :r] * pools.sigma[:r]) @ pools.Vt[:r]).double()
    d = H.double().diagonal().clamp_min(1e-12).sqrt()  # unit-diagonal scaling for masked_cg
    A = H.double() / (d[:, None] * d[None, :])
    S = (W.double() - L) * mask
    for _ in range(rounds):
        S = masked_cg(S * d, mask, (W.double() - L) * d, A, cg_iters) / d
        P, s, Qt = torch.linalg.svd((W.double() - S) @ G.double(), full_matrices=False)
        L = (P[:, :r] * s[:r]) @ (Qt[:r] @ Gi.double())
    return (S + L).float()


def knapsack_proxy(m, white, rank: int, fraction: float) -> float:
    """The knapsack's relative loss of (rank, the row count of ``fraction``): low rank first, then the most salient
    residual entries by OBS saliency (``allocate.knapsack.matrix_curve``, normalize="relative")."""
    from slr.allocate.base import Choice
    from slr.allocate.knapsack import Metric, matrix_curve

    k = int(round(fraction * m.d_in))
    ch, _, loss = matrix_curve(m, Metric.whitened(m.weight, white), "slr", None, uni=Choice(k, rank),
                               normalize="relative", rank_floor=rank)
    return float(loss[[i for i, c in enumerate(ch) if c.k_row == k and c.rank == rank][0]])


def spearman(a: list[float], b: list[float]) -> float:
    import torch

    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def summarize(rows: list[dict], fractions: list[float]) -> dict:
    """Per proxy (``PROXIES``): mean error ratio admm / proxy per fraction, and per step the Spearman correlation
    over matrices of the error lost (proxy vs admm)."""
    by = {(r["matrix"], r["fraction"]): r for r in rows}
    mats = sorted({r["matrix"] for r in rows}, key=lambda k: (int(k.split(".")[0]), k))
    out = {"matrices": len(mats)}
    for proxy in PROXIES:
        ratio = {f: sum(by[m, f]["admm"] / by[m, f][proxy] for m in mats) / len(mats) for f in fractions}
        steps = []
        for lo, hi in zip(fractions, fractions[1:]):
            gp = [by[m, lo][proxy] - by[m, hi][proxy] for m in mats]
            ga = [by[m, lo]["admm"] - by[m, hi]["admm"] for m in mats]
            steps.append({"from": lo, "to": hi, "spearman": spearman(gp, ga),
                          "proxy_gain_mean": sum(gp) / len(gp), "admm_gain_mean": sum(ga) / len(ga)})
        out[proxy] = {"admm_over_proxy": ratio, "steps": steps}
    return out


def markdown(meta: dict, rows: list[dict], summ: dict) -> str:
    fr = meta["fractions"]
    out = ["## Pool rebuild vs admm at the allocators' levels (issue 22)", "",
           f"`python benchmarks/level_fidelity.py --blocks {' '.join(map(str, meta['blocks']))} --fractions "
           f"{' '.join(f'{f:g}' for f in fr)}`, commit "
           f"{meta['commit']}; rank {meta['rank']}, S keeps a fraction f of the weights; relative layer error "
           "||X(W - What)^T||^2 / ||XW^T||^2 on dense-propagated H (32 windows). pool = the CAP / search rebuild from "
           "whitened pools; knapsack = the knapsack's loss model (relative); refit = the pool rebuild then "
           f"{meta['rounds']} round(s) of S backsolved on the pool's support and L refitted; admm = the deployed "
           "solve (defaults, 1 thread).", "",
           "| matrix | " + " | ".join(f"f={f:g} pool / knapsack / refit / admm" for f in fr) + " |",
           "|---|" + "---|" * len(fr)]
    by = {(r["matrix"], r["fraction"]): r for r in rows}
    for m in sorted({r["matrix"] for r in rows}, key=lambda k: (int(k.split(".")[0]), k)):
        out.append(f"| {m} | " + " | ".join(" / ".join(f"{by[m, f][k]:.4f}" for k in PROXIES + ("admm",))
                                            for f in fr) + " |")
    out += ["", "| f | " + " | ".join(f"mean admm / {k} error" for k in PROXIES) + " |", "|---|---|---|---|"]
    out += [f"| {f:g} | " + " | ".join(f"{summ[k]['admm_over_proxy'][f]:.3f}" for k in PROXIES) + " |" for f in fr]
    out += ["", "Error each matrix loses when f steps up (what an allocator trades): Spearman correlation over the "
            f"{summ['matrices']} matrices between the proxy's and admm's losses, and the mean losses.", "",
            "| step | " + " | ".join(f"Spearman {k}" for k in PROXIES) + " | "
            + " | ".join(f"mean loss {k}" for k in PROXIES + ("admm",)) + " |", "|---|" + "---|" * 7]
    for i, st in enumerate(summ["pool"]["steps"]):
        sts = [summ[k]["steps"][i] for k in PROXIES]
        out.append(f"| {st['from']:g} -> {st['to']:g} | " + " | ".join(f"{x['spearman']:.3f}" for x in sts) + " | "
                   + " | ".join(f"{x['proxy_gain_mean']:.4f}" for x in sts) + f" | {st['admm_gain_mean']:.4f} |")
    return "\n".join(out) + "\n"


def write_json(stem: Path, d: dict) -> None:
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=1))
    tmp.replace(stem.with_suffix(".json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 14, 29])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="backsolve + L refit rounds of the refit rebuild")
    ap.add_argument("--out", default=str(HERE / "level_fidelity"), help="path stem of the .json and .md")
    a = ap.parse_args()
    commit = _start_commit()

    import torch

    from slr.allocate.base import Matrix, whitener
    from slr.allocate.cap import _white_pools
    from slr.solvers import METHODS
    from slr.solvers.base import relative_error
    from slr.spec import LayerSpec

    torch.set_num_threads(1)
    pairs, _, _ = pairs_for(a.model, a.calib_samples, a.blocks, False)
    meta = {"commit": commit, "model": a.model, "calib_samples": a.calib_samples, "blocks": a.blocks,
            "fractions": a.fractions, "rank": a.rank, "rounds": a.rounds, "threads": 1}
    stem = Path(a.out)
    rows = []
    for key, (W, H) in pairs.items():
        block, name = key.split(".", 1)
        m = Matrix(int(block), name, W)
        white = whitener(H)
        pools = _white_pools(m, W, "slr", max(a.fractions) + 0.1, a.rank, white)
        for f in a.fractions:
            pool = relative_error(W, H, pools.rebuild(m, a.rank, int(f * m.numel)))
            knap = knapsack_proxy(m, white, a.rank, f)
            t = time.perf_counter()
            refit = relative_error(W, H, refit_rebuild(W, H, white, pools, m, a.rank, int(f * m.numel), a.rounds))
            refit_s = time.perf_counter() - t
            t = time.perf_counter()
            res = METHODS["admm"].fn(W, H.clone(), LayerSpec(sparsity=1.0 - f, rank=a.rank))
            secs = time.perf_counter() - t
            rows.append({"matrix": key, "shape": list(W.shape), "fraction": f, "pool": pool, "knapsack": knap,
                         "refit": refit, "admm": relative_error(W, H, res.dense()), "refit_seconds": refit_s,
                         "admm_seconds": secs})
            print(f"{key:22s} f={f:<5g} pool {pool:.5f}  knapsack {knap:.5f}  refit {refit:.5f}  "
                  f"admm {rows[-1]['admm']:.5f}  ({refit_s:.2f} s / {secs:.1f} s)", flush=True)
        write_json(stem, {"meta": meta, "rows": rows})  # after every matrix, so a stopped run keeps its rows
    summ = summarize(rows, a.fractions)
    write_json(stem, {"meta": meta, "summary": summ, "rows": rows})
    stem.with_suffix(".md").write_text(markdown(meta, rows, summ))
    print(markdown(meta, rows, summ))


if __name__ == "__main__":
    main()
