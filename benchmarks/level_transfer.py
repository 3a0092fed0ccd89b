"""Does a plan that the solved-level fitness prefers also deploy better? (issue 22)

The search on solved levels (``--alloc-opt pools=solved``) scores a plan by KL(dense || the model with every matrix
replaced by its level's short admm solve on the dense H). The deployed model is built differently: admm's full
schedule, block by block on H from the compressed model's own inputs. This script takes a saved search run, reads its
plan and its start (the knapsack plan, rebuilt by the same code), and scores both plans three ways on the same data:
the fitness KL (4 x 128 tokens), the wiki-sample ppl of the levels model (64 windows, as the benchmarks), and the
deployed ppl from benchmarks/results.jsonl. ``--full-start`` adds the start plan with every matrix solved on its own
on the dense H by the run's full schedule, which separates the short schedule's share of the gap from the dense H's.
Writes level_transfer.json and level_transfer.md.

    python benchmarks/level_transfer.py --run runs/g70-admm/smollm2-135m-admm-g70-search-generations20-poolssolved \
        --level-cache benchmarks/.cache/levels [--full-start]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from run import CONFIGS, _start_commit
from tqdm import tqdm

from slr.allocate.base import whitened_metrics
from slr.allocate.cap import prepare
from slr.allocate.levels import Fitness
from slr.allocate.solvedlevels import damped_h, level_solver, solve_levels
from slr.api import _calibration_windows, open_model
from slr.config import AllocConfig, CompressConfig
from slr.data.corpora import load_text
from slr.eval.ppl import perplexity

HERE = Path(__file__).parent


def levels_of(space, specs: dict) -> torch.Tensor:
    """The level of each matrix whose row count is nearest the plan's."""
    out = []
    for j, m in enumerate(space.mats):
        k = round((1 - specs[m.key]["sparsity"]) * m.d_in)
        out.append(min((abs(kl - k), i) for i, kl in enumerate(space.k_levels[j]) if kl is not None)[1])
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a saved search run with pools=solved (its results.json)")
    ap.add_argument("--level-cache", default="benchmarks/.cache/levels")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--full-start", action="store_true",
                    help="add the start plan solved by the run's full schedule on the dense H (about 210 solves)")
    ap.add_argument("--report", action="store_true", help="only rebuild level_transfer.md from level_transfer.json")
    a = ap.parse_args()
    if a.report:
        return report(json.loads((HERE / "level_transfer.json").read_text()))
    if not a.run:
        ap.error("--run DIR is needed (a saved search run with --alloc-opt pools=solved)")
    torch.manual_seed(0)
    res = json.loads((Path(a.run) / "results.json").read_text())
    cfg_d, alloc = res["config"], res["allocation"]
    # as benchmarks/run.py builds it (solver={}: the method's defaults), so the level files' digests match
    config = CompressConfig(method=cfg_d["method"], sparsity=cfg_d["sparsity"], pattern=cfg_d["pattern"],
                            rank=cfg_d["rank"], calib_samples=cfg_d["calib_samples"], solver={},
                            alloc=AllocConfig("search", budget=cfg_d["alloc"]["budget"]))
    model, tok, info = open_model(res["model_arg"])
    calib = _calibration_windows(tok, config, load_text(None, "calibration")[0], info["bos_per_window"])
    t = time.perf_counter()
    st = prepare(model, config, calib, "cpu", "search", pools="solved", levels=alloc["levels"], span=alloc["span"],
                 init="knapsack", start=None, mode=None, level_cache=a.level_cache)
    t_prep = time.perf_counter() - t
    text = load_text(None, "test")[0]

    def ppl() -> float:
        return perplexity(model, tok, text, windows=a.windows, bos_per_window=info["bos_per_window"],
                          progress=False).ppl

    if a.full_start:  # added to the json of an earlier run of the plans' measurement
        out = json.loads((HERE / "level_transfer.json").read_text())
        t = time.perf_counter()
        with st.swapping():
            full_start_(model, config, calib, st, Path(a.level_cache))
            out["full_start"] = {"levels_model_ppl": ppl(), "seconds": time.perf_counter() - t,
                                 "commit": _start_commit()}
        print("full start", out["full_start"], flush=True)
    else:
        fit = Fitness(model, st.space, calib, "cpu", alloc["windows"], alloc["tokens"], 4)
        plans = {"start (knapsack)": st.space.centre(), "search": levels_of(st.space, res["plan"])}
        out = {"run": a.run, "run_commit": res["git_commit"], "seconds_prepare": t_prep, "plans": {}}
        with st.swapping():
            for name, x in plans.items():
                kl = fit(x)  # also puts the plan's levels into the model
                out["plans"][name] = {"fitness_kl": kl, "levels_model_ppl": ppl(),
                                      "moved_from_start": int((x != plans["start (knapsack)"]).sum())}
                print(name, out["plans"][name], flush=True)
        out |= {"commit": _start_commit(), "windows": a.windows, "fitness": [alloc["windows"], alloc["tokens"]]}
    (HERE / "level_transfer.json").write_text(json.dumps(out, indent=1))
    report(out)


