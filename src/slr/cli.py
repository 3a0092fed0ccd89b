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

import torch  # noqa: E402  (after the offline switches above)
from transformers.utils import logging as hf_logging  # noqa: E402

from . import runtime  # noqa: E402
from .allocate import ALLOCATORS  # noqa: E402
from .api import is_artifact, open_model, resolve_device, run_compress, run_eval, summary_rows  # noqa: E402
from .config import DTYPES, TM_PRESETS, CompressConfig, RunOptions, load_toml, merge  # noqa: E402
from .errors import SLRError, is_disk_full  # noqa: E402
from .eval.zeroshot import TASKS as ZS_TASKS  # noqa: E402
from .eval.zeroshot import format_table  # noqa: E402
from .fsutil import check_writable_parent  # noqa: E402
from .io import export_dense  # noqa: E402
from .kernels import KERNELS, use_kernel  # noqa: E402
from .models.load import resolve  # noqa: E402
from .models.zoo import DEFAULTS, cache_dir, is_cached, is_installed  # noqa: E402
from .report import write_report  # noqa: E402
from .solvers import METHODS  # noqa: E402

EPILOG_MODEL = "MODEL is a default's name (smollm2-135m, gemma3-270m), a local HF folder, or a .gguf file."


def _device(p):
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda  [default: auto]")


def _kernel(p):
    p.add_argument("--kernel", default="auto", choices=KERNELS,
                   help="CPU kernels: auto = an artifact loads packed (slr.packed: a 2-4 bit or 2:4 S, and an int8 or "
                   "float16 head, stay at their stored width and run slr's C++ kernels at decode; one GEMM per layer "
                   "at prefill) and an in-memory 4-bit S runs an int4 kernel where it keeps the numbers; bf16 = also "
                   "float32 activations through torch's int4 kernel in bfloat16; q8 = auto, and a decode step "
                   "hands a packed 2-4 bit dense S and an int8 head int8 activations (faster, llama.cpp-style "
                   "activation rounding; benchmarks/q8_quality.md); torch = the pure-torch path "
                   "(dequantize and matmul)  [default: auto]")


