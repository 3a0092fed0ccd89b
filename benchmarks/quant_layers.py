"""Quantizing inside the solve vs quantizing the float solution afterwards, on real SmolLM2 (W, H) pairs.

  python benchmarks/quant_layers.py [--model smollm2-135m] [--calib-samples 16] [--blocks 0 14] [--admm-iters 130]
  python benchmarks/quant_layers.py --render     (rewrite the .md from the .json)

Pairs: q_proj, o_proj and down_proj of the given blocks, H = X^T X of the *dense* model's inputs on the calibration
windows (512 tokens each; slr.calibration.dense_block_hessians). For every pair and configuration, at 1 thread:

* float:  relative layer error ||X (W - What)^T||^2 / ||X W^T||^2 of the float solve (spec without bits),
* after:  that float solution rounded afterwards (S's kept values to its grid fitted on them, U and V by RTN),
* inside: the solver run with the bits (quantizing inside the solve),

and the seconds of both solves. For gptq/rtn the float solution is W itself, so "after" is RTN. "kept" =
(inside - float) / (after - float): the share of the rounding damage that quantizing inside still pays. Writes
benchmarks/quant_layers.json and benchmarks/quant_layers.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run import _start_commit  # benchmarks/run.py

HERE = Path(__file__).resolve().parent
MATRICES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def configs(admm_iters: int) -> list[tuple[str, str, dict, dict]]:
    """(label, method, LayerSpec fields, solver options)."""
    slr = {"nm": (2, 4), "rank": 32, "bits": 4, "group_size": 64, "factor_bits": 8}
    return [
        ("gptq q4 g64", "gptq", {"sparsity": 0.0, "bits": 4}, {}),
        ("gptq q3 g64", "gptq", {"sparsity": 0.0, "bits": 3}, {}),
        ("gptq q2 g64", "gptq", {"sparsity": 0.0, "bits": 2}, {}),
        ("gptq actorder q4 g64", "gptq", {"sparsity": 0.0, "bits": 4}, {"actorder": True}),
        ("gptq actorder q3 g64", "gptq", {"sparsity": 0.0, "bits": 3}, {"actorder": True}),
        ("gptq actorder q2 g64", "gptq", {"sparsity": 0.0, "bits": 2}, {"actorder": True}),
        ("rtn q4 g64", "rtn", {"sparsity": 0.0, "bits": 4}, {}),
        ("rtn q3 g64", "rtn", {"sparsity": 0.0, "bits": 3}, {}),
        ("sparsegpt 2:4 q4 g64", "sparsegpt", {"nm": (2, 4), "bits": 4}, {}),
        ("prune+lr 2:4 r32 q4 g64 f8", "prune+lr", slr, {}),
        ("admm 2:4 r32 q4 g64 f8", "admm", slr, {"max_iters": admm_iters}),
    ]


def round_after(res, spec):
    """The float solution with S's kept values rounded to the grid (fitted on them) and U, V by RTN."""
    from slr.quant import rtn

    out = rtn(res.S, spec.quant, res.mask)[0]
    if res.U is not None:
        qu, qv = spec.factor_quant(res.U.shape[1]), spec.factor_quant(res.V.shape[1])
        out = out + (rtn(res.U, qu)[0] if qu else res.U) @ (rtn(res.V, qv)[0] if qv else res.V)
    return out


