"""Micro-benchmark of slr.kernels: one SLRLinear with a dense 4-bit S (symmetric, groups of 64, no factors) on
SmolLM2's four linear shapes, batch 1 (one token per call), against the dense float32 F.linear of the same weights.

Usage:  python benchmarks/kernels.py [--threads 1,2] [--seconds 0.08] [--stream-mb 256] [--note ...]
                                    [--out-json ...] [--out-md ...]

Random tensors only (no model). Per thread count and shape, each variant is timed in rounds of ``--seconds`` each,
interleaved, and its best round is kept ("hot": one layer, called again and again, so its weights stay in cache):
  dense fp32      F.linear(x, W) with W the dequantized S (what the uncompressed model runs)
  dense bf16      the same in bfloat16 (x and W)
  cpp raw         slr's C++ kernel alone (slr.csrc.int4_mm on the layer's packed S; missing when it is not built)
  cpp fp32        SLRLinear forward, kernel "auto" (the C++ kernel with the layer's Python around it)
  int4 fp32       SLRLinear forward, kernel "auto" with the C++ kernel off (torch's int4 kernel in float32)
  int4 bf16       SLRLinear forward, kernel "bf16" (x cast to bfloat16, the kernel's vectorized path, cast back)
  torch path      SLRLinear forward, kernel "torch" (S dequantized every call, then the CSR/dense matmul)
  cpp 2:4         the same layer with a 2:4 S (half the inputs of each row kept), kernel "auto": slr's 2:4 kernel
  2:4 torch path  that layer, kernel "torch" (what a 2:4 S ran before: MKL's CSR mat-vec at 1 token)
Ratios are time / dense fp32 time (< 1 = faster than dense). Also max |y - torch path| / max |y|.
"Streamed" times one call each of a ring of distinct layers of one shape holding --stream-mb of dense fp32 weights
(more than the caches), as a whole model's decode step reads its weights from memory: dense fp32 F.linear vs cpp
raw, cpp fp32 and cpp 2:4.
Writes benchmarks/kernels.json and benchmarks/kernels.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slr import csrc, kernels
from slr.nn import QSLRLinear
from slr.quant import QuantSpec, dequantize
from slr.solvers.base import SolveResult

HERE = Path(__file__).resolve().parent
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (d_in, d_out)
ROUNDS = 5
GS = 64


def layer(d_in: int, d_out: int, gs: int = GS, nm24: bool = False) -> tuple[QSLRLinear, torch.Tensor]:
    """A QSLRLinear with a 4-bit S (dense, or 2:4 with ``nm24``) and S as a dense float32 matrix."""
    g = torch.Generator().manual_seed(d_in * 7 + d_out)
    spec = QuantSpec(4, gs, True)
    codes = torch.randint(0, 16, (d_out, d_in), generator=g, dtype=torch.uint8)
    scale = (torch.rand(d_out, d_in // gs, generator=g) * 0.02 + 1e-3).half().float()
    zero = torch.full_like(scale, 8.0)
    mask = torch.ones(d_out, d_in, dtype=torch.bool)
    if nm24:
        r = torch.rand(d_out, d_in // 4, 4, generator=g)
        mask = torch.zeros_like(r, dtype=torch.bool).scatter_(2, r.topk(2, dim=2).indices, True).view(d_out, d_in)
    S = dequantize(codes, scale, zero, spec) * mask
    res = SolveResult(S=S, mask=mask, qparams={"S": (scale, zero)}, qspec={"S": spec})
    return QSLRLinear.from_result(res), S


def calls_for(fn, seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds`` (counted over a fifth of it, after one warm-up call)."""
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds / 5:
        fn()
        n += 1
    return max(1, 5 * n)


def best_times(fns: dict, seconds: float, modes: dict | None = None) -> dict:
    """Best time per call (microseconds) of each function over ROUNDS interleaved rounds; ``modes`` name -> (kernel
    setting, AUTO_CPP_MAX_TOKENS) in force while that function runs (set outside the timed loop)."""
    modes = modes or {}

    @contextlib.contextmanager
    def setting(k):
        mode, cpp_tokens = modes.get(k, ("auto", kernels.AUTO_CPP_MAX_TOKENS))
        prev, kernels.AUTO_CPP_MAX_TOKENS = kernels.AUTO_CPP_MAX_TOKENS, cpp_tokens
        try:
            with kernels.use_kernel(mode):
                yield
        finally:
            kernels.AUTO_CPP_MAX_TOKENS = prev

    calls = {}
    for k, f in fns.items():
        with setting(k):
            calls[k] = calls_for(f, seconds)
    best = {k: float("inf") for k in fns}
    for _ in range(ROUNDS):
        for k, f in fns.items():
            with setting(k):
                t = time.perf_counter()
                for _ in range(calls[k]):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t) / calls[k] * 1e6)
    return best


