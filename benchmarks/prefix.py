"""What the search's prefix reuse saves per scored plan (``allocate.prefix``; issue 22).

  python benchmarks/prefix.py [--model smollm2-135m] [--windows 8] [--tokens 256] [--draws 12] [--repeats 3]

On solved levels a search offspring moves two pairs of matrices a level, so it runs from the first block holding one
of them, on the parent's recorded inputs. Here, on the real model and calibration windows (the g50 fitness: 8 windows
x 256 tokens, batches of 4), ``draws`` offspring are drawn as the mutation draws them (4 distinct matrices uniform
over the model's linears), and each is scored twice in the same process, best of ``repeats``: the full forward and
the forward from its first changed block, both with the KL to the dense distribution that the fitness adds. Reports
the summed seconds of both and their ratio, and checks that both give the same loss. The weights are the dense
model's (a forward costs the same whatever the weights hold). Writes benchmarks/prefix.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run import _start_commit  # benchmarks/run.py

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    commit = _start_commit()

    import torch
    import torch.nn.functional as F

    from slr.allocate.base import matrices
    from slr.allocate.prefix import logits_from
    from slr.api import open_model
    from slr.data.calib import calibration_windows, tokenize_text
    from slr.data.corpora import load_text
    from slr.kl import kl
    from slr.models.adapters import get_adapter

    model, tok, info = open_model(a.model, "cpu")
    model.eval()
    bos = tok.bos_token_id if info["bos_per_window"] else None
    torch.manual_seed(0)
    calib = calibration_windows(tokenize_text(tok, load_text(None, "calibration")[0]), 2 * a.windows, 512, 0,
                                bos_id=bos)[:a.windows, :a.tokens]
    batches = [calib[s:s + a.batch_size] for s in range(0, len(calib), a.batch_size)]
    blocks = get_adapter(model).blocks(model)
    block_of = [m.block for m in matrices(model)]
    records, dense = [], []
    for ids in batches:
        out, seen = logits_from(model, blocks, ids, 0, None)
        records.append(seen)
        dense.append(F.log_softmax(out, -1))

    def score(start: int) -> tuple[float, float]:
        best, loss = float("inf"), 0.0
        for _ in range(a.repeats):
            t = time.perf_counter()
            loss = sum(float(kl(logits_from(model, blocks, ids, start, rec if start else None)[0], d))
                       for ids, rec, d in zip(batches, records, dense))
            best = min(best, time.perf_counter() - t)
        return best, loss

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(a.draws):
        moved = torch.randperm(len(block_of), generator=gen)[:4].tolist()
        first = min(block_of[j] for j in moved)
        t_full, l_full = score(0)
        t_pre, l_pre = score(first)
        rows.append({"draw": i, "first_block": first, "full_s": round(t_full, 3), "prefix_s": round(t_pre, 3),
                     "same_loss": l_full == l_pre})
        print(rows[-1], flush=True)
    full, pre = sum(r["full_s"] for r in rows), sum(r["prefix_s"] for r in rows)
    out = {"model": a.model, "windows": a.windows, "tokens": a.tokens, "batch_size": a.batch_size,
           "blocks": len(blocks), "threads": torch.get_num_threads(), "git_commit": commit, "full_s": round(full, 2),
           "prefix_s": round(pre, 2), "ratio": round(pre / full, 3),
           "mean_first_block": sum(r["first_block"] for r in rows) / len(rows),
           "all_same_loss": all(r["same_loss"] for r in rows), "rows": rows}
    (HERE / "prefix.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["## Prefix reuse in the search's fitness", "",
          f"`python benchmarks/prefix.py` — {a.model}, {a.windows} windows x {a.tokens} tokens in batches of "
          f"{a.batch_size}, {out['threads']} threads, commit {commit}, {a.draws} offspring drawn as the solved-level "
          f"mutation draws them (4 matrices), best of {a.repeats} each, both paths timed in the same process.", "",
          "| first changed block | full forward + KL (s) | from that block (s) | same loss |", "|---|---|---|---|"]
    md += [f"| {r['first_block']} | {r['full_s']} | {r['prefix_s']} | {'yes' if r['same_loss'] else 'NO'} |"
           for r in rows]
    md += ["", f"Summed: {out['full_s']} s full, {out['prefix_s']} s from the first changed block: **{out['ratio']}x** "
           f"the time (mean first changed block {out['mean_first_block']:.1f} of {len(blocks)}); the head and the KL "
           "run either way."]
    (HERE / "prefix.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