def build_parser() -> argparse.ArgumentParser:
    methods = ", ".join(f"{n} ({m.kind})" for n, m in sorted(METHODS.items()))
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
    _kernel(e)

    c = sub.add_parser("compress", help="compress a model and write an artifact + results.json", epilog=EPILOG_MODEL
                       + " With --config FILE.toml the run is read from a TOML file that maps 1:1 onto CompressConfig "
                       "and RunOptions (see slr.config); flags given on the command line override it.",
                       description="Compress every linear of the decoder blocks layer by layer.")
    D = argparse.SUPPRESS  # only the flags given reach the config, so that they can override a --config file
    c.add_argument("model", metavar="MODEL", nargs="?", default=D, help="model to compress (or `model` in --config)")
    c.add_argument("--config", default=D, metavar="FILE.toml", help="read the run from a TOML file")
    c.add_argument("--method", default=D, help=f"layer solver: {methods} [default: sparsegpt]")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=float, default=D,
                   help="unstructured sparsity of S, in (0, 1) [default: 0.5 for methods with a sparse part]")
    g.add_argument("--pattern", default=D, metavar="N:M", help="N:M sparsity of S along the input dim, e.g. 2:4")
    c.add_argument("--rank", type=int, default=D, help="rank of the low-rank part per matrix [default: 0]")
    c.add_argument("--bits", type=int, default=D, metavar="8|4|3|2",
                   help="bit width of S's values, quantized inside the solve (methods gptq, rtn, ...); with no "
                   "--sparsity/--pattern S is dense [default: float storage]")
    c.add_argument("--group-size", type=int, default=D, metavar="G",
                   help="inputs per quantization group (fp16 scale each) [default: 64]")
    c.add_argument("--asym", action="store_true", default=D,
                   help="asymmetric grid (a zero point per group) instead of the symmetric one")
    c.add_argument("--factor-bits", type=int, default=D, metavar="16|8|4",
                   help="bit width of U and V [default: 16 = fp16]")
    c.add_argument("--out", default=D, metavar="DIR", help="artifact directory (written atomically)")
    c.add_argument("--overwrite", action="store_true", default=D, help="replace an existing --out directory")
    c.add_argument("--no-save", action="store_true", default=D, help="do not write the artifact (results.json only)")
    c.add_argument("--calib-samples", type=int, default=D, help="calibration windows [default: 128]")
    c.add_argument("--calib-text", default=D, metavar="FILE", help="calibrate on your own text file")
    c.add_argument("--text", default=D, metavar="FILE", help="evaluate on your own text file")
    c.add_argument("--seed", type=int, default=D, help="calibration sampling seed [default: 0]")
    c.add_argument("--windows", default=D, help="eval windows, or 'all' [default: 64]")
    c.add_argument("--no-eval", action="store_true", default=D, help="skip perplexity evaluation")
    c.add_argument("--tasks", default=D, metavar="T1,T2", help="also score zero-shot tasks on the compressed model")
    c.add_argument("--limit", type=int, default=D, metavar="N", help="first N documents per zero-shot task")
    c.add_argument("--values-dtype", default=D, choices=DTYPES, help="storage of S's values [default: float16]")
    c.add_argument("--factor-dtype", default=D, choices=DTYPES, help="storage of U and V [default: float16]")
    c.add_argument("--embed-bits", type=int, default=D, metavar="16|8",
                   help="storage of the embeddings (and an untied head): 16 = float16, 8 = int8 with an fp16 scale per "
                   "row; counted in the artifact's bytes [default: 16]")
    c.add_argument("--batch-size", type=int, default=D, help="calibration windows per forward [default: 8]")
    c.add_argument("--allocate", default=D, choices=list(ALLOCATORS),
                   help="how the global budget is split over matrices [default: uniform]")
    c.add_argument("--budget", type=float, default=D,
                   help="global retained fraction in (0, 1) (PROTOCOL §5); default: that of the uniform spec")
    c.add_argument("--budget-bits", type=float, default=D, metavar="B",
                   help="instead of --budget: B bits per weight on average over the compressed linears (their bytes "
                   "x 8 / weights); --allocate knapsack, cap or search then picks each matrix's bit width of S in "
                   "2, 3, 4, 8 (and rank), uniform keeps --bits. Needs --bits")
    c.add_argument("--refine", default=D, choices=["tm"], help="tm = transformer matching per block")
    c.add_argument("--tm-epochs", type=int, default=D, help="transformer-matching epochs [default: 8]")
    c.add_argument("--tm-samples", type=int, default=D, metavar="N",
                   help="calibration windows transformer matching trains on (at most all but the held-out ones) "
                   "[default: 32]")
    c.add_argument("--tm-heldout", type=int, default=D, metavar="N",
                   help="the last N calibration windows are never trained on, only used to judge TM: the best "
                   "parameters on them are kept, the original ones restored if TM does not lower their loss; 0 = "
                   "judge on the training windows [default: max(1, windows // 8), 0 for one window]")
    c.add_argument("--tm-lr", type=float, default=D, help="transformer matching's Adam learning rate (cosine to "
                   "lr / 5) [default: 3e-4]")
    c.add_argument("--tm-batch", type=int, default=D, metavar="N", help="windows a TM step [default: 8]")
    c.add_argument("--tm-dense-targets", type=float, default=D, metavar="A",
                   help="TM's targets: (1 - A) x the dense block on the compressed path's inputs + A x the dense "
                   "model's own block outputs; A > 0 lets TM also correct the error earlier blocks pass on "
                   "[default: 0, 3BASiL's targets]")
    c.add_argument("--tm-preset", default=D, choices=list(TM_PRESETS),
                   help="paper = 3BASiL-TM's schedule: 20 epochs, 128 windows, Adam lr 2e-5 cosine to lr / 5, 8 "
                   "windows a step; --tm-* flags override it")
    c.add_argument("--distill", action="store_true", default=D,
                   help="after compression, train the compressed blocks so that the model's next-token distributions "
                   "match the dense model's on the calibration windows (KL; slr.distill)")
    c.add_argument("--kd-epochs", type=int, default=D, help="distillation epochs [default: 2]")
    c.add_argument("--kd-lr", type=float, default=D, help="distillation learning rate (Adam) [default: 1e-4]")
    c.add_argument("--kd-samples", type=int, default=D, metavar="N",
                   help="calibration windows distillation trains on [default: all but the held-out ones]")
    c.add_argument("--kd-heldout", type=int, default=D, metavar="N",
                   help="the last N calibration windows only judge distillation: the epoch with the lowest held-out "
                   "KL is kept, the original restored if none is better [default: max(1, windows // 8)]")
    c.add_argument("--resume", action="store_true", default=D,
                   help="continue an interrupted run of the same command from its last finished block (the "
                   "checkpoints live in .slr-partial-<OUT> beside --out)")
    c.add_argument("--onload", action="store_true", default=D,
                   help="layer onloading: build the model on the meta device and read one block at a time from its "
                   "safetensors shards (needs --out; uniform allocation, one process)")
    c.add_argument("--offload-activations", action="store_true", default=D,
                   help="keep the calibration activations in files beside --out instead of in memory")
    c.add_argument("--alloc-opt", action="append", default=D, metavar="KEY=VALUE",
                   help="allocator option (repeatable), e.g. span=0.2 (knapsack/cap/search trust region, default "
                        "0.1), steps=40 samples=32 tokens=256 (cap), generations=80 (search), pools=rpca, "
                        "pools=solved (cap/search: every level solved by the run's method; level_cache=DIR keeps "
                        "them), init=uniform, rank_floor=0")
    c.add_argument("--opt", action="append", default=D, metavar="KEY=VALUE",
                   help="solver option, e.g. --opt max_iters=300 (repeatable)")
    c.add_argument("--device", default=D, help="auto (CUDA when present) | cpu | cuda  [default: auto]")

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
    gen.add_argument("--runtime", default="auto", choices=("auto", "slr", "hf"),
                     help="slr = slr's plain-PyTorch decoder (slr.runtime: llama, mistral, qwen2, qwen3, "
                     "gemma3_text; no transformers import, a preallocated KV cache); hf = transformers' model and "
                     "generate; auto = slr for an artifact that it runs on the CPU, else hf  [default: auto]")
    _device(gen)
    _kernel(gen)
    return ap


