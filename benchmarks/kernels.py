"""Micro-benchmark of slr.kernels: one SLRLinear with a dense 4-bit S (symmetric, groups of 64, no factors) on
SmolLM2's four linear shapes, batch 1 (one token per call), against the dense float32 F.linear of the same weights.

Usage:  python benchmarks/kernels.py [--threads 2] [--seconds 0.08] [--out-json ...] [--out-md ...]

Random tensors only (no model). Per shape, each variant is timed in rounds of ``--seconds`` each, interleaved, and
its best round is kept:
  dense fp32      F.linear(x, W) with W the dequantized S (what the uncompressed model runs)
  dense bf16      the same in bfloat16 (x and W)
  int4 fp32       SLRLinear forward, kernel "auto" (torch's int4 kernel computing in float32)
  int4 bf16       SLRLinear forward, kernel "bf16" (x cast to bfloat16, the kernel's vectorized path, cast back)
  torch path      SLRLinear forward, kernel "torch" (S dequantized every call, then the CSR/dense matmul)
Ratios are time / dense fp32 time (< 1 = faster than dense). Also max |y - torch path| / max |y|.
Writes benchmarks/kernels.json and benchmarks/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slr import kernels
from slr.nn import QSLRLinear
from slr.quant import QuantSpec, dequantize
from slr.solvers.base import SolveResult

HERE = Path(__file__).resolve().parent
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (d_in, d_out)
ROUNDS = 5


def layer(d_in: int, d_out: int, gs: int = 64) -> tuple[QSLRLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(d_in * 7 + d_out)
    spec = QuantSpec(4, gs, True)
    codes = torch.randint(0, 16, (d_out, d_in), generator=g, dtype=torch.uint8)
    scale = (torch.rand(d_out, d_in // gs, generator=g) * 0.02 + 1e-3).half().float()
    zero = torch.full_like(scale, 8.0)
    S = dequantize(codes, scale, zero, spec)
    res = SolveResult(S=S, mask=torch.ones_like(S, dtype=torch.bool), qparams={"S": (scale, zero)}, qspec={"S": spec})
    return QSLRLinear.from_result(res), S


def calls_for(fn, seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds`` (counted over a fifth of it, after one warm-up call)."""
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds / 5:
        fn()
        n += 1
    return max(1, 5 * n)


def variants(lin: QSLRLinear, W: torch.Tensor, x: torch.Tensor) -> dict:
    Wb, xb = W.bfloat16(), x.bfloat16()

    def mode(m):
        def f():
            with kernels.use_kernel(m):
                return lin(x)
        return f

    return {"dense fp32": lambda: F.linear(x, W), "dense bf16": lambda: F.linear(xb, Wb),
            "int4 fp32": mode("auto"), "int4 bf16": mode("bf16"), "torch path": mode("torch")}


def measure(d_in: int, d_out: int, seconds: float) -> dict:
    lin, W = layer(d_in, d_out)
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(0))
    fns = variants(lin, W, x)
    with torch.inference_mode():
        ref = fns["torch path"]()
        err = {k: float((f().float() - ref).abs().max() / ref.abs().max()) for k, f in fns.items()}
        kernels.CALLS.clear()
        fns["int4 fp32"]()
        fns["int4 bf16"]()
        assert kernels.CALLS == {"int4-float32": 1, "int4-bfloat16": 1}, dict(kernels.CALLS)
        calls = {k: calls_for(f, seconds) for k, f in fns.items()}
        best = {k: float("inf") for k in fns}
        for _ in range(ROUNDS):
            for k, f in fns.items():
                t = time.perf_counter()
                for _ in range(calls[k]):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t) / calls[k] * 1e6)
    base = best["dense fp32"]
    return {"d_in": d_in, "d_out": d_out, "us": best, "ratio": {k: v / base for k, v in best.items()},
            "rel_err_vs_torch_path": err}


def run(threads: int, seconds: float, note: str = "") -> dict:
    torch.set_num_threads(threads)
    rows = []
    for d_in, d_out in SHAPES:
        rows.append(measure(d_in, d_out, seconds))
        print(f"{d_in}x{d_out}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rows[-1]["ratio"].items()), flush=True)
    return {"torch": torch.__version__, "threads": threads, "machine": platform.processor() or platform.machine(),
            "batch": 1, "group_size": 64, "sym": True, "rounds": ROUNDS, "seconds_per_round": seconds, "note": note,
            "rows": rows}


def markdown(r: dict) -> str:
    keys = list(r["rows"][0]["us"])
    lines = [f"# slr.kernels micro-benchmark (torch {r['torch']}, {r['threads']} threads, batch 1, 4-bit g64 sym)",
             "", "Time per call relative to the dense float32 F.linear of the same weights (< 1 = faster); "
             "dense fp32 in microseconds. Best of "
             f"{r['rounds']} interleaved rounds. Random tensors; see benchmarks/kernels.py.", "",
             *([f"Note: {r['note']}", ""] if r.get("note") else []),
             "| d_in x d_out | dense fp32 (us) | " + " | ".join(keys) + " | int4 bf16 rel. error |",
             "|---|---|" + "---|" * len(keys) + "---|"]
    for row in r["rows"]:
        lines.append(f"| {row['d_in']} x {row['d_out']} | {row['us']['dense fp32']:.0f} | "
                     + " | ".join(f"{row['ratio'][k]:.2f}" for k in keys)
                     + f" | {row['rel_err_vs_torch_path']['int4 bf16']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=0.08, help="length of one timing round per variant")
    ap.add_argument("--note", default="", help="a remark stored with the numbers (e.g. the machine was busy)")
    ap.add_argument("--out-json", default=str(HERE / "kernels.json"))
    ap.add_argument("--out-md", default=str(HERE / "kernels.md"))
    a = ap.parse_args()
    r = run(a.threads, a.seconds, a.note)
    Path(a.out_json).write_text(json.dumps(r, indent=2) + "\n")
    Path(a.out_md).write_text(markdown(r))
    print(f"wrote {a.out_json} and {a.out_md}")


if __name__ == "__main__":
    main()
