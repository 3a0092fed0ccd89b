"""The search on levels solved in the pipeline (``--alloc-opt level_solve=pipeline``; issue 22).

``benchmarks/level_transfer.md`` found that the solved-level fitness scored a model far from the deployed one (every
matrix solved on its own on the dense H, by a short schedule). Here the levels are solved where the deployed model
is: the pipeline compresses the knapsack start plan block by block, and at each matrix also solves its other levels on
the same H. The script runs that level pass and the search (``search.evolve``), then scores the start and the search
plan two ways: the ppl of their levels models (64 wiki-sample windows, as the benchmarks) and, with ``--deploy``,
the ppl of the search plan compressed again by the pipeline (its own H everywhere; ``slr compress`` instead takes
the solved levels as they are, ``Plan.solved``). Writes pipeline_search.json (after each phase) and
pipeline_search.md.

    python benchmarks/pipeline_search.py --config g70 --levels 3 --generations 20 \
        --level-cache benchmarks/.cache/levels-pipeline [--deploy]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from run import CONFIGS, _start_commit

from slr.allocate.cap import prepare
from slr.allocate.levels import Fitness
from slr.allocate.search import evolve
from slr.api import _calibration_windows, open_model
from slr.config import AllocConfig, CompressConfig
from slr.data.corpora import load_text
from slr.eval.ppl import perplexity
from slr.pipeline import compress_
from slr.plan import Plan

HERE = Path(__file__).parent
OUT = HERE / "pipeline_search.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default="g70", help="a config id of benchmarks/run.py with a budget")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--span", type=float, default=0.1)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--windows", type=int, default=64, help="wiki-sample windows of the ppl")
    ap.add_argument("--level-cache", default="benchmarks/.cache/levels-pipeline")
    ap.add_argument("--deploy", action="store_true", help="also compress the search plan again and evaluate it")
    ap.add_argument("--report", action="store_true", help="only rebuild pipeline_search.md from the json")
    a = ap.parse_args()
    if a.report:
        return report(json.loads(OUT.read_text()))
    torch.manual_seed(0)
    c = CONFIGS[a.config]
    # as benchmarks/run.py builds it (solver={}: admm's defaults)
    config = CompressConfig(method="admm", sparsity=c["sparsity"], pattern=c["pattern"], rank=c["rank"], solver={},
                            alloc=AllocConfig("search", budget=c["budget"]))
    model, tok, info = open_model(a.model)
    calib = _calibration_windows(tok, config, load_text(None, "calibration")[0], info["bos_per_window"])
    text = load_text(None, "test")[0]

    def ppl(m) -> float:
        return perplexity(m, tok, text, windows=a.windows, bos_per_window=info["bos_per_window"], progress=False).ppl

    out = {"commit": _start_commit(), "model": a.model, "config": a.config, "levels": a.levels, "span": a.span,
           "generations": a.generations, "windows": a.windows, "threads": torch.get_num_threads()}
    t = time.perf_counter()
    st = prepare(model, config, calib, "cpu", "search", pools="solved", levels=a.levels, span=a.span,
                 init="knapsack", start=None, mode=None, level_solve="pipeline", level_cache=a.level_cache,
                 compress=compress_)
    out["seconds_levels"] = time.perf_counter() - t  # knapsack start + the pipeline pass with the other levels
    out["solved_levels"] = sum(len(p.weights) for p in st.space.pools)
    t = time.perf_counter()
    x, extra = evolve(model, st, calib, "cpu", config.seed, generations=a.generations, offspring=16, survivors=4,
                      mutations=2, levels=a.levels, screen_windows=1, windows=4, tokens=128, batch_size=4)
    out["seconds_search"] = time.perf_counter() - t
    out["search"] = {k: extra[k] for k in ("start_loss", "final_loss", "heldout_start_loss", "heldout_final_loss",
                                          "kept") if k in extra}
    fit = Fitness(model, st.space, calib, "cpu", 4, 128, 4)
    centre = st.space.centre()
    out["plans"] = {}
    with st.swapping():
        for name, y in (("start (knapsack)", centre), ("search", x)):
            kl = fit(y)  # also puts the plan's levels into the model
            out["plans"][name] = {"fitness_kl": kl, "levels_model_ppl": ppl(model),
                                  "moved_from_start": int((y != centre).sum())}
            print(name, out["plans"][name], flush=True)
    OUT.write_text(json.dumps(out, indent=1))
    if a.deploy and out["plans"]["search"]["moved_from_start"]:
        plan, _ = st.finish("search", x, time.perf_counter(), {}, config.layer_spec())
        plan = Plan(plan.specs, plan.default)  # without the levels it carries: every matrix solved on its own H
        work = copy.deepcopy(model)
        t = time.perf_counter()
        compress_(work, config, calib, plan=plan, progress=False, materialize="dense")
        out["plans"]["search"] |= {"deployed_ppl": ppl(work), "seconds_deploy": time.perf_counter() - t}
        print("deployed", out["plans"]["search"], flush=True)
        OUT.write_text(json.dumps(out, indent=1))
    report(out)


def report(out: dict) -> None:
    """pipeline_search.md from pipeline_search.json."""
    s = out["search"]
    rows = ["## Search on levels solved in the pipeline (issue 22)", "",
            f"`python benchmarks/pipeline_search.py --config {out['config']} --levels {out['levels']} --generations "
            f"{out['generations']}{' --deploy' if any('deployed_ppl' in p for p in out['plans'].values()) else ''}`"
            f" at {out['commit']} ({out['threads']} threads). The knapsack start plan is compressed by the pipeline "
            f"(admm defaults, block by block); at each matrix its other levels (S's row count ± {out['span']} of "
            f"d_in per level) are solved on the same H ({out['solved_levels']} levels, {out['seconds_levels']:.0f} s "
            f"with the knapsack). The search (16 offspring, 4 survivors, KL on 4 x 128 calibration tokens) took "
            f"{out['seconds_search']:.0f} s: KL {s['start_loss']:.4f} -> {s['final_loss']:.4f}, held out "
            f"{s.get('heldout_start_loss', float('nan')):.4f} -> {s.get('heldout_final_loss', float('nan')):.4f}; "
            f"kept: {s['kept']}. Levels-model ppl: the model with every matrix's level put in "
            f"({out['windows']} wiki-sample windows); deployed: the plan compressed again by the pipeline.", "",
            "| plan | matrices moved | fitness KL | levels-model ppl | deployed ppl |", "|---|---:|---:|---:|---:|"]
    for n, p in out["plans"].items():
        d = (f"{p['deployed_ppl']:.3f} ({p['seconds_deploy']:.0f} s)" if "deployed_ppl" in p
             else "= levels model" if not p["moved_from_start"] else "-")
        rows.append(f"| {n} | {p['moved_from_start']} | {p['fitness_kl']:.4f} | {p['levels_model_ppl']:.3f} | {d} |")
    total = out["seconds_levels"] + out["seconds_search"] + out["plans"]["search"].get("seconds_deploy", 0)
    rows += ["", "The start plan's levels are its deployed solves (stored in float16), so its deployed model is its "
             f"levels model. Levels + search + deploy: {total:.0f} s ({total / 60:.0f} min)."]
    (HERE / "pipeline_search.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
