"""Decode cost of each stored S layout: one token through S alone (no factors, no bias) in slr's C++ layer kernel,
on SmolLM2's four linear shapes, in nanoseconds per weight, against the 4-bit nibble layout of the same shape.

Usage:  python benchmarks/lane_kernels.py [--threads 1,2] [--stream-mb 96] [--out-json ...] [--out-md ...]

Random codes and fp16 group scales (groups of 64, asymmetric: uint8 zero points for the lanes), no model. Per thread
count, shape and layout:
  hot       one layer called again and again (its bytes stay in cache): the kernel's arithmetic
  streamed  one call each over a ring of distinct layers holding --stream-mb of packed S (more than the L3 cache),
            as a decode step reads a model's weights from memory
Each is the best of 5 interleaved rounds. "q8" rows: the same layers under the kernel setting q8 (x read as int8
activations; slr.kernels). Layouts: nibble (4-bit), lanes2 / lanes3 / lanes8 (2-, 3- and 8-bit codes
at their own width; slr.lowbit), nibble-2:4 / float16-2:4 (2:4 sparse S, two kept inputs of every four at random,
4-bit codes or float16 values, with their 2-bit positions; ns per weight of the dense shape). Bytes per weight counts
the codes or values, the positions, and the per-group scale and zero point as stored.
Writes benchmarks/lane_kernels.json and benchmarks/lane_kernels.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import torch
from layers import machine

from slr import csrc, kernels, lowbit
from slr.api import git_commit
from slr.packed import PackedLinear

HERE = Path(__file__).resolve().parent
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (d_in, d_out)
LAYOUTS = {"nibble": 4, "lanes2": 2, "lanes3": 3, "lanes8": 8, "nibble-2:4": 4, "float16-2:4": 16}
GS, ROUNDS = 64, 5
Q8 = ("nibble", "lanes2", "lanes3")  # layouts that also run under the kernel setting "q8" (int8 activations)


def s_layer(layout: str, K: int, N: int, seed: int) -> PackedLinear:
    """A PackedLinear holding only a random S of ``layout`` (no factors, no bias)."""
    bits, g = LAYOUTS[layout], torch.Generator().manual_seed(seed)
    if layout.endswith("2:4"):  # two kept inputs of every four, at random
        r = torch.rand(N, K // 4, 4, generator=g)
        cols = r.topk(2, dim=2).indices.sort(dim=2).values + 4 * torch.arange(K // 4)[None, :, None]
        cols, index = cols.view(N, K // 2), kernels.nm24_index(cols.view(N, K // 2))
        if bits == 16:
            return PackedLinear(K, N, torch.randn(N, K // 2, generator=g).half(), index, None, None, 0, None, None,
                                None, None, None)
    codes = torch.randint(0, 2 ** bits, (N, K), generator=g, dtype=torch.uint8)
    scale = ((torch.rand(N, K // GS, generator=g) + 0.1) * 0.05).half()
    zero = torch.randint(0, 2 ** bits, (N, K // GS), generator=g)
    if layout == "nibble-2:4":
        return PackedLinear(K, N, kernels.nibble_codes(codes.gather(1, cols)), index, scale.float(),
                            scale.float() * zero, GS, None, None, None, None, None)
    if bits == 4:
        return PackedLinear(K, N, kernels.nibble_codes(codes), None, scale.float(), scale.float() * zero, GS, None,
                            None, None, None, None)
    return PackedLinear(K, N, lowbit.lane_codes(codes, bits), None, scale, None, GS, None, None, None, None, None,
                        bits=bits, s_zero=zero.to(torch.uint8))


def stored_bytes(lin: PackedLinear) -> int:
    """Bytes of the codes and group parameters as the artifact stores them (fp16 scales; 4-bit: fp16 scale and a
    4-bit zero point, which the loaded layer widens to float32 scale and scale * zero)."""
    n = lin.s_values.numel() * lin.s_values.element_size() + (0 if lin.s_index is None else lin.s_index.numel())
    groups = 0 if lin.s_scale is None else lin.out_features * lin.in_features // GS
    return n + groups * (2 + (1 if lin.bits != 4 else 0.5))


def time_calls(addrs: list[int], x: torch.Tensor, y: torch.Tensor, threads: int, reps: int) -> float:
    """Seconds per call of slr_layer_mm over ``addrs`` (each called ``reps`` times in ring order)."""
    lib = csrc.load()
    t = time.perf_counter()
    for _ in range(reps):
        for a in addrs:
            lib.slr_layer_mm(a, x.data_ptr(), 1, None, y.data_ptr(), threads)
    return (time.perf_counter() - t) / (reps * len(addrs))


def measure(K: int, N: int, threads: int, stream_mb: float) -> dict:
    """ns per weight, hot and streamed, of every layout on one shape."""
    x, y = torch.randn(1, K, generator=torch.Generator().manual_seed(1)), torch.empty(1, N)
    rings, out = {}, {}
    for layout in LAYOUTS:
        one = s_layer(layout, K, N, 0)
        count = max(2, int(stream_mb * 2 ** 20 / stored_bytes(one)))
        mods = [one] + [s_layer(layout, K, N, i) for i in range(1, count)]
        descs = [m._layer() for m in mods]  # each module keeps its record alive (a second _layer() replaces it)
        rings[layout] = (mods, [d[1] for d in descs])
        out[layout] = {"bytes_per_weight": stored_bytes(one) / (K * N), "ring_layers": count,
                       "hot_ns": float("inf"), "streamed_ns": float("inf")}
        if layout in Q8:  # the same layers, read with int8 activations: copies of their records with act8 set
            recs = [csrc.Layer.from_buffer_copy(d[0]) for d in descs]
            for rec in recs:
                rec.act8 = 1
            rings[f"{layout} q8"] = ((mods, recs), [ctypes.addressof(rec) for rec in recs])
            out[f"{layout} q8"] = dict(out[layout])
    hot_reps = max(20, int(2e7 / (K * N)))
    for _ in range(ROUNDS):
        for layout, (_, addrs) in rings.items():
            r = out[layout]
            r["hot_ns"] = min(r["hot_ns"], time_calls(addrs[:1], x, y, threads, hot_reps) * 1e9 / (K * N))
            r["streamed_ns"] = min(r["streamed_ns"], time_calls(addrs, x, y, threads, 2) * 1e9 / (K * N))
    return out


def write_md(res: dict, path: Path) -> None:
    lines = ["## Lane kernels: decode cost of each S layout", "",
             f"Generated by `python benchmarks/lane_kernels.py` ({res['date']}, commit {res['commit']}). "
             f"{res['cpu']}, torch {res['torch']}. One token through S alone in slr's C++ layer kernel; random codes, "
             "fp16 group scales, groups of 64; ns per weight, best of 5 interleaved rounds; hot = one layer again and "
             f"again, streamed = a ring of distinct layers holding {res['stream_mb']} MB of packed S. "
             "The ratio is the layout's ns over the nibble layout's (< 1 = cheaper per weight). A \"q8\" row is the "
             "layout under the kernel setting q8 (int8 activations), its ratio against the float32 nibble row.", ""]
    for t, shapes in res["threads"].items():
        lines += [f"### {t} thread(s)", "", "| d_in x d_out | layout | bytes / weight | hot ns/w | hot vs nibble | "
                  "streamed ns/w | streamed vs nibble |", "|---|---|---:|---:|---:|---:|---:|"]
        for shape, lay in shapes.items():
            nib = lay["nibble"]
            for name, r in lay.items():
                lines.append(f"| {shape} | {name} | {r['bytes_per_weight']:.3f} | {r['hot_ns']:.4f} | "
                             f"{r['hot_ns'] / nib['hot_ns']:.2f} | {r['streamed_ns']:.4f} | "
                             f"{r['streamed_ns'] / nib['streamed_ns']:.2f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--stream-mb", type=float, default=96.0, help="packed S per ring, MB (default 96)")
    ap.add_argument("--out-json", type=Path, default=HERE / "lane_kernels.json")
    ap.add_argument("--out-md", type=Path, default=HERE / "lane_kernels.md")
    args = ap.parse_args()
    if csrc.load() is None:
        raise SystemExit(f"slr's C++ kernels are unavailable: {csrc.reason()}")
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": git_commit(), "torch": torch.__version__,
           "cpu": machine(), "stream_mb": args.stream_mb, "threads": {}}
    for t in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(t)
        res["threads"][str(t)] = {f"{K} x {N}": measure(K, N, t, args.stream_mb) for K, N in SHAPES}
        print(f"{t} thread(s) done", flush=True)
    args.out_json.write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, args.out_md)
    print(args.out_md.read_text())


if __name__ == "__main__":
    main()