def variants(lin: QSLRLinear, W: torch.Tensor, x: torch.Tensor, cpp: bool,
             lin24: QSLRLinear | None = None) -> tuple[dict, dict]:
    """(name -> function, name -> (kernel setting, AUTO_CPP_MAX_TOKENS)) of the hot variants."""
    Wb, xb = W.bfloat16(), x.bfloat16()
    fns = {"dense fp32": lambda: F.linear(x, W), "dense bf16": lambda: F.linear(xb, Wb)}
    modes = {}
    if cpp:
        p = kernels.nibble_pack(lin)
        fns["cpp raw"] = lambda: csrc.int4_mm(x, p.weight, p.scale, p.sz, p.group_size)
        fns["cpp fp32"], modes["cpp fp32"] = (lambda: lin(x)), ("auto", kernels.AUTO_CPP_MAX_TOKENS)
    if kernels.HAVE_INT4:
        fns["int4 fp32"], modes["int4 fp32"] = (lambda: lin(x)), ("auto", 0)
        fns["int4 bf16"], modes["int4 bf16"] = (lambda: lin(x)), ("bf16", 0)
    fns["torch path"], modes["torch path"] = (lambda: lin(x)), ("torch", 0)
    if cpp and lin24 is not None:
        fns["cpp 2:4"], modes["cpp 2:4"] = (lambda: lin24(x)), ("auto", kernels.AUTO_CPP_MAX_TOKENS)
        fns["2:4 torch path"], modes["2:4 torch path"] = (lambda: lin24(x)), ("torch", 0)
    return fns, modes


def measure(d_in: int, d_out: int, seconds: float, cpp: bool) -> dict:
    lin, W = layer(d_in, d_out)
    lin24 = layer(d_in, d_out, nm24=True)[0] if d_in % 64 == 0 else None
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(0))
    fns, modes = variants(lin, W, x, cpp, lin24)
    with torch.inference_mode():
        with kernels.use_kernel("torch"):
            ref = lin(x)
            ref24 = None if lin24 is None else lin24(x)
        err, calls = {}, {}
        for k, f in fns.items():
            r = ref24 if "2:4" in k else ref
            kernels.CALLS.clear()
            with kernels.use_kernel(modes.get(k, ("auto", 0))[0]):
                prev, kernels.AUTO_CPP_MAX_TOKENS = kernels.AUTO_CPP_MAX_TOKENS, modes.get(k, ("auto", 0))[1]
                try:
                    err[k] = float((f().float() - r).abs().max() / r.abs().max())
                finally:
                    kernels.AUTO_CPP_MAX_TOKENS = prev
            calls[k] = dict(kernels.CALLS)
        want = {"cpp fp32": {"cpp-float32": 1}, "int4 fp32": {"int4-float32": 1}, "int4 bf16": {"int4-bfloat16": 1},
                "cpp 2:4": {"cpp-2:4-float32": 1}}
        assert all(calls[k] == v for k, v in want.items() if k in calls), calls
        best = best_times(fns, seconds, modes)
    base = best["dense fp32"]
    return {"d_in": d_in, "d_out": d_out, "us": best, "ratio": {k: v / base for k, v in best.items()},
            "rel_err_vs_torch_path": err}


def streamed(d_in: int, d_out: int, mb: float) -> dict:
    """One call each of a ring of distinct layers (mb of dense fp32 weights): dense F.linear vs the C++ kernel, raw
    and through SLRLinear."""
    n = max(2, int(mb * 2**20 / (d_in * d_out * 4)) + 1)
    lin, W = layer(d_in, d_out)
    ring = [(W.clone(), copy.deepcopy(lin)) for _ in range(n)]
    x = torch.randn(1, d_in, generator=torch.Generator().manual_seed(0))
    packs = [kernels.nibble_pack(m) for _, m in ring]  # built once, before timing
    lin24 = layer(d_in, d_out, nm24=True)[0] if d_in % 64 == 0 else None
    ring24 = [copy.deepcopy(lin24) for _ in range(n)] if lin24 is not None else []
    for m in ring24:
        kernels.nibble_pack(m)

    def dense():
        for w, _ in ring:
            F.linear(x, w)

    def raw():
        for p in packs:
            csrc.int4_mm(x, p.weight, p.scale, p.sz, p.group_size)

    def layers():
        for _, m in ring:
            m(x)

    def layers24():
        for m in ring24:
            m(x)

    with torch.inference_mode():
        fns = {"dense fp32": dense, "cpp raw": raw, "cpp fp32": layers}
        if ring24:
            fns["cpp 2:4"] = layers24
        best = {k: v / n for k, v in best_times(fns, 0.0).items()}
    return {"d_in": d_in, "d_out": d_out, "layers": n, "us": best,
            "ratio": {k: v / best["dense fp32"] for k, v in best.items()}}


