"""The accuracy-per-byte frontier (issue 20): ppl against bits per weight of every benchmark run with a bpw.

Called by `python benchmarks/run.py --report`; writes benchmarks/frontier.png and returns the BENCHMARKS.md section.
bpw = bytes of the compressed linears x 8 / their weights (values or codes, scales, index, factors; results.json's
"bytes"). The source GGUF stores the same linears as Q4_1 (4-bit codes + an fp16 scale and minimum per 32 weights:
5.0 bpw) at the dense ppl; it is drawn as the reference point. Each budget is judged against GPTQ at the same
bytes: its best record at that config with the production scheme's options only (``PRODUCTION_OPTS``).
"""

from __future__ import annotations

from pathlib import Path

GGUF_BPW = 5.0  # Q4_1: (32 * 4 + 16 + 16) / 32
# (budget bpw, the GPTQ config at those bytes, target: gap ratio to that GPTQ's gap, or a ppl ceiling)
BUDGETS = ((4.25, "q4g64", ("gap", 0.7)), (3.25, "q3g64", ("gap", 0.5)), (2.5, "q2g64", ("ppl", 100.0)))
GEMMA_BUDGETS = BUDGETS[1:2]  # the frontier checked on Gemma-3-270M at 3.25 bpw
# the GPTQ that users run (llm-compressor's GPTQModifier: min-max grids, static act-order); slr's own options (clip)
# make a row a contender, not the baseline
PRODUCTION_OPTS = {"actorder", "static_groups", "blocksize", "percdamp"}


def kind(r: dict, configs: dict) -> str:
    """What a run stores: plain Q, Q + L, sparse + Q (+ L), or float S (+ L)."""
    c = configs.get(r["config"], {})
    sparse = bool(c.get("pattern")) or c.get("sparsity") not in (None, 0.0) or c.get("budget") is not None
    low_rank = c.get("rank", 0) > 0
    if c.get("bits") is None:
        return "float S + L" if low_rank else "float S"
    return ("sparse + Q" if sparse else "Q") + (" + L" if low_rank else "")


def frontier_section(recs: list[dict], configs: dict, label, png: Path, alloc=lambda r: r["allocate"]) -> list[str]:
    """BENCHMARKS.md's frontier: ``label(r)`` names a run's method, ``alloc(r)`` its allocator and options."""
    rows = [r for r in recs if r.get("bpw") is not None and r["model"].startswith("SmolLM2")]
    if not rows:
        return []
    dense = rows[0]["dense_ppl"]
    rows.sort(key=lambda r: (r["bpw"], r["ppl"]))
    best = float("inf")
    out = ["## Accuracy per byte: ppl against bits per weight (issue 20)", "",
           "SmolLM2, every run that records bytes (64 windows). bpw counts the compressed linears only (codes or",
           "values, scales, index, factors); the artifact's on-disk total adds the embeddings. The source GGUF",
           f"stores the same linears at {GGUF_BPW} bpw (Q4_1) with the dense ppl {dense:.3f}. frontier = no run with",
           "fewer or equal bits has a lower ppl.", "", f"![ppl vs bpw]({png.name})", "",
           "| bpw | ppl | method | config | stores | allocate | frontier | commit |",
           "|---|---|---|---|---|---|---|---|",
           f"| {GGUF_BPW:.3f} | {dense:.3f} | source GGUF (Q4_1) | - | Q | - | reference | - |"]
    for r in rows:
        on = r["ppl"] < best
        best = min(best, r["ppl"])
        out.append(f"| {r['bpw']:.3f} | {r['ppl']:.3f} | {label(r)} | {r['config']} | {kind(r, configs)} | "
                   f"{alloc(r)} | {'yes' if on else ''} | {r['git_commit']} |")
    out += ["", "### At the bytes of GPTQ", "",
            "Best run at or under each budget against GPTQ at that budget's config (gap = ppl - dense ppl).", ""]
    out += verdicts(rows, dense, configs, label, BUDGETS)
    out += _other_model(recs, configs, label, "Gemma-3", "Gemma-3-270M", GEMMA_BUDGETS)
    _plot(rows, dense, configs, png)
    return out


def verdicts(rows: list[dict], dense: float, configs: dict, label, budgets) -> list[str]:
    """The table of each budget's best run against the production GPTQ at that budget's config."""
    out = ["| budget bpw | GPTQ (config, ppl) | best run (bpw, ppl) | what wins | gap ratio | target | met |",
           "|---|---|---|---|---|---|---|"]
    for budget, cfg, (what, target) in budgets:
        base = [r for r in rows if r["method"] == "gptq" and r["config"] == cfg and not set(r.get("solver_opts") or {})
                - PRODUCTION_OPTS]
        under = [r for r in rows if r["bpw"] <= budget + 1e-9]
        if not under:
            continue
        win = min(under, key=lambda r: r["ppl"])
        g = min(base, key=lambda r: r["ppl"]) if base else None
        ratio = (win["ppl"] - dense) / (g["ppl"] - dense) if g and g["ppl"] > dense else None
        if what == "gap":
            goal, met = f"gap ratio <= {target}", ratio is not None and ratio <= target
        else:
            goal, met = f"ppl <= {target:g}", win["ppl"] <= target
        gptq = f"{cfg}, {g['ppl']:.3f}" if g else "n/a"
        out.append(f"| {budget} | {gptq} | {label(win)} {win['config']} "
                   f"({win['bpw']:.3f}, {win['ppl']:.3f}) | {kind(win, configs)} | "
                   f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {goal} | {'yes' if met else '**no**'} |")
    out.append("")
    return out


def _other_model(recs: list[dict], configs: dict, label, prefix: str, name: str, budgets) -> list[str]:
    """A second model's runs with bytes and its verdicts (the frontier claims are checked on it too)."""
    rows = sorted((r for r in recs if r.get("bpw") is not None and r["model"].startswith(prefix)),
                  key=lambda r: (r["bpw"], r["ppl"]))
    if not rows:
        return []
    dense = rows[0]["dense_ppl"]
    out = [f"### {name}", "", f"Every {name} run that records bytes (64 windows; dense ppl {dense:.3f}, BOS per "
           "window).", "", "| bpw | ppl | method | config | stores | allocate | commit |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['bpw']:.3f} | {r['ppl']:.3f} | {label(r)} | {r['config']} | {kind(r, configs)} | {r['allocate']} | "
            f"{r['git_commit']} |" for r in rows]
    return out + [""] + verdicts(rows, dense, configs, label, budgets)


def _plot(rows: list[dict], dense: float, configs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in sorted({kind(r, configs) for r in rows}):
        pts = [r for r in rows if kind(r, configs) == k]
        ax.scatter([r["bpw"] for r in pts], [r["ppl"] for r in pts], label=k, s=22)
    ax.scatter([GGUF_BPW], [dense], marker="*", s=160, color="black", label="source GGUF (Q4_1)")
    ax.axhline(dense, color="gray", lw=0.8, ls="--")
    for budget, _, _ in BUDGETS:
        ax.axvline(budget, color="lightgray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (compressed linears)")
    ax.set_ylabel("perplexity (wiki-sample test, 64 windows)")
    ax.set_title("SmolLM2-135M: accuracy per byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
