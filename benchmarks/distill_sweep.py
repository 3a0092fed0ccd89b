"""Learning-rate / schedule sweep for slr.distill on a saved artifact (how its defaults were chosen).

For each setting: load the artifact trainable (``slr.load(packed=False)``), the dense source model as the teacher,
the run's calibration windows (CompressConfig defaults: 128 windows of 512 tokens, seed 0), run ``distill_`` and
score the perplexity on the first --windows test windows. One JSON line per setting goes to --out (and stdout).

    python benchmarks/distill_sweep.py runs/smollm2-wanda-u50 --lr 3e-5,1e-4,3e-4 --epochs 1 --samples 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--model", default="smollm2-135m", help="the dense source (the teacher)")
    ap.add_argument("--lr", default="1e-4", help="comma-separated learning rates")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None, help="training windows (default: all but the held-out)")
    ap.add_argument("--heldout", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--windows", type=int, default=16, help="test windows for the perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from run import _start_commit

    from slr import io
    from slr.api import calibration_data, open_model
    from slr.config import CompressConfig, DistillConfig
    from slr.data.corpora import load_text
    from slr.distill import distill_
    from slr.eval.ppl import perplexity
    from slr.models.adapters import get_adapter

    teacher, tok, info = open_model(a.model)
    calib = calibration_data(tok, CompressConfig(method="wanda"), bos_per_window=info["bos_per_window"])
    text = load_text(None, "test")[0]

    def ppl(m) -> float:
        return perplexity(m, tok, text, windows=a.windows, bos_per_window=info["bos_per_window"],
                          progress=False).ppl

    base = None
    for lr in [float(x) for x in a.lr.split(",")]:
        model, _ = io.load(a.artifact, packed=False)
        if base is None:
            base = ppl(model)
        cfg = DistillConfig(lr=lr, epochs=a.epochs, batch_size=a.batch_size, max_samples=a.samples,
                            heldout=a.heldout)
        t = time.perf_counter()
        stats = distill_(model, teacher, calib, get_adapter(model).blocks(model), cfg, progress=False)
        rec = {"artifact": a.artifact, "lr": lr, "epochs": a.epochs, "samples": stats["windows"],
               "heldout": stats["heldout_windows"], "batch_size": a.batch_size, "ppl_windows": a.windows,
               "ppl_before": base, "ppl_after": ppl(model), "kl_before": stats.get("kl_before"),
               "kl_after": stats.get("kl_after"), "heldout_kl": stats.get("heldout_kl"),
               "kept_epoch": stats.get("kept_epoch"), "seconds": round(time.perf_counter() - t, 1),
               "threads": a.threads, "git_commit": _start_commit()}
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
