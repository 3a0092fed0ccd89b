"""slr command line: a thin layer over slr.api. Bad input prints one line and exits 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EPILOG_MODEL = "MODEL is a default's name (smollm2-135m, gemma3-270m), a local HF folder, or a .gguf file."


def _device(p):
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda  [default: auto]")


def build_parser() -> argparse.ArgumentParser:
    from .eval.zeroshot import TASKS as ZS_TASKS
    from .solvers import SOLVERS
    from .solvers.base import GROUP_SOLVERS

    methods = ", ".join(sorted(set(SOLVERS) | set(GROUP_SOLVERS)))
    ap = argparse.ArgumentParser(
        prog="slr", description="Sparse + low-rank compression of LLMs (W ~= S + U V) under one budget.",
        epilog="Run `slr COMMAND --help` for each command. Nothing is fetched from a model hub.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list shipped default models, and whether each is installed and cached",
                   description="List shipped default models (GGUFs inside PyPI packages).")

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or an slr artifact",
                       epilog=EPILOG_MODEL + " Zero-shot tasks: " + ", ".join(ZS_TASKS) + " (or 'all').",
                       description="Perplexity over non-overlapping 512-token windows (PROTOCOL §3; default: "
                       "Wikipedia sample test split, first 64 windows = 'quick'), and with --tasks, zero-shot "
                       "accuracy scored by lm-eval-harness on offline copies of the eval sets (PROTOCOL §6).")
    e.add_argument("model", metavar="MODEL|DIR", help="model, or a directory written by `slr compress --out`")
    e.add_argument("--windows", default="64", help="number of windows, or 'all' [default: 64 = quick]")
    e.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="evaluate on your own UTF-8 text file (repeatable; replaces the default split)")
    e.add_argument("--split", default=None, help="Wikipedia-sample split(s): test, calibration, or "
                   "test,calibration [default: test, unless --text is given]")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity (zero-shot only)")
    e.add_argument("--tasks", default=None, metavar="T1,T2", help="zero-shot tasks, comma-separated, or 'all'")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="first N documents per zero-shot task")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward [default: 8]")
    e.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    _device(e)

    c = sub.add_parser("compress", help="compress a model and write an artifact + results.json", epilog=EPILOG_MODEL,
                       description="Compress every linear of the decoder blocks layer by layer.")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--method", default="sparsegpt", help=f"layer solver: {methods} [default: sparsegpt]")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity of S, in (0, 1)")
    g.add_argument("--pattern", default=None, metavar="N:M", help="N:M sparsity of S along the input dim, e.g. 2:4")
    c.add_argument("--rank", type=int, default=0, help="rank of the low-rank part per matrix [default: 0]")
    c.add_argument("--out", default=None, metavar="DIR", help="artifact directory (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    c.add_argument("--no-save", action="store_true", help="do not write the artifact (results.json only)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows [default: 128]")
    c.add_argument("--calib-text", default=None, metavar="FILE", help="calibrate on your own text file")
    c.add_argument("--text", default=None, metavar="FILE", help="evaluate on your own text file")
    c.add_argument("--seed", type=int, default=0, help="calibration sampling seed [default: 0]")
    c.add_argument("--windows", default="64", help="eval windows, or 'all' [default: 64]")
    c.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    c.add_argument("--tasks", default=None, metavar="T1,T2", help="also score zero-shot tasks on the compressed model")
    c.add_argument("--limit", type=int, default=None, metavar="N", help="first N documents per zero-shot task")
    c.add_argument("--values-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--factor-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward [default: 8]")
    c.add_argument("--allocate", default="uniform", choices=["uniform", "owl", "cap", "knapsack"],
                   help="how the global budget is split over matrices [default: uniform]")
    c.add_argument("--budget", type=float, default=None,
                   help="global retained fraction in (0, 1) (PROTOCOL §5); default: that of the uniform spec")
    c.add_argument("--refine", default=None, choices=["tm"], help="tm = transformer matching per block")
    c.add_argument("--tm-epochs", type=int, default=20, help="transformer-matching epochs [default: 20]")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished block (the "
                   "checkpoints live in .slr-partial-<OUT> beside --out)")
    c.add_argument("--onload", action="store_true",
                   help="layer onloading: build the model on the meta device and read one block at a time from its "
                   "safetensors shards (needs --out; uniform allocation, one process)")
    c.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations in files beside --out instead of in memory")
    c.add_argument("--tm-samples", type=int, default=None, metavar="N",
                   help="calibration windows transformer matching trains on [default: all]")
    c.add_argument("--alloc-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="allocator option (repeatable), e.g. span=0.2 (knapsack/cap trust region, default 0.1), "
                        "pools=whitened or init=density (cap), rank_floor=0")
    c.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option, e.g. --opt max_iters=300 (repeatable)")
    _device(c)

    x = sub.add_parser("export", help="write a plain dense HF folder from an artifact",
                       description="Reconstruct S + UV into a dense HF model that from_pretrained loads.")
    x.add_argument("artifact", metavar="DIR")
    x.add_argument("--dense", required=True, metavar="OUT", help="output HF folder")
    x.add_argument("--overwrite", action="store_true")

    rp = sub.add_parser("report", help="compare runs: static HTML page + markdown summary with plots",
                        description="Compare `slr compress --out` run directories side by side: a table (config, "
                        "retained fraction, bytes, ppl, zero-shot average, time) and matplotlib plots (ppl vs retained "
                        "fraction, per-matrix rank/sparsity heatmaps, per-layer error, time by stage). The HTML "
                        "embeds its images and needs no network.")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories holding results.json")
    rp.add_argument("--out", default="report.html", metavar="FILE.html",
                    help="HTML output; the markdown goes beside it as FILE.md [default: report.html]")

    gen = sub.add_parser("generate", help="generate text from a model or an artifact", epilog=EPILOG_MODEL)
    gen.add_argument("model", metavar="MODEL|DIR")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    _device(gen)
    return ap


def _opts(pairs: list[str], flag: str = "--opt", example: str = "max_iters=300") -> dict:
    from .errors import SLRError

    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0]:
            raise SLRError(f"{flag} {p!r} is not KEY=VALUE", f"write e.g. {flag} {example}")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def cmd_models(_args) -> int:
    from .models.zoo import DEFAULTS, cache_dir, is_cached, is_installed

    print(f"{'name':<14} {'installed':<10} {'cached':<7} source")
    for e in DEFAULTS.values():
        print(f"{e.name:<14} {'yes' if is_installed(e) else 'no':<10} {'yes' if is_cached(e) else 'no':<7} "
              f"{e.hf_name}  [{e.package}]")
    print(f"cache: {cache_dir()}  (set SLR_CACHE to move it)")
    return 0


def cmd_eval(a) -> int:
    from .api import run_eval
    from .eval.zeroshot import format_table

    if a.json:  # fail before the (long) evaluation, not when writing its result
        from .io import check_writable_parent

        check_writable_parent(a.json, "--json")
    splits = [s.strip() for s in a.split.split(",")] if a.split else None
    tasks = [a.tasks] if a.tasks else None
    r = run_eval(a.model, text_file=a.text, split=splits, windows=a.windows, batch_size=a.batch_size,
                 device=a.device, json_path=a.json, tasks=tasks, limit=a.limit, ppl=not a.no_ppl)
    for p in r["perplexity"]:
        print(f"{r['model']} | {p['split']} | ppl {p['ppl']:.4f} | {p['protocol']} | {p['tokens']} tokens | "
              f"{p['seconds']:.1f} s")
    if "zeroshot" in r:
        print(format_table(r["zeroshot"]))
    if a.json:
        print(f"wrote {a.json}")
    return 0


def cmd_compress(a) -> int:
    from .allocate.base import GROUP_METHODS, RANK_ONLY
    from .api import run_compress, summary_rows
    from .config import CompressConfig

    if a.method in RANK_ONLY | GROUP_METHODS and a.sparsity is None and a.pattern is None and a.rank == 0:
        if a.budget is None:
            from .errors import SLRError

            raise SLRError(f"{a.method} is rank-only and needs a rank or a budget", "pass --rank R or --budget 0.5")
        a.rank = 1  # placeholder: the allocator sets every rank from --budget
    if a.sparsity is None and a.pattern is None and a.rank == 0:
        a.sparsity = 0.5
    cfg = CompressConfig(method=a.method, sparsity=a.sparsity, pattern=a.pattern, rank=a.rank,
                         calib_samples=a.calib_samples, seed=a.seed, solver_opts=_opts(a.opt),
                         allocate=a.allocate, budget=a.budget, refine=a.refine, tm_epochs=a.tm_epochs,
                         tm_samples=a.tm_samples, alloc_opts=_opts(a.alloc_opt, "--alloc-opt", "pools=whitened"))
    if a.sparsity is None and a.pattern is None:
        cfg.sparsity = 1.0  # rank only: no sparse part
    from .solvers import get_solver
    from .solvers.base import GROUP_SOLVERS

    if a.method not in GROUP_SOLVERS:
        get_solver(a.method)
    from .allocate import check_alloc_opts
    from .api import is_artifact
    from .config import check_options
    from .errors import SLRError

    if is_artifact(a.model):  # open_model would load it as an artifact, whose SLRLinears have no .weight to compress
        raise SLRError(f"{a.model} is an slr artifact, not a source model",
                       "compress the original model; use `slr eval DIR` to evaluate the artifact")

    # typos and wrong types are refused here, before any heavy work (solvers/allocators swallow unknown keys)
    check_options(GROUP_SOLVERS.get(a.method) or get_solver(a.method), cfg.solver_opts, flag="--opt",
                  what=f"the {a.method} solver")
    check_alloc_opts(a.allocate, cfg.alloc_opts)
    if a.out:  # an --out that is a file, under a file, or in an unwritable place fails now, not after compressing
        from .io import check_writable_parent

        if Path(a.out).exists() and not Path(a.out).is_dir():
            raise SLRError(f"--out {a.out} exists and is not a directory", "pass a directory path with --out")
        check_writable_parent(a.out, "--out")
    if a.calib_samples < 0:
        from .errors import SLRError

        raise SLRError(f"--calib-samples {a.calib_samples} is negative", "pass --calib-samples N with N >= 0")
    run = run_compress(a.model, cfg, out=a.out, calib_text=a.calib_text, eval_text=a.text, windows=a.windows,
                       device=a.device, evaluate=not a.no_eval, save=not a.no_save, overwrite=a.overwrite,
                       batch_size=a.batch_size, values_dtype=a.values_dtype, factor_dtype=a.factor_dtype,
                       tasks=[a.tasks] if a.tasks else None, limit=a.limit, resume=a.resume,
                       onload=a.onload, offload_activations=a.offload_activations)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (and writes)
        return 0
    print(_table(summary_rows(run.results)))
    if run.out_dir is not None:
        print(f"  wrote {run.out_dir}/ (results.json{'' if a.no_save else ' + artifact'})")
    return 0


def cmd_export(a) -> int:
    from .io import export_dense

    out = export_dense(a.artifact, a.dense, overwrite=a.overwrite)
    print(f"wrote dense HF folder {out}")
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    out = write_report(a.runs, a.out)
    print(f"wrote {out['html']} and {out['markdown']} ({len(out['figures'])} figures)")
    return 0


def cmd_generate(a) -> int:
    import torch

    from .api import open_model, resolve_device

    device = resolve_device(a.device)
    model, tok, _ = open_model(a.model, device)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import SLRError

    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return {"models": cmd_models, "eval": cmd_eval, "compress": cmd_compress, "export": cmd_export,
                "generate": cmd_generate, "report": cmd_report}[a.cmd](a)
    except SLRError as e:
        print(f"slr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = a.cmd == "compress" and getattr(a, "out", None)  # `slr report` has an --out too
        hint = " (finished blocks are checkpointed: rerun with --resume to continue)" if resumable else ""
        print(f"slr: interrupted; no partial output was written{hint}", file=sys.stderr)
        return 130
    except MemoryError:
        print("slr: error: out of memory -- fix: use fewer --calib-samples, a smaller --batch-size, or a bigger "
              "machine", file=sys.stderr)
        return 2
    except Exception as e:  # environment problems that no check caught up front: still one line, no traceback
        from .errors import is_disk_full

        if is_disk_full(e):  # an OSError, or safetensors' own SafetensorError "... (os error 28)"
            name = getattr(e, "filename", None)
            where = f" while writing {name}" if name else ""
            print(f"slr: error: no space left on device{where} -- fix: free disk space or write to another disk",
                  file=sys.stderr)
        elif isinstance(e, OSError) and e.errno is not None:
            where = f": {e.filename}" if e.filename else ""
            print(f"slr: error: {e.strerror or e}{where} -- fix: check that the path exists and is writable",
                  file=sys.stderr)
        else:
            raise  # a bug: keep the traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
