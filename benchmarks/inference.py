"""CPU inference benchmark: bytes on disk, peak memory and speed of the dense model vs slr artifacts.

Usage:
  python benchmarks/inference.py                                     # dense smollm2-135m only
  python benchmarks/inference.py --artifact runs/nm24r32 --label nm24r32 --artifact runs/u60r32 --label u60r32
  python benchmarks/inference.py --artifact DIR --strategies auto,sparse --prefill 64 --decode 8 --repeats 1 \\
      --out-json /tmp/inf.json --out-md /tmp/inf.md                  # a quick trial

Per (model, strategy), in a fresh subprocess (``--_child``) so that memory figures do not mix. Strategies: an
artifact's SLRLinear strategies in transformers' model, and ``slr-runtime`` (slr.runtime's decoder, packed as "auto",
with no transformers import; the dense model runs it too, after its transformers row, which stays the baseline of
every ratio), and ``slr-runtime-q8`` (the same under the kernel setting "q8": int8 activations at decode):
  * bytes: the artifact manifest's "bytes" report (compressed layers actual / theory / dense, dense remainder,
    total on disk); for the dense model the fp32 and fp16 sizes of the same (block linear) layers;
  * memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the imports, right after load, and after the
    timing runs (dense-cached builds its dense weights lazily, so its peak shows only in the last one; the
    dense model's safetensors are memory-mapped, so its weights count only once touched: compare "end" peaks).
    The parent never imports torch: Linux keeps ru_maxrss across exec(), so a big parent would leak its peak
    into the children's figures (VmHWM from /proc/self/status is recorded as a cross-check);
    the peak RSS while decoding: VmHWM reset (5 > /proc/self/clear_refs) before the timed generate calls, read after;
  * prefill tokens/s: one forward of ``--prefill`` tokens (batch 1, KV cache on, logits of the last position
    only -- what ``generate`` does for a prompt), after one warm-up forward; best of ``--repeats``;
  * decode tokens/s: ``model.generate(max_new_tokens=D, min_new_tokens=D, do_sample=False)`` from a
    ``--decode-prompt``-token prompt (batch 1, KV cache), D / wall time of the whole call; best of ``--repeats``
    after a short warm-up generate.
Input tokens: the start of the Wikipedia test split (slr.data.corpora.wiki_text("test") tokenized with
slr.data.calib.tokenize_text by each model's tokenizer), or ``--ids-file`` (JSON list of token ids).
Compute is fp32 on CPU; ``--threads`` sets torch.set_num_threads (and OMP/MKL_NUM_THREADS) in every child.
Writes ``--out-json`` (default benchmarks/inference.json) and ``--out-md`` (default benchmarks/inference.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATEGIES = ("auto", "dense-onthefly", "sparse", "dense-cached", "slr-runtime", "slr-runtime-q8")
RUNTIME = "slr-runtime"  # slr.runtime's decoder (no transformers import), packed as "auto"; dense models too
RUNTIME_Q8 = "slr-runtime-q8"  # the same under the kernel setting "q8" (int8 activations at decode; artifacts only)
RUNTIMES = (RUNTIME, RUNTIME_Q8)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------------
# child: one (model, strategy) measurement
# ---------------------------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak() -> bool:
    """Reset this process's VmHWM (Linux: 5 > /proc/self/clear_refs), so that it reads the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(key: str) -> float | None:
    """A /proc/self/status figure (VmRSS = now, VmHWM = peak of this exec'd image) in MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _load_tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _load(target: dict, strategy: str | None):
    """-> (model, tokenizer or None, info). Both kinds load their tokenizer iff the folder has one."""
    import torch

    if strategy in RUNTIMES:
        from slr import kernels, runtime
        from slr.models.load import resolve

        folder = Path(target["path"]) if target["kind"] == "artifact" else resolve(target["path"])[0]
        model, tok = runtime.load(folder)
        kernels.set_kernel("q8" if strategy == RUNTIME_Q8 else "auto")
        return model, tok, {"path": str(folder)}
    if target["kind"] == "artifact":
        from slr import io

        model, tok = io.load(target["path"], strategy=strategy or "auto", dtype=torch.float32)
        return model, tok, {"path": str(target["path"])}
    from transformers import AutoModelForCausalLM

    from slr.models import resolve

    folder, mi = resolve(target["path"])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, _load_tokenizer(Path(folder)), {"path": str(folder), "source_label": mi.label}


def _model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers in memory (shared storages counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _strategy_name(target: dict, strategy: str | None) -> str:
    return strategy if target["kind"] == "artifact" or strategy in RUNTIMES else "dense"


def runtime_layer_bytes(model) -> dict:
    """dense_layer_bytes of a dense model in slr.runtime (its blocks' nn.Linear layers)."""
    import torch

    n = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return {"layers_params": n, "layers_fp32": 4 * n, "layers_fp16": 2 * n}


def dense_layer_bytes(model) -> dict:
    """fp32 / fp16 bytes of the block linears (the layers slr compresses) of a dense model."""
    from slr.models.adapters import get_adapter

    ad = get_adapter(model)
    n = sum(lin.weight.numel() for b in ad.blocks(model) for lin in ad.linears(b).values())
    return {"layers_params": n, "layers_fp32": 4 * n, "layers_fp16": 2 * n}


def artifact_byte_report(path: str | os.PathLike) -> dict:
    """The manifest's "bytes" report plus the fp16 dense size of the compressed layers and the ratios."""
    man = json.loads((Path(path) / "slr_config.json").read_text())
    b = dict(man["bytes"])
    n = sum(int(r["shape"][0]) * int(r["shape"][1]) for r in man["layers"].values())
    b["compressed_layers_params"] = n
    b["compressed_layers_dense_fp16"] = 2 * n
    b["compressed_layers_dense_fp32"] = 4 * n
    b["ratio_vs_theory"] = b["compressed_layers"] / b["compressed_layers_theory"] if b.get(
        "compressed_layers_theory") else None
    b["ratio_vs_dense_fp16"] = b["compressed_layers"] / (2 * n) if n else None
    b["dtypes"] = man.get("dtypes", {})
    b["n_layers"] = len(man["layers"])
    return b


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(target: dict, strategy: str | None, ids, *, prefill: int = 512, decode: int = 128,
            decode_prompt: int = 32, repeats: int = 3, threads: int | None = None) -> dict:
    """Load one model (an artifact with ``strategy``, or a dense model) and measure memory and speed.

    ``target``: {"kind": "dense"|"artifact", "path": name/folder, "label": str}; ``ids``: 1-D token ids
    (at least max(prefill, decode_prompt) of them). Peak RSS figures are of this process, so call it in a
    fresh one (``--_child``) for numbers that mean anything.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < max(prefill, decode_prompt):
        raise ValueError(f"need {max(prefill, decode_prompt)} token ids, got {ids.numel()}")
    rec: dict = {"label": target.get("label") or Path(str(target["path"])).name, "kind": target["kind"],
                 "model": str(target["path"]), "strategy": _strategy_name(target, strategy),
                 "threads": torch.get_num_threads(), "prefill_tokens": prefill, "decode_tokens": decode,
                 "decode_prompt_tokens": decode_prompt, "repeats": repeats, "dtype": "float32"}
    rec["peak_rss_baseline_mib"] = _peak_rss_mib()  # after importing torch
    t = time.perf_counter()
    model, _tok, info = _load(target, strategy)
    rec["load_s"] = time.perf_counter() - t
    rec["peak_rss_load_mib"] = _peak_rss_mib()
    rec["rss_load_mib"] = _status_mib("VmRSS")
    rec["vmhwm_load_mib"] = _status_mib("VmHWM")
    rec["model_mem_mib"] = _model_bytes(model) / MIB
    rec.update({k: v for k, v in info.items() if k != "path"})
    if target["kind"] == "artifact":
        from slr.nn import SLRLinear
        from slr.packed import PackedLinear

        rec["bytes"] = artifact_byte_report(target["path"])
        rec["slr_layers"] = sum(isinstance(m, (SLRLinear, PackedLinear)) for m in model.modules())
        rec["packed_layers"] = sum(isinstance(m, PackedLinear) for m in model.modules())
    elif strategy in RUNTIMES:
        rec["bytes"] = runtime_layer_bytes(model)
    else:
        rec["bytes"] = dense_layer_bytes(model)

    x = ids[:prefill].unsqueeze(0)  # [1, prefill]
    prompt = ids[:decode_prompt].unsqueeze(0)  # [1, decode_prompt]
    gcfg = getattr(model, "generation_config", None)
    eos = getattr(gcfg, "eos_token_id", None) if gcfg is not None else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    pad = getattr(gcfg, "pad_token_id", None) if gcfg is not None else None
    gen_kw = dict(do_sample=False, pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
                  attention_mask=torch.ones_like(prompt), temperature=None, top_p=None, top_k=None)
    n_new = []

    def run_prefill():
        if strategy in RUNTIMES:
            model(x, model.new_cache(1, prefill))  # last-position logits
        else:
            model(input_ids=x, use_cache=True, logits_to_keep=1)

    def run_decode(n=decode):
        if strategy in RUNTIMES:
            out = model.generate(prompt, n)  # greedy, no end-of-sequence stop: n new tokens
        else:
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **gen_kw)
        n_new.append(out.shape[1] - prompt.shape[1])

    with torch.inference_mode():
        run_prefill()  # warm-up (also builds dense-cached weights)
        pre = _timed(run_prefill, repeats)
        run_decode(min(4, decode))  # warm-up
        n_new.clear()
        peak_before = _peak_rss_mib()  # the reset below also resets ru_maxrss
        decode_peak_reset = _reset_peak()
        dec = _timed(run_decode, repeats)
    rec["rss_decode_peak_mib"] = _status_mib("VmHWM") if decode_peak_reset else None
    if any(n != decode for n in n_new):
        raise RuntimeError(f"generate produced {n_new} new tokens, expected {decode}")
    rec.update({
        "prefill_s": min(pre), "prefill_s_all": pre, "prefill_tok_s": prefill / min(pre),
        "prefill_tok_s_median": prefill / statistics.median(pre),
        "decode_s": min(dec), "decode_s_all": dec, "decode_tok_s": decode / min(dec),
        "decode_tok_s_median": decode / statistics.median(dec),
        "peak_rss_end_mib": max(peak_before, _peak_rss_mib()), "rss_end_mib": _status_mib("VmRSS"),
        "vmhwm_end_mib": _status_mib("VmHWM"),
    })
    return rec


def _child_main(spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    ids = json.loads(Path(spec["ids_file"]).read_text())
    rec = measure(spec["target"], spec["strategy"], ids, prefill=spec["prefill"], decode=spec["decode"],
                  decode_prompt=spec["decode_prompt"], repeats=spec["repeats"], threads=spec["threads"])
    rec["machine"] = spec["machine"] or machine_info(spec["threads"])
    Path(out_file).write_text(json.dumps(rec, indent=1))


# ---------------------------------------------------------------------------------------------------
# parent: inputs, children, reports
# ---------------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    from slr.api import git_commit

    return git_commit()


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"cpu_count": os.cpu_count(), "cpu_affinity": affinity, "cpu": _cpu_name(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": threads, "git_commit": _git_commit(), "loadavg_start": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _tokenizer_folder(target: dict) -> Path:
    if target["kind"] == "artifact":
        return Path(target["path"])
    from slr.models import resolve

    return Path(resolve(target["path"])[0])


def _tokenizer_key(folder: Path) -> str:
    h = hashlib.sha256()
    for f in _TOKENIZER_FILES:
        if (folder / f).is_file():
            h.update(f.encode() + (folder / f).read_bytes())
    return h.hexdigest()


def _prep_main(spec_file: str, out_file: str) -> None:
    """Child: machine info + one ids file per distinct tokenizer (first n Wikipedia-test token ids)."""
    spec = json.loads(Path(spec_file).read_text())
    n, tmp = spec["n_ids"], Path(spec["tmp"])
    files, by_key = [], {}
    for target in spec["targets"]:
        folder = _tokenizer_folder(target)
        key = _tokenizer_key(folder)
        if key not in by_key:
            from slr.data.calib import tokenize_text
            from slr.data.corpora import wiki_text

            tok = _load_tokenizer(folder)
            if tok is None:
                raise SystemExit(f"{folder} has no tokenizer files: pass --ids-file")
            ids = tokenize_text(tok, wiki_text("test"))[:n].tolist()
            if len(ids) < n:
                raise SystemExit(f"the Wikipedia test split has only {len(ids)} tokens, {n} needed")
            by_key[key] = str(tmp / f"ids-{len(by_key)}.json")
            Path(by_key[key]).write_text(json.dumps(ids))
        files.append(by_key[key])
    Path(out_file).write_text(json.dumps({"machine": machine_info(spec["threads"]), "ids_files": files}))


def _spawn(flag: str, spec: dict, tmp: Path, threads: int, timeout: float,
           script: str | os.PathLike | None = None) -> tuple[dict | None, str | None]:
    """Run this script (or ``script``) with ``flag SPEC --_out OUT`` in a fresh process -> (output JSON or None,
    error or None).

    The parent never imports torch: on Linux ru_maxrss survives exec(), so a child spawned by a big parent
    would start with the parent's peak.
    """
    fd, spec_file = tempfile.mkstemp(suffix=".json", dir=tmp)
    os.close(fd)
    Path(spec_file).write_text(json.dumps(spec))
    out_file = spec_file[:-5] + ".out.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    script = str(Path(script or __file__).resolve())
    try:
        p = subprocess.run([sys.executable, script, flag, spec_file, "--_out", out_file],
                           capture_output=True, text=True, env=env, timeout=timeout)
        err = None if p.returncode == 0 else (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout} s"
    if err is None and not Path(out_file).is_file():
        err = "no output"
    return (json.loads(Path(out_file).read_text()) if err is None else None), err


def run_child(target: dict, strategy: str | None, ids_file: str, args, tmp: Path, machine: dict | None) -> dict:
    """One measurement in a fresh process (``machine``: None = the child records it)."""
    spec = {"target": target, "strategy": strategy, "ids_file": ids_file, "prefill": args.prefill,
            "decode": args.decode, "decode_prompt": args.decode_prompt, "repeats": args.repeats,
            "threads": args.threads, "machine": machine}
    t = time.perf_counter()
    rec, err = _spawn("--_child", spec, tmp, args.threads, args.child_timeout)
    if rec is None:
        rec = {"label": target["label"], "kind": target["kind"], "model": target["path"],
               "strategy": _strategy_name(target, strategy), "error": err}
    rec["child_wall_s"] = round(time.perf_counter() - t, 1)
    return rec


def best_of_rounds(recs: list[dict]) -> dict:
    """One row from its rounds: the record of the fastest decode, with the fastest prefill of any round and every
    round's decode and prefill speed (an error only when every round failed)."""
    ok = [r for r in recs if "error" not in r]
    if not ok:
        return recs[-1]
    best = dict(max(ok, key=lambda r: r["decode_tok_s"]))
    best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in ok)
    if len(recs) > 1:
        best["rounds"] = [{k: r.get(k) for k in ("decode_tok_s", "prefill_tok_s", "error")} for r in recs]
    return best