def full_start_(model, config, calib, st, cache: Path) -> None:
    """Put into the model the start plan with every matrix solved on its own on the dense H (as the levels are) but
    by the run's full admm schedule, the deployed one's: the levels model without the short schedule."""
    solver, base = level_solver(config, "full"), config.layer_spec()
    with tempfile.TemporaryDirectory() as scratch:
        solved = {}
        for j, white in tqdm(whitened_metrics(model, st.mats, calib, "cpu", 8), total=len(st.mats), desc="full"):
            ch = st.space.start[j]
            solved[j] = solve_levels(st.mats[j], damped_h(white), [ch.k_row], ch.rank, base, solver, cache,
                                     Path(scratch))
        for j, m in enumerate(st.mats):  # after the pass: it needs the dense weights
            ch = st.space.start[j]
            m.weight.data.copy_(solved[j].rebuild(m, ch.rank, ch.k_row * m.d_out))


def config_id(cfg: dict) -> str | None:
    """The benchmarks' config id (run.py's CONFIGS) of a results.json config: its sparsity, pattern, rank, budget."""
    budget = (cfg.get("alloc") or {}).get("budget")
    for cid, c in CONFIGS.items():
        if (c.get("sparsity"), c.get("pattern"), c.get("rank"), c.get("budget")) == \
                (cfg["sparsity"], cfg["pattern"], cfg["rank"], budget):
            return cid
    return None


def deployed(run: str) -> dict[str, tuple[float, str]]:
    """The deployed ppl and commit of the search run and of its start: the results.jsonl row of the knapsack at the
    same method and config with default options."""
    res = json.loads((Path(run) / "results.json").read_text())
    out = {"search": (res["ppl"]["ppl"], res["git_commit"])}
    cid = config_id(res["config"])
    for line in (HERE / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if (r.get("method"), r.get("config"), r.get("allocate")) == (res["method"], cid, "knapsack") and \
                not r.get("alloc_opts"):
            out["start (knapsack)"] = (r["ppl"], r["git_commit"])
    return out


def report(out: dict) -> None:
    """level_transfer.md from level_transfer.json."""
    dep = deployed(out["run"])
    fw, ft = out.get("fitness", (4, 128))  # the defaults, for a json written before these fields were
    rows = ["## Does the solved-level fitness transfer to the deployed model? (issue 22)", "",
            f"`python benchmarks/level_transfer.py --run {out['run']}` at {out['commit']} (the run: "
            f"{out['run_commit']}). Both plans scored on the same levels (admm's short schedule on the dense H, read "
            f"from the level cache, every matrix solved on its own): the fitness KL ({fw} x {ft} calibration tokens) "
            f"and the wiki-sample ppl of that levels model ({out.get('windows', 64)} windows). Deployed ppl: the "
            "compressed model itself (admm's full schedule, block by block on H from the compressed model's inputs; "
            "results.jsonl).", "",
            "| plan | matrices moved | fitness KL | levels-model ppl | deployed ppl (commit) |",
            "|---|---:|---:|---:|---:|"]
    for n, p in out["plans"].items():
        d = f"{dep[n][0]:.3f} ({dep[n][1]})" if n in dep else "-"
        rows.append(f"| {n} | {p['moved_from_start']} | {p['fitness_kl']:.4f} | {p['levels_model_ppl']:.3f} | {d} |")
    if "full_start" in out:
        f = out["full_start"]
        rows.append(f"| start (knapsack), full schedule ({f['commit']}, {f['seconds']:.0f} s) | 0 | - | "
                    f"{f['levels_model_ppl']:.3f} | {dep['start (knapsack)'][0]:.3f} |")
    (HERE / "level_transfer.md").write_text("\n".join(rows) + "\n")

if __name__ == "__main__":
    main()
