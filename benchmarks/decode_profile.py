"""CPU decode-step profile: where one batch-1 greedy decode step's time goes, dense model vs slr artifacts.

Usage:
  python benchmarks/decode_profile.py                                  # dense smollm2-135m only
  python benchmarks/decode_profile.py --artifact runs/nm24r32 --label nm24r32 --artifact runs/q4g64 --label q4g64
  python benchmarks/decode_profile.py --artifact DIR --steps 8 --repeats 1 --threads 1 \\
      --out-json /tmp/dp.json --out-md /tmp/dp.md                     # a quick trial
  python benchmarks/decode_profile.py --report                         # rewrite --out-md from --out-json only

Per model, in a fresh subprocess (``--_child``): prefill a ``--prompt``-token prompt into a DynamicCache, then
time ``--steps`` single-token forwards (``model(next_id, past_key_values=cache, use_cache=True)``, greedy argmax
of the last logits) under torch.inference_mode(); step ms = wall time / steps, best of ``--repeats`` (each repeat
starts from a fresh prefill; one untimed warm-up pass first). Two passes per repeat:
  * without hooks: the step time and decode tokens/s;
  * with forward pre/post hooks that read time.perf_counter() (wall time: slr's C++ kernels are called through
    ctypes and do not show in torch.profiler) on the decoder blocks, their attention modules, the block linears
    (nn.Linear, slr.nn.SLRLinear incl. the quantized ones, slr.packed.PackedLinear; outermost only), the output head
    (get_output_embeddings()) and the input embedding (get_input_embeddings()). Buckets per step:
      linears         = the block linears (q/k/v/o and the MLP projections);
      head            = the output projection;
      attention core  = attention modules minus the linears inside them (rotary, cache update, SDPA, reshapes);
      rest of blocks  = decoder blocks minus attention modules minus the other linears (norms, MLP activation,
                        residual adds);
      embedding       = the input embedding;
      python/other    = step minus all of the above (model-level glue, rotary tables, masks, final norm, argmax).
The hook pass's buckets sum to its own step time ("buckets_ms"); "buckets_ms_scaled" rescales them to sum to the
step time without hooks (the markdown's ms columns; the percentages are the same either way).
Also recorded: slr.kernels.CALLS (cleared before the first timed pass; counts of one no-hook pass) where it exists,
whether both passes generated the same tokens, and the machine (CPU, torch, threads, git commit, date).
Input tokens: the start of the Wikipedia test split (as benchmarks/inference.py), or ``--ids-file``.
Writes ``--out-json`` (default benchmarks/decode_profile.json) and ``--out-md`` (default
benchmarks/decode_profile.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

# benchmarks/inference.py (the script folder is on sys.path)
from inference import (
    RUNTIME,
    RUNTIMES,
    _ArtifactAction,
    _f,
    _LabelAction,
    _load,
    _spawn,
    _strategy_name,
    machine_info,
    targets_of,
)

HERE = Path(__file__).resolve().parent
BUCKETS = ("linears", "head", "attention_core", "rest_of_blocks", "embedding", "python_other")
BUCKET_TITLES = {"linears": "linears", "head": "head", "attention_core": "attention core",
                 "rest_of_blocks": "rest of blocks", "embedding": "embedding", "python_other": "python/other"}


# ---------------------------------------------------------------------------------------------------
# child: one model
# ---------------------------------------------------------------------------------------------------
def find_blocks(model) -> tuple[list, str | None]:
    """-> (decoder blocks, dotted name of the attention module inside a block or None)."""
    from torch import nn

    blocks, attn = None, None
    try:
        from slr.models.adapters import get_adapter

        ad = get_adapter(model)
        blocks = list(ad.blocks(model))
        prefixes = {n.rpartition(".")[0] for n in ad.groups[0]}  # e.g. {"self_attn"}
        if len(prefixes) == 1 and "" not in prefixes:
            attn = prefixes.pop()
    except Exception:  # unsupported architecture: fall back to the usual names
        pass
    if blocks is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            blocks = list(layers)
        else:  # the longest ModuleList
            lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
            if not lists:
                raise RuntimeError("no decoder blocks found")
            blocks = list(max(lists, key=len))
    if attn is None or not _has(blocks[0], attn):
        names = [n for n, _ in blocks[0].named_children()]
        attn = "self_attn" if "self_attn" in names else next((n for n in names if "attn" in n.lower()), None)
    return blocks, attn


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def block_linears(block) -> list[tuple[str, object]]:
    """The outermost nn.Linear / SLRLinear / PackedLinear modules of a block, as (dotted name, module)."""
    from torch import nn

    from slr.nn import SLRLinear
    from slr.packed import PackedLinear

    cand = [(n, m) for n, m in block.named_modules() if n and isinstance(m, (nn.Linear, SLRLinear, PackedLinear))]
    names = {n for n, _ in cand}
    return [(n, m) for n, m in cand
            if not any(n.startswith(p + ".") for p in names if p != n)]


class HookTimer:
    """Forward pre/post hooks accumulating wall time (perf_counter) per bucket."""

    def __init__(self):
        self.acc: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.handles = []

    def add(self, module, bucket) -> None:
        """``bucket``: a name, or a function of the forward's positional args returning one."""
        starts = []

        def pre(_m, args):
            starts.append((bucket(args) if callable(bucket) else bucket, time.perf_counter()))

        def post(_m, _args, _out):
            t = time.perf_counter()
            b, t0 = starts.pop()
            self.acc[b] += t - t0
            self.calls[b] += 1

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> None:
        self.acc.clear()
        self.calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def install_hooks(model) -> tuple[HookTimer, dict]:
    """Hook blocks, attention modules, block linears, head and embedding -> (timer, counts of hooked modules)."""
    import torch

    blocks, attn_name = find_blocks(model)
    timer = HookTimer()
    n_lin = n_attn = 0
    for block in blocks:
        timer.add(block, "layers")
        if attn_name is not None:
            timer.add(block.get_submodule(attn_name), "attn")
            n_attn += 1
        for name, lin in block_linears(block):
            inside = attn_name is not None and name.startswith(attn_name + ".")
            timer.add(lin, "linears_attn" if inside else "linears_other")
            n_lin += 1
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    if emb is not None and emb is head:  # one module for both: tell the calls apart by their input
        def which(args):
            x = args[0] if args else None
            return "head" if isinstance(x, torch.Tensor) and x.is_floating_point() else "embedding"

        timer.add(emb, which)
    else:
        if emb is not None:
            timer.add(emb, "embedding")
        if head is not None:
            timer.add(head, "head")
    return timer, {"blocks": len(blocks), "attention": n_attn, "linears": n_lin, "attention_name": attn_name,
                   "head": type(head).__name__ if head is not None else None,
                   "embedding": type(emb).__name__ if emb is not None else None}