def _f(x, fmt: str = ".2f", none: str = "--") -> str:
    return none if x is None else format(x, fmt)


def _mb(b) -> str:
    return "--" if b is None else f"{b / 1e6:.1f} MB"


def add_ratios(records: list[dict]) -> None:
    """decode / prefill speed relative to the dense fp32 model (the first dense record without error)."""
    dense = next((r for r in records if r["strategy"] == "dense" and "error" not in r), None)
    for r in records:
        if dense is None or "error" in r:
            r["decode_vs_dense"] = r["prefill_vs_dense"] = r["rss_decode_vs_dense"] = None
            continue
        r["decode_vs_dense"] = r["decode_tok_s"] / dense["decode_tok_s"]
        a, b = r.get("rss_decode_peak_mib"), dense.get("rss_decode_peak_mib")
        r["rss_decode_vs_dense"] = a / b if a and b else None
        r["prefill_vs_dense"] = r["prefill_tok_s"] / dense["prefill_tok_s"]


def markdown(records: list[dict], machine: dict, args) -> str:
    def m(k):
        return machine.get(k, "?")

    lines = [
        "## Inference benchmark (CPU, issue 8)",
        "",
        f"Generated by `python benchmarks/inference.py` ({m('date')}, commit {m('git_commit')}). "
        f"{m('cpu')}, {m('cpu_count')} CPUs, torch {m('torch')}, {args.threads} thread(s), fp32 "
        f"compute, batch 1; 1-min load average at start {_f((machine.get('loadavg_start') or [None])[0])}. "
        f"Prefill: one {args.prefill}-token forward (KV cache on, last-position logits). Decode: greedy generate of "
        f"{args.decode} tokens from a {args.decode_prompt}-token prompt (KV cache), whole-call wall time. "
        f"Best of {args.repeats} after a warm-up; every row runs in a fresh process"
        + (f", {args.rounds} times, the rows taking turns (best of all rounds kept)" if args.rounds > 1 else "")
        + ". Bytes: compressed layers "
        "on disk (dense rows: the same layers in fp32); theory = values + packed index + factors; "
        "peak RSS = ru_maxrss right after load / after the timing runs.",
        "",
        "| model | strategy | layer bytes | vs theory | vs dense fp16 | artifact total | peak RSS load / end (MiB) "
        "| peak RSS decoding (MiB) | vs dense | prefill tok/s | vs dense | decode tok/s | decode vs dense fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        b = r.get("bytes", {})
        if r["kind"] == "dense":
            lb, vt, vd, tot = b.get("layers_fp32"), None, (2.0 if b else None), None
        else:
            lb, vt, vd, tot = b.get("compressed_layers"), b.get("ratio_vs_theory"), b.get("ratio_vs_dense_fp16"), \
                b.get("total")
        if "error" in r:
            lines.append(f"| {r['label']} | {r['strategy']} | {_mb(lb)} | {_f(vt, '.3f')} | {_f(vd, '.3f')} | "
                         f"{_mb(tot)} | error: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['strategy']} | {_mb(lb)} | {_f(vt, '.3f')} | {_f(vd, '.3f')} | {_mb(tot)} | "
            f"{r['peak_rss_load_mib']:.0f} / {r['peak_rss_end_mib']:.0f} | {_f(r.get('rss_decode_peak_mib'), '.0f')} | "
            f"{_f(r.get('rss_decode_vs_dense'), '.3f')} | {r['prefill_tok_s']:.1f} | "
            f"{_f(r.get('prefill_vs_dense'), '.3f')} | {r['decode_tok_s']:.2f} | "
            f"{_f(r.get('decode_vs_dense'), '.3f')} |")
    lines += ["", "### Observations", "", observations(records), ""]
    return "\n".join(lines)


def observations(records: list[dict]) -> str:
    """Sentences stating measured facts only (no speculation)."""
    ok = [r for r in records if "error" not in r]
    dense = next((r for r in ok if r["strategy"] == "dense"), None)
    out = []
    if dense is not None:
        b = dense["bytes"]
        out.append(f"The dense model ({dense['label']}) prefills {dense['prefill_tok_s']:.1f} tok/s and decodes "
                   f"{dense['decode_tok_s']:.2f} tok/s with a peak RSS of {dense['peak_rss_end_mib']:.0f} MiB; its "
                   f"block linears take {b['layers_fp32'] / 1e6:.1f} MB in fp32 ({b['layers_fp16'] / 1e6:.1f} MB "
                   "in fp16).")
    for label in dict.fromkeys(r["label"] for r in ok if r["kind"] == "artifact"):
        rs = [r for r in ok if r["label"] == label]
        b = rs[0]["bytes"]
        s = (f"{label}: the compressed layers take {b['compressed_layers'] / 1e6:.1f} MB on disk, "
             f"{_f(b['ratio_vs_theory'], '.3f')}x the theoretical size and {_f(b['ratio_vs_dense_fp16'], '.3f')}x "
             f"their dense fp16 size (artifact total {b['total'] / 1e6:.1f} MB).")
        if len(rs) > 1:
            fp = max(rs, key=lambda r: r["prefill_tok_s"])
            fd = max(rs, key=lambda r: r["decode_tok_s"])
            fm = min(rs, key=lambda r: r["peak_rss_end_mib"])
            s += (f" Fastest prefill: {fp['strategy']} ({fp['prefill_tok_s']:.1f} tok/s); fastest decode: "
                  f"{fd['strategy']} ({fd['decode_tok_s']:.2f} tok/s); lowest peak RSS after the runs: "
                  f"{fm['strategy']} ({fm['peak_rss_end_mib']:.0f} MiB).")
        else:
            r = rs[0]
            s += (f" With {r['strategy']}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} "
                  f"tok/s, peak RSS {r['peak_rss_end_mib']:.0f} MiB.")
        if dense is not None:
            faster = [r["strategy"] for r in rs if r["decode_tok_s"] > dense["decode_tok_s"]]
            smaller = [r["strategy"] for r in rs if r["peak_rss_end_mib"] < dense["peak_rss_end_mib"]]
            s += (f" Strategies decoding faster than dense fp32: {', '.join(faster) or 'none'}; with a lower peak RSS "
                  f"than dense fp32: {', '.join(smaller) or 'none'}.")
        out.append(s)
    errors = [f"{r['label']}/{r['strategy']}" for r in records if "error" in r]
    if errors:
        out.append(f"Failed runs: {', '.join(errors)}.")
    return " ".join(out) if out else "No successful measurements."


class _ArtifactAction(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        arts = list(getattr(ns, "artifacts", None) or [])
        arts.append({"kind": "artifact", "path": value, "label": Path(value).name})
        ns.artifacts = arts


class _LabelAction(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        arts = getattr(ns, "artifacts", None)
        if not arts:
            parser.error("--label must follow the --artifact it names")
        arts[-1]["label"] = value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m", help="dense model (default name or HF folder); 'none' skips")
    ap.add_argument("--dense-label", default=None)
    ap.add_argument("--artifact", action=_ArtifactAction, dest="artifact_", metavar="DIR", help="repeatable")
    ap.add_argument("--label", action=_LabelAction, dest="label_", metavar="LABEL", help="names the last --artifact")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--decode-prompt", type=int, default=32, help="prompt length for the decode run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, one row after another in turn, and keep each row's best")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ids-file", default=None, help="JSON list of token ids to use instead of the Wikipedia text")
    ap.add_argument("--child-timeout", type=int, default=3600)
    ap.add_argument("--out-json", default=str(HERE / "inference.json"))
    ap.add_argument("--out-md", default=str(HERE / "inference.md"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_prep", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    ap.set_defaults(artifacts=[])
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        ap.error(f"unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGIES)}")
    args.strategies = strategies
    for k in ("prefill", "decode", "decode_prompt", "repeats", "rounds", "threads"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def targets_of(args) -> list[dict]:
    """The models to measure from --dense / --artifact (exits with one line when there are none or one is not an
    artifact)."""
    targets = []
    if args.dense and args.dense.lower() != "none":
        targets.append({"kind": "dense", "path": args.dense, "label": args.dense_label or args.dense})
    targets += args.artifacts
    if not targets:
        raise SystemExit("nothing to measure: pass --dense and/or --artifact")
    for t in targets:
        if t["kind"] == "artifact" and not (Path(t["path"]) / "slr_config.json").is_file():
            raise SystemExit(f"{t['path']} is not an slr artifact (no slr_config.json)")
    return targets


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._child:
        _child_main(args._child, args._out)
        return []
    if args._prep:
        _prep_main(args._prep, args._out)
        return []
    targets = targets_of(args)
    n_ids = max(args.prefill, args.decode_prompt)
    records = []
    with tempfile.TemporaryDirectory(prefix="slr-inference-") as tmpd:
        tmp = Path(tmpd)
        if args.ids_file:  # no tokenizer needed: each child records the machine itself
            ids = json.loads(Path(args.ids_file).read_text())
            if len(ids) < n_ids:
                raise SystemExit(f"--ids-file has {len(ids)} ids, {n_ids} needed")
            Path(tmp / "ids.json").write_text(json.dumps(ids[:n_ids]))
            machine, ids_files = None, [str(tmp / "ids.json")] * len(targets)
        else:
            prep, err = _spawn("--_prep", {"targets": targets, "n_ids": n_ids, "tmp": str(tmp),
                                           "threads": args.threads}, tmp, args.threads, args.child_timeout)
            if prep is None:
                raise SystemExit(f"preparing the inputs failed: {err}")
            machine, ids_files = prep["machine"], prep["ids_files"]
        rows = []
        for t, ids_t in zip(targets, ids_files, strict=True):
            dense_runs = [None] + ([RUNTIME] if RUNTIME in args.strategies else [])  # HF first: the baseline
            rows += [(t, s, ids_t) for s in (args.strategies if t["kind"] == "artifact" else dense_runs)]
        rounds = [[] for _ in rows]
        for r in range(args.rounds):  # every row once per round: a slow spell of the machine hits all rows alike
            for (t, s, ids_t), got in zip(rows, rounds, strict=True):
                rec = run_child(t, s, ids_t, args, tmp, machine)
                rec.setdefault("machine", machine)
                got.append(rec)
                msg = rec.get("error") or (f"prefill {rec['prefill_tok_s']:.1f} tok/s, decode "
                                           f"{rec['decode_tok_s']:.2f} tok/s, peak RSS {rec['peak_rss_load_mib']:.0f}"
                                           f" / {rec['peak_rss_end_mib']:.0f} MiB")
                tag = f" [round {r + 1}/{args.rounds}]" if args.rounds > 1 else ""
                print(f"{rec['label']:>20} {rec['strategy']:>15}: {msg}  ({rec['child_wall_s']} s){tag}", flush=True)
        records = [best_of_rounds(got) for got in rounds]
    add_ratios(records)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(records, indent=1) + "\n")
    machine = next((r["machine"] for r in records if r.get("machine")), None) or {}
    Path(args.out_md).write_text(markdown(records, machine, args))
    print(f"wrote {args.out_json} and {args.out_md}")
    return records


if __name__ == "__main__":
    main()