def _opts(pairs: list[str], flag: str = "--opt", example: str = "max_iters=300") -> dict:
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
    print(f"{'name':<14} {'installed':<10} {'cached':<7} source")
    for e in DEFAULTS.values():
        print(f"{e.name:<14} {'yes' if is_installed(e) else 'no':<10} {'yes' if is_cached(e) else 'no':<7} "
              f"{e.hf_name}  [{e.package}]")
    print(f"cache: {cache_dir()}  (set SLR_CACHE to move it)")
    return 0


def cmd_eval(a) -> int:
    if a.json:  # fail before the (long) evaluation, not when writing its result
        check_writable_parent(a.json, "--json")
    splits = [s.strip() for s in a.split.split(",")] if a.split else None
    tasks = [a.tasks] if a.tasks else None
    with use_kernel(a.kernel):
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


# flag -> (table, key) of the TOML layout (slr.config); None = the top level (CompressConfig)
_FLAGS = {
    "method": (None, "method"), "sparsity": (None, "sparsity"), "pattern": (None, "pattern"), "rank": (None, "rank"),
    "calib_samples": (None, "calib_samples"), "seed": (None, "seed"), "opt": (None, "solver"),
    "bits": (None, "bits"), "group_size": (None, "group_size"), "asym": (None, "sym"),
    "factor_bits": (None, "factor_bits"),
    "allocate": ("alloc", "method"), "budget": ("alloc", "budget"), "budget_bits": ("alloc", "budget_bits"),
    "alloc_opt": ("alloc", "options"),
    "refine": ("refine", "method"), "tm_epochs": ("refine", "epochs"), "tm_samples": ("refine", "max_samples"),
    "tm_heldout": ("refine", "heldout"), "tm_preset": ("refine", "preset"),
    "tm_lr": ("refine", "lr"), "tm_batch": ("refine", "batch_size"), "tm_dense_targets": ("refine", "dense_targets"),
    "distill": ("distill", None), "kd_epochs": ("distill", "epochs"), "kd_lr": ("distill", "lr"),
    "kd_samples": ("distill", "max_samples"), "kd_heldout": ("distill", "heldout"),
    "out": ("run", "out"), "overwrite": ("run", "overwrite"), "no_save": ("run", "save"),
    "calib_text": ("run", "calib_text"), "text": ("run", "eval_text"), "windows": ("run", "windows"),
    "no_eval": ("run", "evaluate"), "tasks": ("run", "tasks"), "limit": ("run", "limit"),
    "values_dtype": ("run", "values_dtype"), "factor_dtype": ("run", "factor_dtype"),
    "embed_bits": ("run", "embed_bits"),
    "batch_size": ("run", "batch_size"), "resume": ("run", "resume"), "onload": ("run", "onload"),
    "offload_activations": ("run", "offload_activations"), "device": ("run", "device"),
}