def run(threads: int, seconds: float, stream_mb: float, note: str = "") -> dict:
    torch.set_num_threads(threads)
    cpp = csrc.load() is not None
    if not cpp:
        print(f"slr's C++ kernel is unavailable ({csrc.reason()}): no cpp column", flush=True)
    rows, stream = [], []
    for d_in, d_out in SHAPES:
        rows.append(measure(d_in, d_out, seconds, cpp))
        print(f"{threads} thr {d_in}x{d_out}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rows[-1]["ratio"].items()),
              flush=True)
    if cpp and stream_mb > 0:
        for d_in, d_out in SHAPES:
            stream.append(streamed(d_in, d_out, stream_mb))
            print(f"{threads} thr {d_in}x{d_out} streamed: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in stream[-1]["ratio"].items()), flush=True)
    return {"torch": torch.__version__, "threads": threads, "machine": platform.processor() or platform.machine(),
            "batch": 1, "group_size": GS, "sym": True, "rounds": ROUNDS, "seconds_per_round": seconds,
            "stream_mb": stream_mb, "note": note, "rows": rows, "streamed": stream}


def markdown(runs: list[dict]) -> str:
    r0 = runs[0]
    lines = [f"# slr.kernels micro-benchmark (torch {r0['torch']}, batch 1, 4-bit g{r0['group_size']} sym)", "",
             "Time per call relative to the dense float32 F.linear of the same weights (< 1 = faster); "
             f"dense fp32 in microseconds. Best of {r0['rounds']} interleaved rounds. Random tensors; see "
             "benchmarks/kernels.py.", "", *([f"Note: {r0['note']}", ""] if r0.get("note") else [])]
    for r in runs:
        keys = list(r["rows"][0]["us"])
        lines += [f"## {r['threads']} thread{'s' if r['threads'] > 1 else ''}", "",
                  "Hot (one layer, weights in cache):", "",
                  "| d_in x d_out | dense fp32 (us) | " + " | ".join(keys) + " | cpp / int4 bf16 rel. error |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        for row in r["rows"]:
            err = row["rel_err_vs_torch_path"]
            lines.append(f"| {row['d_in']} x {row['d_out']} | {row['us']['dense fp32']:.0f} | "
                         + " | ".join(f"{row['ratio'].get(k, float('nan')):.2f}" for k in keys)
                         + f" | {err.get('cpp fp32', float('nan')):.1e} / {err.get('int4 bf16', float('nan')):.1e} |")
        if r["streamed"]:
            lines += ["", f"Streamed (a ring of distinct layers, {r['stream_mb']:.0f} MB of dense fp32 weights, one "
                      "call each, as in a whole model's decode step):", "",
                      "| d_in x d_out | layers | dense fp32 (us) | cpp raw | cpp fp32 | cpp 2:4 |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {s['d_in']} x {s['d_out']} | {s['layers']} | {s['us']['dense fp32']:.0f} | "
                      f"{s['ratio']['cpp raw']:.2f} | {s['ratio']['cpp fp32']:.2f} | "
                      f"{s['ratio'].get('cpp 2:4', float('nan')):.2f} |" for s in r["streamed"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--seconds", type=float, default=0.08, help="length of one timing round per variant")
    ap.add_argument("--stream-mb", type=float, default=256, help="dense fp32 weights in the streamed ring (0: skip)")
    ap.add_argument("--note", default="", help="a remark stored with the numbers (e.g. the machine was busy)")
    ap.add_argument("--out-json", default=str(HERE / "kernels.json"))
    ap.add_argument("--out-md", default=str(HERE / "kernels.md"))
    a = ap.parse_args()
    runs = [run(int(t), a.seconds, a.stream_mb, a.note) for t in a.threads.split(",")]
    Path(a.out_json).write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    Path(a.out_md).write_text(markdown(runs))
    print(f"wrote {a.out_json} and {a.out_md}")


if __name__ == "__main__":
    main()