def load_pairs(model_name: str, calib_samples: int, blocks: list[int],
               matrices: tuple[str, ...] | None = MATRICES) -> dict:
    """{"block.name": (W [d_out, d_in] float32, H [d_in, d_in] float64)} from the dense model.

    matrices: the linears' names inside a block (None = every linear; the matrices of one input group share one H).
    """
    from slr import load_model
    from slr.api import calibration_data
    from slr.calibration import dense_block_hessians
    from slr.config import CompressConfig

    model, tok, info = load_model(model_name)
    calib = calibration_data(tok, CompressConfig(method="gptq", bits=4, calib_samples=calib_samples, seqlen=512),
                             bos_per_window=info.bos_per_window)
    pairs = {}
    linears = dict(model.named_modules())
    for i, Hs in dense_block_hessians(model, calib, max_samples=calib_samples):
        if i in blocks:
            for name in (Hs if matrices is None else matrices):
                W = next(m.weight for n, m in linears.items() if n.endswith(f"layers.{i}.{name}"))
                pairs[f"{i}.{name}"] = (W.detach().float().clone(), Hs[name])
        if i >= max(blocks):
            break
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 14])
    ap.add_argument("--admm-iters", type=int, default=130, help="admm's max_iters (both arms)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    a = ap.parse_args()
    if a.render:
        d = json.loads((HERE / "quant_layers.json").read_text())
        (HERE / "quant_layers.md").write_text(markdown(d["meta"], d["rows"]))
        return
    commit = _start_commit()

    import torch

    from slr.config import LayerSpec
    from slr.solvers import METHODS
    from slr.solvers.base import relative_error

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pairs = load_pairs(a.model, a.calib_samples, a.blocks)
    t_h = time.perf_counter() - t0
    rows = []
    for label, method, fields, opts in configs(a.admm_iters):
        spec = LayerSpec(**fields)
        fspec = LayerSpec(sparsity=spec.sparsity, nm=spec.nm, rank=spec.rank)
        m = METHODS[method]
        for key, (W, H) in pairs.items():
            Hm = None if m.data_free else H
            t = time.perf_counter()
            inside = m.fn(W, Hm, spec, **opts)
            s_in = time.perf_counter() - t
            if method in ("gptq", "rtn"):  # the float solution is W itself
                fl_err, after, s_fl = 0.0, METHODS["rtn"].fn(W, None, spec).S, 0.0
            else:
                t = time.perf_counter()
                fl = m.fn(W, Hm, fspec, **opts)
                s_fl = time.perf_counter() - t
                fl_err, after = relative_error(W, H, fl.dense()), round_after(fl, spec)
            row = {"config": label, "method": method, "options": opts, "spec": spec.label, "pair": key,
                   "shape": list(W.shape), "float": fl_err, "after": relative_error(W, H, after),
                   "inside": relative_error(W, H, inside.dense()), "seconds_inside": s_in, "seconds_float": s_fl}
            rows.append(row)
            print(f"{label:28s} {key:22s} float {fl_err:.5f}  after {row['after']:.5f}  inside {row['inside']:.5f}"
                  f"  {s_in:.1f}s / {s_fl:.1f}s", flush=True)
    total = time.perf_counter() - t0
    meta = {"model": a.model, "calib_samples": a.calib_samples, "seqlen": 512, "blocks": a.blocks,
            "admm_iters": a.admm_iters, "threads": 1, "commit": commit, "seconds_hessians": t_h, "seconds": total,
            "torch": torch.__version__}
    (HERE / "quant_layers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (HERE / "quant_layers.md").write_text(markdown(meta, rows))
    print(f"wrote benchmarks/quant_layers.json and .md ({total:.0f} s)")


def kept(r: dict) -> str:
    """(inside - float) / (after - float), or a dash when rounding afterwards costs nothing (rtn)."""
    d = r["after"] - r["float"]
    return f"{(r['inside'] - r['float']) / d:.2f}" if d > 0 and r["inside"] != r["after"] else "–"


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [
        "## Quantizing inside the solve vs rounding the float solution (real SmolLM2 layers)\n",
        f"`python benchmarks/quant_layers.py` — {meta['model']}, H from the dense model on {meta['calib_samples']} "
        f"windows of 512 tokens, blocks {', '.join(map(str, meta['blocks']))} (q_proj, o_proj, down_proj), 1 thread, "
        f"admm max_iters {meta['admm_iters']}, commit {meta['commit']}. Relative layer error "
        "||X (W − Ŵ)ᵀ||² / ||X Wᵀ||²: *float* = the solve without bits, *after* = that solution rounded afterwards "
        "(S's kept values to their group grid, U and V by RTN), *inside* = the solver with the bits. For gptq/rtn "
        "the float solution is W, so *after* is RTN. *kept* = (inside − float) / (after − float), the share of the "
        "rounding damage that quantizing inside still pays. Group size 64, symmetric; f8 = 8-bit factors.\n",
        "### Mean over the pairs\n",
        "| config | float | after (RTN) | inside | inside / after | kept | s inside | s float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = list(dict.fromkeys(r["config"] for r in rows))
    for lab in labels:
        rs = [r for r in rows if r["config"] == lab]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("float", "after", "inside", "seconds_inside",
                                                             "seconds_float")}
        out.append(f"| {lab} | {mean['float']:.5f} | {mean['after']:.5f} | {mean['inside']:.5f} | "
                   f"{mean['inside'] / mean['after']:.2f} | {kept(mean)} | {mean['seconds_inside']:.1f} | "
                   f"{mean['seconds_float']:.1f} |")
    out += ["", "### Per pair\n", "| config | pair | float | after (RTN) | inside | inside / after | kept | s inside |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['pair']} | {r['float']:.5f} | {r['after']:.5f} | {r['inside']:.5f} | "
                   f"{r['inside'] / max(r['after'], 1e-30):.2f} | {kept(r)} | {r['seconds_inside']:.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