def compress_request(a: argparse.Namespace) -> tuple[str, CompressConfig, RunOptions]:
    """(model, config, run options) from `slr compress` flags over an optional --config TOML file."""
    model, tables, run = load_toml(a.config) if "config" in a else (None, {}, {})
    given: dict = {}
    for flag, value in vars(a).items():
        if flag not in _FLAGS:
            continue
        table, k = _FLAGS[flag]
        if flag == "opt":
            value = _opts(value)
        elif flag == "alloc_opt":
            value = _opts(value, "--alloc-opt", "pools=whitened")
        elif flag == "tasks":
            value = [value]  # "piqa,arc_easy" or "all": the zero-shot checker splits it
        elif flag in ("no_save", "no_eval", "asym"):
            value = not value
        if k is None:  # --distill: the table with its defaults
            given.setdefault(table, {})
            continue
        given.setdefault(table, {})[k] = value
    if "refine" in given and "refine" not in tables and "method" not in given["refine"]:
        raise SLRError("--tm-epochs/--tm-samples/--tm-heldout/--tm-lr/--tm-batch/--tm-dense-targets/--tm-preset set "
                       "transformer matching's schedule",
                       "add --refine tm")
    if "distill" in given and "distill" not in tables and "distill" not in vars(a):
        raise SLRError("--kd-epochs/--kd-lr/--kd-samples/--kd-heldout set distillation's schedule", "add --distill")
    tables = merge(merge(tables, {k: v for k, v in given.get(None, {}).items()}),
                   {t: v for t, v in given.items() if t not in (None, "run")})
    run = merge(run, given.get("run", {}))
    model = a.model if "model" in a else model
    if model is None:
        raise SLRError("no model to compress", "pass MODEL, or model = \"...\" in the --config file")
    config = CompressConfig.from_dict(tables)
    return model, config, RunOptions.from_dict(run)


def cmd_compress(a) -> int:
    model, config, run = compress_request(a)
    out = run_compress(model, config, run)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (and writes)
        return 0
    print(_table(summary_rows(out.results)))
    if out.out_dir is not None:
        print(f"  wrote {out.out_dir}/ (results.json{'' if not run.save else ' + artifact'})")
    return 0


def cmd_export(a) -> int:
    out = export_dense(a.artifact, a.dense, overwrite=a.overwrite)
    print(f"wrote dense HF folder {out}")
    return 0


def cmd_report(a) -> int:
    out = write_report(a.runs, a.out)
    print(f"wrote {out['html']} and {out['markdown']} ({len(out['figures'])} figures)")
    return 0


def _runtime_folder(a, device) -> Path | None:
    """The folder slr.runtime runs for ``slr generate``, or None for transformers (see --runtime)."""
    if a.runtime == "hf":
        return None
    art, cpu = is_artifact(a.model), torch.device(device).type == "cpu"
    if a.runtime == "auto" and not (art and cpu):
        return None
    if not cpu:
        raise SLRError("slr's runtime runs on the CPU", "drop --device, or pass --runtime hf")
    folder = Path(a.model) if art else resolve(a.model)[0]
    why = runtime.unsupported(runtime.read_config(folder))
    if why is None and not (folder / "tokenizer.json").is_file():
        why = "no tokenizer.json"
    if why is not None and a.runtime == "slr":
        raise SLRError(f"slr's runtime cannot run {a.model}: {why}", "pass --runtime hf")
    return None if why else folder


def cmd_generate(a) -> int:
    if a.max_new_tokens < 1:
        raise SLRError(f"--max-new-tokens {a.max_new_tokens} is below 1", "pass e.g. --max-new-tokens 40")
    device = resolve_device(a.device)
    with use_kernel(a.kernel):  # under "torch" an artifact loads unpacked
        folder = _runtime_folder(a, device)
        if folder is not None:
            model, tok = runtime.load(folder)
            out = model.generate(tok.encode(a.prompt), a.max_new_tokens, model.eos_token_id)
            print(tok.decode(out[0]))
            return 0
        model, tok, _ = open_model(a.model, device)
        ids = tok(a.prompt, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
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