def buckets_from(acc: dict, step_s: float, steps: int) -> dict:
    """Accumulated hook seconds over ``steps`` steps -> ms per step per bucket (summing to the step)."""
    ms = {k: 1e3 * v / steps for k, v in acc.items()}
    step = 1e3 * step_s / steps
    lin = ms.get("linears_attn", 0.0) + ms.get("linears_other", 0.0)
    has_attn = "attn" in ms
    out = {
        "linears": lin,
        "head": ms.get("head", 0.0),
        "attention_core": ms["attn"] - ms.get("linears_attn", 0.0) if has_attn else None,
        "rest_of_blocks": (ms.get("layers", 0.0) - ms["attn"] - ms.get("linears_other", 0.0) if has_attn
                           else ms.get("layers", 0.0) - lin),
        "embedding": ms.get("embedding", 0.0),
    }
    out["python_other"] = step - ms.get("layers", 0.0) - out["head"] - out["embedding"]
    return out


def measure(target: dict, strategy: str, ids, *, prompt: int = 32, steps: int = 64, repeats: int = 3,
            threads: int | None = None) -> dict:
    """Load one model and profile ``steps`` greedy decode steps after a ``prompt``-token prefill."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        from slr import kernels

        calls = getattr(kernels, "CALLS", None)
    except ImportError:
        calls = None
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < prompt:
        raise ValueError(f"need {prompt} token ids, got {ids.numel()}")
    rec: dict = {"label": target.get("label") or Path(str(target["path"])).name, "kind": target["kind"],
                 "model": str(target["path"]), "strategy": _strategy_name(target, strategy),
                 "threads": torch.get_num_threads(), "prompt_tokens": prompt, "steps": steps, "repeats": repeats,
                 "dtype": "float32"}
    t = time.perf_counter()
    model, _tok, info = _load(target, strategy)
    rec["load_s"] = time.perf_counter() - t
    rec.update({k: v for k, v in info.items() if k != "path"})
    x = ids[:prompt].unsqueeze(0)  # [1, prompt]

    if strategy in RUNTIMES:  # slr.runtime's decoder (slr-runtime-q8: kernel setting q8): its own preallocated cache
        def step(ids, cache):
            return model(ids, cache)

        def new_cache(n):
            return model.new_cache(1, prompt + n)
    else:
        from transformers import DynamicCache

        def step(ids, cache):
            return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

        def new_cache(n):
            return DynamicCache(config=model.config)

    def decode(n: int, timer: HookTimer | None = None, count_calls: bool = False) -> tuple[float, list[int]]:
        cache = new_cache(n)
        nxt = step(x, cache)[:, -1:].argmax(-1)  # [1, 1]
        gen = []
        if timer is not None:
            timer.reset()
        if count_calls and calls is not None:
            calls.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = step(nxt, cache)[:, -1:].argmax(-1)
            gen.append(nxt)
        dt = time.perf_counter() - t0
        return dt, [int(g) for g in gen]

    timer, hooked = install_hooks(model)
    timer.remove()
    rec["hooked"] = hooked
    plain, hooked_s, best_acc, toks = [], [], None, {}
    with torch.inference_mode():
        decode(min(4, steps))  # warm-up (also builds lazy caches / packs)
        for r in range(repeats):
            dt, toks["plain"] = decode(steps, count_calls=r == 0)
            plain.append(dt)
            if r == 0 and calls is not None:
                rec["kernel_calls"] = dict(calls)
                rec["kernel_calls_per_step"] = {k: v / steps for k, v in calls.items()}
            timer, _ = install_hooks(model)
            try:
                dt, toks["hooks"] = decode(steps, timer)
            finally:
                timer.remove()
            if not hooked_s or dt < min(hooked_s):
                best_acc, hook_calls = dict(timer.acc), sum(timer.calls.values())
            hooked_s.append(dt)
    step, step_h = 1e3 * min(plain) / steps, 1e3 * min(hooked_s) / steps
    b = buckets_from(best_acc, min(hooked_s), steps)
    scale = step / step_h
    rec.update({
        "step_ms": step, "step_ms_all": [1e3 * s / steps for s in plain], "tok_s": 1e3 / step,
        "step_ms_hooks": step_h, "step_ms_hooks_all": [1e3 * s / steps for s in hooked_s],
        "hook_calls_per_step": hook_calls / steps,
        "hook_overhead_us_per_call": 1e3 * (step_h - step) / (hook_calls / steps) if hook_calls else None,
        "buckets_ms": b,
        "buckets_pct": {k: (None if v is None else 100 * v / step_h) for k, v in b.items()},
        "buckets_ms_scaled": {k: (None if v is None else v * scale) for k, v in b.items()},
        "raw_hook_ms": {k: 1e3 * v / steps for k, v in best_acc.items()},
        "tokens_match": toks["plain"] == toks["hooks"],
        "generated_ids": toks["plain"],
    })
    if calls is None:
        rec["kernel_calls"] = None
    return rec


def _child_main(spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    ids = json.loads(Path(spec["ids_file"]).read_text())
    rec = measure(spec["target"], spec["strategy"], ids, prompt=spec["prompt"], steps=spec["steps"],
                  repeats=spec["repeats"], threads=spec["threads"])
    rec["machine"] = machine_info(spec["threads"])
    Path(out_file).write_text(json.dumps(rec, indent=1))


# ---------------------------------------------------------------------------------------------------
# parent: children, reports
# ---------------------------------------------------------------------------------------------------
def add_ratios(records: list[dict]) -> None:
    """tok/s (without hooks) relative to the first dense record without error."""
    dense = next((r for r in records if r["strategy"] == "dense" and "error" not in r), None)
    for r in records:
        r["vs_dense"] = r["tok_s"] / dense["tok_s"] if dense is not None and "error" not in r else None


def _cell(r: dict, k: str) -> str:
    ms, pct = r["buckets_ms_scaled"].get(k), r["buckets_pct"].get(k)
    return "--" if ms is None else f"{ms:.2f} ({pct:.0f}%)"


def markdown(records: list[dict]) -> str:
    """The report, from the records alone (so that ``--report`` can rewrite it from the JSON)."""
    ok = [r for r in records if "error" not in r]
    r0 = ok[0] if ok else (records[0] if records else {})
    m = r0.get("machine") or {}
    load = (m.get("loadavg_start") or [None])[0]
    lines = [
        "## Decode-step profile (CPU)",
        "",
        f"Generated by `python benchmarks/decode_profile.py` ({m.get('date', '?')}, commit "
        f"{m.get('git_commit', '?')}). {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, torch "
        f"{m.get('torch', '?')}, {r0.get('threads', '?')} thread(s), fp32, batch 1; 1-min load average at start "
        f"{_f(load)}. One greedy decode step = one single-token forward with a DynamicCache after a "
        f"{r0.get('prompt_tokens', '?')}-token prefill, plus the argmax; ms/step = wall time of "
        f"{r0.get('steps', '?')} steps / steps, best of {r0.get('repeats', '?')}, every row in a fresh process. "
        "Buckets: wall time (perf_counter) between forward pre/post hooks, in a second pass with the hooks on; "
        "their ms are rescaled to sum to the step without hooks (the percentages are of the hooked step). "
        "attention core = attention modules minus their q/k/v/o linears; rest of blocks = decoder blocks minus "
        "attention and MLP linears (norms, activation, residuals); python/other = step minus everything hooked.",
        "",
        "| model | strategy | step ms (no hooks) | step ms (hooks) | "
        + " | ".join(f"{BUCKET_TITLES[k]} ms (%)" for k in BUCKETS) + " | decode tok/s | vs dense |",
        "|---|---|" + "---:|" * (len(BUCKETS) + 4),
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['strategy']} | error: {r['error'][:100]} |"
                         + " |" * (len(BUCKETS) + 4))
            continue
        lines.append(f"| {r['label']} | {r['strategy']} | {r['step_ms']:.2f} | {r['step_ms_hooks']:.2f} | "
                     + " | ".join(_cell(r, k) for k in BUCKETS)
                     + f" | {r['tok_s']:.2f} | {_f(r.get('vs_dense'), '.3f')} |")
    notes = [f"{r['label']}: " + (", ".join(f"{k} {v:g}" for k, v in sorted(r["kernel_calls_per_step"].items()))
                                  or "none") for r in ok if r.get("kernel_calls_per_step") is not None]
    if notes:
        lines += ["", "slr.kernels calls per step (no-hook pass): " + "; ".join(notes) + "."]
    over = [f"{r['label']} {r['hook_overhead_us_per_call']:.1f}" for r in ok
            if r.get("hook_overhead_us_per_call") is not None]
    if over:
        calls = ok[0]["hook_calls_per_step"]
        lines += ["", f"Hook overhead (hooked minus plain step / hooked module calls per step, {calls:.0f} calls "
                  f"per step for {ok[0]['label']}), microseconds per call: " + ", ".join(over) + "."]
    bad = [r["label"] for r in ok if not r.get("tokens_match", True)]
    if bad:
        lines += ["", f"The hooked and plain passes generated different tokens for: {', '.join(bad)}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m", help="dense model (default name or HF folder); 'none' skips")
    ap.add_argument("--dense-label", default=None)
    ap.add_argument("--artifact", action=_ArtifactAction, dest="artifact_", metavar="DIR", help="repeatable")
    ap.add_argument("--label", action=_LabelAction, dest="label_", metavar="LABEL", help="names the last --artifact")
    ap.add_argument("--strategy", default="auto",
                    help="slr execution strategies for the artifacts, comma-separated (auto = packed kernels; sparse "
                         "= the unpacked layers with the pre-packing decode path; slr-runtime = slr.runtime's decoder, "
                         "packed, which the dense model then runs too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled before the timed steps")
    ap.add_argument("--steps", type=int, default=64, help="decode steps to time")
    ap.add_argument("--repeats", type=int, default=3, help="best of")
    ap.add_argument("--ids-file", default=None, help="JSON list of token ids to use instead of the Wikipedia text")
    ap.add_argument("--child-timeout", type=int, default=3600)
    ap.add_argument("--out-json", default=str(HERE / "decode_profile.json"))
    ap.add_argument("--out-md", default=str(HERE / "decode_profile.md"))
    ap.add_argument("--report", action="store_true", help="only rewrite --out-md from --out-json")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    ap.set_defaults(artifacts=[])
    args = ap.parse_args(argv)
    for k in ("threads", "prompt", "steps", "repeats"):
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._child:
        _child_main(args._child, args._out)
        return []
    if args.report:
        records = json.loads(Path(args.out_json).read_text())
        Path(args.out_md).write_text(markdown(records))
        print(f"wrote {args.out_md}")
        return records
    targets = targets_of(args)
    records = []
    with tempfile.TemporaryDirectory(prefix="slr-decode-profile-") as tmpd:
        tmp = Path(tmpd)
        if args.ids_file:
            ids = json.loads(Path(args.ids_file).read_text())
            if len(ids) < args.prompt:
                raise SystemExit(f"--ids-file has {len(ids)} ids, {args.prompt} needed")
            Path(tmp / "ids.json").write_text(json.dumps(ids[:args.prompt]))
            ids_files = [str(tmp / "ids.json")] * len(targets)
        else:  # benchmarks/inference.py's --_prep child: one ids file per distinct tokenizer
            prep, err = _spawn("--_prep", {"targets": targets, "n_ids": args.prompt, "tmp": str(tmp),
                                           "threads": args.threads}, tmp, args.threads, args.child_timeout,
                               script=HERE / "inference.py")
            if prep is None:
                raise SystemExit(f"preparing the inputs failed: {err}")
            ids_files = prep["ids_files"]
        runs = [(t, ids_t, s) for t, ids_t in zip(targets, ids_files, strict=True)
                for s in (args.strategy.split(",") if t["kind"] == "artifact" else
                          [None] + ([RUNTIME] if RUNTIME in args.strategy.split(",") else []))]
        for t, ids_t, strategy in runs:
            spec = {"target": t, "strategy": strategy, "ids_file": ids_t, "prompt": args.prompt,
                    "steps": args.steps, "repeats": args.repeats, "threads": args.threads}
            t0 = time.perf_counter()
            rec, err = _spawn("--_child", spec, tmp, args.threads, args.child_timeout, script=__file__)
            if rec is None:
                rec = {"label": t["label"], "kind": t["kind"], "model": t["path"],
                       "strategy": strategy or "dense", "error": err}
            rec["child_wall_s"] = round(time.perf_counter() - t0, 1)
            records.append(rec)
            msg = rec.get("error") or (f"{rec['step_ms']:.2f} ms/step ({rec['tok_s']:.2f} tok/s), hooked "
                                       f"{rec['step_ms_hooks']:.2f}: " + ", ".join(
                                           f"{k} {_f(rec['buckets_pct'][k], '.0f')}%" for k in BUCKETS))
            print(f"{rec['label']:>20}: {msg}  ({rec['child_wall_s']} s)", flush=True)
    add_ratios(records)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(records, indent=1) + "\n")
    Path(args.out_md).write_text(markdown(records))
    print(f"wrote {args.out_json} and {args.out_md}")
    return records


if __name__ == "__main__":
    main()
