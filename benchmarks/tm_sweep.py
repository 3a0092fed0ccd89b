"""Transformer matching's schedule, block by block (issue 24): held-out loss against TM seconds per setting.

  python benchmarks/tm_sweep.py [--model smollm2-135m] [--blocks 5 20] [--method admm] [--pattern 2:4] [--rank 32]
                                [--train 32] [--heldout 16] [--settings lr=2e-5,epochs=8 lr=1e-4,epochs=8 ...]
                                [--threads 2] [--out-json benchmarks/tm_sweep.json] [--out-md benchmarks/tm_sweep.md]

For each block in ``--blocks``: its inputs come from the *dense* path (the dense blocks before it, unlike a real run,
where they come from the compressed blocks), its linears are solved once with ``--method`` at the spec (the pipeline's
own ``solve_group``), and then each ``--settings`` entry runs ``slr.refine.transformer_match_`` on its own copy of the
compressed block: the same ``--train`` training windows and ``--heldout`` held-out windows for every setting. A setting
is ``key=value`` pairs of ``slr.RefineConfig`` joined by commas (``lr``, ``epochs``, ``batch_size``,
``final_lr_frac``); the rest are RefineConfig's defaults.

Per (block, setting): held-out MSE before TM and at its best epoch (the gain is the share removed), the epoch it was
reached, the held-out curve, and TM's seconds. The json is rewritten after every setting; a ``note`` key added to it
by hand (how the run was made) is printed under the table's heading.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from run import _start_commit  # benchmarks/run.py

HERE = Path(__file__).resolve().parent


def parse_setting(text: str) -> dict:
    """'lr=1e-4,epochs=8' -> {'lr': 1e-4, 'epochs': 8} (ints stay ints)."""
    out = {}
    for part in text.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v) if v.strip().isdigit() else float(v)
    return out


def sweep(args) -> dict:
    import torch

    from slr import load_model
    from slr.api import calibration_data
    from slr.calibration import block_forward, capture_inputs, map_hidden
    from slr.config import CompressConfig, RefineConfig
    from slr.distributed import current
    from slr.models.adapters import get_adapter
    from slr.pipeline import _apply_results, _collect, solve_group
    from slr.refine import transformer_match_
    from slr.spec import LayerSpec, parse_nm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok, info = load_model(args.model)
    n = args.train + args.heldout
    calib = calibration_data(tok, CompressConfig(method="gptq", bits=4, calib_samples=n, seqlen=512),
                             bos_per_window=info.bos_per_window)
    adapter = get_adapter(model)
    inputs = capture_inputs(model, adapter, calib, 4, "cpu")
    spec = LayerSpec(nm=parse_nm(args.pattern), rank=args.rank)
    out = {"model": args.model, "method": args.method, "pattern": args.pattern, "rank": args.rank,
           "train": args.train, "heldout": args.heldout, "threads": args.threads, "commit": _start_commit(),
           "rows": []}
    for i, block in enumerate(adapter.blocks(model)):
        if i > max(args.blocks):
            break
        if i in args.blocks:
            linears = adapter.linears(block)
            groups = [g for g in adapter.groups if all(nm in linears for nm in g)]
            Hs, targets = _collect(block, i, inputs, linears, groups, True, current())
            comp = copy.deepcopy(block)
            lin = adapter.linears(comp)
            t = time.perf_counter()
            for g in groups:
                res = solve_group(args.method, {nm: lin[nm].weight.detach().float() for nm in g}, Hs[g],
                                  {nm: spec for nm in g})
                _apply_results(comp, adapter, res, "slr")
            solve_s = time.perf_counter() - t
            for text in args.settings:
                kw = parse_setting(text)
                cfg = RefineConfig(**{"max_samples": args.train, "heldout": args.heldout, **kw})
                s = transformer_match_(copy.deepcopy(comp), i, inputs, targets, cfg, progress=False)
                curve = s["heldout_losses"]
                row = {"block": i, "setting": text, "solve_s": round(solve_s, 1), "tm_s": round(s["seconds"], 1),
                       "heldout_before": s["heldout_loss_before"], "heldout_after": s["heldout_loss_after"],
                       "gain": 1 - s["heldout_loss_after"] / s["heldout_loss_before"],
                       "kept_epoch": s["kept_epoch"], "heldout_curve": curve, "steps": s["steps"]}
                out["rows"].append(row)
                print(f"block {i} {text}: held-out {row['heldout_before']:.4e} -> {row['heldout_after']:.4e} "
                      f"({100 * row['gain']:.1f}%, epoch {row['kept_epoch']}), {row['tm_s']} s", flush=True)
                Path(args.out_json).write_text(json.dumps(out, indent=1) + "\n")
        with torch.no_grad():  # the dense path
            inputs.hidden = map_hidden(inputs.hidden, lambda h, b=block, j=i: block_forward(b, inputs, j, h))
    return out


def render(data: dict) -> str:
    lines = ["## Transformer matching: schedule sweep per block", "",
             f"`python benchmarks/tm_sweep.py` — {data['model']}, {data['method']} {data['pattern']} + rank "
             f"{data['rank']}, each block's inputs from the dense path; TM trains on {data['train']} windows and is "
             f"judged on {data['heldout']} others (512 tokens); {data['threads']} threads; commit {data['commit']}. "
             "Gain = share of the held-out block MSE that TM removes (best epoch kept)." +
             (f" {data['note']}" if data.get("note") else ""), "",
             "| block | setting | held-out before | held-out after | gain | kept epoch | TM s |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['block']} | {r['setting']} | {r['heldout_before']:.4e} | {r['heldout_after']:.4e} | "
                     f"{100 * r['gain']:.1f}% | {r['kept_epoch']} | {r['tm_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--method", default="admm")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--settings", nargs="+",
                    default=["lr=2e-5,epochs=8", "lr=1e-4,epochs=8", "lr=3e-4,epochs=8", "lr=1e-3,epochs=8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-json", default=str(HERE / "tm_sweep.json"))
    ap.add_argument("--out-md", default=str(HERE / "tm_sweep.md"))
    ap.add_argument("--render", action="store_true", help="rewrite --out-md from --out-json")
    args = ap.parse_args()
    data = json.loads(Path(args.out_json).read_text()) if args.render else sweep(args)
    Path(args.out_md).write_text(render(data))


if __name__ == "__main__":
    main()
