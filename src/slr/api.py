"""High-level runs used by the CLI and benchmarks: evaluate a model, compress-evaluate-save."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CompressConfig
from .errors import SLRError
from .solvers import DATA_FREE


def resolve_device(device: str) -> str:
    """auto -> cuda when present, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SLRError("--device cuda was asked for but no CUDA device is available", "use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SLRError(f"unknown device {device!r}", "use auto, cpu or cuda")
    return device


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_windows(text: str | int | None) -> int | None:
    """'all' -> None; '64' -> 64; rejects 0 and negatives."""
    if text is None or text == "all":
        return None
    try:
        w = int(text)
    except (TypeError, ValueError):
        raise SLRError(f"--windows {text!r} is not a number", "pass --windows N (N >= 1) or --windows all") from None
    if w < 1:
        raise SLRError(f"--windows {w} is invalid", "pass --windows N with N >= 1, or --windows all")
    return w


def is_artifact(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "slr_config.json").exists()


def open_model(name_or_path: str, device: str = "cpu"):
    """A source model (default name, HF folder, .gguf) or an slr artifact -> (model, tok, info dict)."""
    if is_artifact(name_or_path):
        from . import io

        model, tok = io.load(name_or_path, device=device)
        man = json.loads((Path(name_or_path) / "slr_config.json").read_text())
        src = man.get("source", {})
        if tok is None:
            raise SLRError(f"artifact {name_or_path} has no tokenizer files", "re-save it with a tokenizer")
        info = {"name": str(name_or_path), "label": f"slr artifact of {src.get('label', '?')}",
                "sha256": src.get("sha256"), "bos_per_window": bool(src.get("bos_per_window", False))}
        return model, tok, info
    from .models import load_model

    model, tok, mi = load_model(name_or_path, device=device)
    return model, tok, {"name": mi.name, "label": mi.label, "sha256": mi.sha256, "bos_per_window": mi.bos_per_window}


def _ppl_cache_key(model_sha: str | None, text: str, windows, seqlen: int) -> str | None:
    if model_sha is None:
        return None
    th = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{model_sha[:16]}-{th}-{windows}-{seqlen}"


def dense_ppl_cached(model, tok, info: dict, text: str, windows, seqlen: int, device, batch_size: int = 4,
                     cached_only: bool = False) -> dict | None:
    """Dense perplexity, cached in $SLR_CACHE/ppl.json by (model hash, text hash, windows, seqlen).

    ``cached_only``: return None instead of computing it (an onloaded model is never whole in memory).
    """
    from .eval.ppl import perplexity
    from .models.zoo import cache_dir

    key = _ppl_cache_key(info.get("sha256"), text, windows, seqlen)
    path = cache_dir() / "ppl.json"
    cache = {}
    if key and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        if key in cache:
            return cache[key] | {"cached": True}
    if cached_only:
        return None
    r = perplexity(model, tok, text, seqlen=seqlen, windows=windows, batch_size=batch_size,
                   bos_per_window=info["bos_per_window"], device=device).to_dict()
    if key:
        cache[key] = r
        try:
            write_json_atomic(path, cache)
        except OSError:
            pass
    return r


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def run_eval(model_name: str, *, text_file: str | list[str] | None = None, split: str | list[str] | None = None,
             windows="64", seqlen: int = 512, batch_size: int = 4, device: str = "auto", json_path: str | None = None,
             progress: bool = True, tasks: list[str] | None = None, limit: int | None = None,
             ppl: bool = True) -> dict:
    """Protocol perplexity of MODEL (source model or artifact) on each text, and optional zero-shot tasks.

    Texts: the Wikipedia-sample ``split``s (default "test" when no file is given) and every ``text_file``.
    The top-level ppl fields are the first text's; ``perplexity`` lists all of them, each with its protocol
    label. ``tasks`` runs lm-eval zero-shot scoring (``limit`` docs per task); its result is ``zeroshot``.
    """
    from .data.corpora import load_text
    from .eval.ppl import perplexity

    if not ppl and not tasks:
        raise SLRError("nothing to evaluate: perplexity is off (--no-ppl) and no --tasks were given",
                       "drop --no-ppl, or pass --tasks piqa,... (or all)")
    w = parse_windows(windows)
    device = resolve_device(device)
    files = [text_file] if isinstance(text_file, str | os.PathLike) else list(text_file or [])
    splits = [split] if isinstance(split, str) else list(split or ([] if files else ["test"]))
    if tasks:
        from .eval.zeroshot import check_request

        tasks = check_request(tasks, limit)
    # read every text before loading the model, so a bad file fails fast
    texts = [load_text(None, s) for s in splits] + [load_text(f, "test") for f in files] if ppl else []
    model, tok, info = open_model(model_name, device)
    out: dict = {"model": info["label"], "model_arg": model_name, "perplexity": []}
    for text, label in texts:
        r = perplexity(model, tok, text, seqlen=seqlen, windows=w, batch_size=batch_size,
                       bos_per_window=info["bos_per_window"], device=device, progress=progress)
        out["perplexity"].append({"split": label, **r.to_dict()})
    if out["perplexity"]:
        out.update(out["perplexity"][0])  # the first text's numbers at the top level (the common single-text case)
    if tasks:
        from .eval.zeroshot import evaluate_zeroshot

        t = time.perf_counter()
        out["zeroshot"] = evaluate_zeroshot(model, tok, tasks, limit=limit, batch_size=batch_size, device=device)
        out["zeroshot"]["seconds"] = time.perf_counter() - t
    if json_path:
        write_json_atomic(Path(json_path), out)
    return out


def _check_shapes(model, spec) -> None:
    """Fail before any heavy work if the spec does not fit some matrix (N:M width, rank)."""
    from .models.adapters import get_adapter

    ad = get_adapter(model)
    for lin in ad.linears(ad.blocks(model)[0]).values():
        spec.validate(*lin.weight.shape)


@dataclass
class CompressRun:
    """What `slr compress` produces: results (also in DIR/results.json) and the artifact path."""

    results: dict
    out_dir: Path | None


def run_compress(model_name: str, config: CompressConfig, *, out: str | None = None, calib_text: str | None = None,
                 eval_text: str | None = None, windows="64", device: str = "auto", eval_dense: bool = True,
                 evaluate: bool = True, save: bool = True, overwrite: bool = False, batch_size: int = 8,
                 values_dtype: str = "float16", factor_dtype: str = "float16", progress: bool = True,
                 tasks: list[str] | None = None, limit: int | None = None, resume: bool = False,
                 onload: bool = False, offload_activations: bool = False) -> CompressRun:
    """Load -> calibrate -> compress -> evaluate -> save artifact + results.json (atomically).

    With ``out``, everything is staged in ``<parent>/.slr-partial-<name>/`` and renamed to ``out`` when complete;
    every finished block is checkpointed there, so ``resume=True`` continues an interrupted run (killed, crashed,
    Ctrl-C) from its last finished block and gives a bit-identical artifact. ``overwrite`` discards old checkpoints.

    Under ``torchrun --nproc_per_node=K`` the job joins the torch.distributed group (see slr.distributed): the
    calibration and transformer matching are data-parallel, the solves weight-parallel, and rank 0 alone evaluates
    and writes; the other ranks return a CompressRun without ppl and with ``out_dir`` None.

    ``onload`` (needs ``out``): the model is built on the meta device and its blocks are read one at a time from the
    safetensors shards (slr.onload); ``offload_activations`` keeps the calibration activations in files in the
    staging folder instead of memory. The dense ppl is then only reported when it is cached.
    """
    from . import distributed

    group = distributed.init_from_env()
    try:
        return _run_compress(model_name, config, out=out, calib_text=calib_text, eval_text=eval_text,
                             windows=windows, device=distributed.device_for(group, resolve_device(device)),
                             eval_dense=eval_dense,
                             evaluate=evaluate, save=save, overwrite=overwrite, batch_size=batch_size,
                             values_dtype=values_dtype, factor_dtype=factor_dtype, progress=progress, tasks=tasks,
                             limit=limit, resume=resume, group=group, onload=onload,
                             offload_activations=offload_activations)
    finally:
        distributed.shutdown()  # a barrier first: nobody leaves before rank 0 has written


def _run_compress(model_name: str, config: CompressConfig, *, out: str | None, calib_text: str | None,
                  eval_text: str | None, windows, device: str, eval_dense: bool, evaluate: bool, save: bool,
                  overwrite: bool, batch_size: int, values_dtype: str, factor_dtype: str, progress: bool,
                  tasks: list[str] | None, limit: int | None, resume: bool, group, onload: bool = False,
                  offload_activations: bool = False) -> CompressRun:
    from . import io
    from .data.calib import calibration_windows, tokenize_text
    from .data.corpora import load_text
    from .eval.ppl import perplexity
    from .pipeline import compress_

    spec = config.layer_spec()  # validates budgets before any heavy work
    if tasks:  # checked before the compression, not after it
        from .eval.zeroshot import check_request

        tasks = check_request(tasks, limit)
    w = parse_windows(windows)
    device = resolve_device(device)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if values_dtype not in dtypes or factor_dtype not in dtypes:
        raise SLRError("storage dtype must be float32, float16 or bfloat16", "fix --values-dtype/--factor-dtype")
    out_dir = Path(out) if out else None
    if onload or offload_activations:
        from .onload import check_request

        check_request(config, out_dir, group.world, model_name, onload)
    if out_dir is not None and save:
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise SLRError(f"output directory {out_dir} exists and is not empty", "pass --overwrite or another --out")
        parent = out_dir.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise SLRError(f"cannot write to {parent}", "choose a writable --out directory")
    partial = out_dir.resolve().parent / f".slr-partial-{out_dir.name}" if out_dir is not None else None
    if partial is not None and partial.exists() and not resume:
        if not overwrite and (partial / "checkpoints" / "meta.json").exists():  # refuse before any heavy work
            raise SLRError(f"an interrupted run left checkpoints in {partial}",
                           "rerun the same command with --resume to continue it, or pass --overwrite to start over")
        if group.is_main:
            shutil.rmtree(partial)
    group.barrier()
    progress = progress and group.is_main
    eval_src, eval_label = load_text(eval_text, "test") if evaluate else (None, None)
    calib_src, calib_label = load_text(calib_text, "calibration")
    times: dict[str, float] = {}
    t = time.perf_counter()
    source = None
    if onload:
        from .onload import open_onloaded

        model, tok, info, source = open_onloaded(model_name)
    else:
        model, tok, info = open_model(model_name, device)
    times["load"] = time.perf_counter() - t
    _check_shapes(model, spec)
    from .estimate import check_fits, describe, estimate_run

    # onloading with nothing to evaluate in memory: the compressed blocks stay in the checkpoints and are streamed
    # into the artifact one at a time (io.save(blocks=...)), so the whole model is never resident
    rebuild = bool(evaluate or tasks)
    est = estimate_run(model, config.calib_samples, config.seqlen, onload=onload,
                       offload_activations=offload_activations, batch_size=batch_size, rebuild=rebuild,
                       allocate=config.allocate)
    check_fits(est)  # before printing it, so a refusal stays one line
    if progress:
        print(f"slr: {describe(est)}", file=sys.stderr)
    results: dict = {
        "model": info["label"], "model_arg": model_name, "model_sha256": info["sha256"],
        "method": config.method, "config": config.to_dict(), "spec": spec.label, "seed": config.seed,
        "calibration": {"text": calib_label, "samples": config.calib_samples, "seqlen": config.seqlen,
                        "seed": config.seed},
        "device": device, "git_commit": git_commit(), "torch": torch.__version__,
        "world_size": group.world, "onload": onload, "offload_activations": offload_activations,
    }
    eval_ids = tokenize_text(tok, eval_src) if evaluate else None
    evaluate = evaluate and group.is_main  # rank 0 evaluates and writes; the other ranks only compress
    if evaluate and eval_dense:
        t = time.perf_counter()
        d = dense_ppl_cached(model, tok, info, eval_src, w, 512, device, cached_only=onload)
        if d is not None:
            results["dense_ppl"] = d | {"text": eval_label}
        times["eval_dense"] = time.perf_counter() - t
    torch.manual_seed(config.seed)
    calib = None
    if config.calib_samples > 0:
        bos = tok.bos_token_id if info["bos_per_window"] else None
        calib = calibration_windows(tokenize_text(tok, calib_src), config.calib_samples, config.seqlen, config.seed,
                                    bos_id=bos)
    refine = None
    if config.refine == "tm":
        from .refine import TMConfig, make_refiner

        refine = make_refiner(TMConfig(epochs=config.tm_epochs, max_samples=config.tm_samples), device=device)
    plan = None
    t = time.perf_counter()
    if config.allocate != "uniform" or config.budget is not None:
        from .allocate import make_plan

        plan, alloc_info = make_plan(model, config, calib, device=device, **config.alloc_opts)
        results["allocation"] = alloc_info
    times["allocate"] = time.perf_counter() - t
    t = time.perf_counter()
    checkpoints = None
    if partial is not None:
        from .checkpoint import BlockCheckpoints, tensor_sha256

        fingerprint = {"model_sha256": info["sha256"], "config": config.to_dict(), "calib_text": calib_label,
                       "calib_sha256": tensor_sha256(calib), "plan": plan.to_dict() if plan is not None else None,
                       "torch": torch.__version__}
        checkpoints = BlockCheckpoints(partial / "checkpoints", fingerprint, resume, writer=group.is_main,
                                       sync=group.barrier)
    try:
        report = compress_(model, config, calib, plan=plan, device=device, batch_size=batch_size, refine=refine,
                           progress=progress, checkpoints=checkpoints, onload=source,
                           offload_activations=str(partial / "activations") if offload_activations else None,
                           rebuild=rebuild)
    except SLRError:
        # bad input (NaN weights or H, ...): the rerun after the fix is a different run, so its checkpoints are
        # useless; a kill or Ctrl-C (not an SLRError) keeps them for --resume
        if partial is not None and group.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    times["compress"] = time.perf_counter() - t
    if not group.is_main:
        return CompressRun(results, None)
    times.update({f"compress.{k}": v for k, v in report.seconds.items()})
    results.update({
        "retained_fraction": report.retained_fraction, "retained_params": report.retained_params,
        "dense_params": report.dense_params, "mean_rel_error": report.mean_rel_error,
        "rel_error_metric": "frobenius" if calib is None or (config.method in DATA_FREE and config.refine is None)
        else "activation",  # ||W - What||^2 / ||W||^2, or ||X(W - What)^T||^2 / ||X W^T||^2
        "matrices": [vars(r) | {"shape": list(r.shape)} for r in report.records],
    })
    if plan is not None:
        results["plan"] = plan.to_dict()
    if evaluate:
        t = time.perf_counter()
        r = perplexity(model, tok, eval_src, windows=w, bos_per_window=info["bos_per_window"], device=device,
                       ids=eval_ids, progress=progress)
        results["ppl"] = r.to_dict() | {"text": eval_label}
        times["eval"] = time.perf_counter() - t
    if tasks:  # the in-memory compressed model, through HFLM(pretrained=model)
        from .eval.zeroshot import evaluate_zeroshot

        t = time.perf_counter()
        results["zeroshot"] = evaluate_zeroshot(model, tok, tasks, limit=limit, batch_size=batch_size, device=device)
        times["zeroshot"] = time.perf_counter() - t
    results["seconds"] = times
    results["peak_rss_mib"] = peak_rss_mib()
    results["memory_estimate_mib"] = est["total"] / 2**20
    if out_dir is None or not save:
        if out_dir is not None:
            write_json_atomic(out_dir / "results.json", results)
            shutil.rmtree(partial, ignore_errors=True)
        return CompressRun(results, out_dir if out_dir is not None else None)
    t = time.perf_counter()
    stage = Path(tempfile.mkdtemp(prefix=".slr-tmp-", dir=partial))
    try:
        manifest = {"source": {"name": info["name"], "label": info["label"], "sha256": info["sha256"],
                               "bos_per_window": info["bos_per_window"]},
                    "config": config.to_dict(), "plan": results.get("plan", {"*": spec.label})}
        byte_report = io.save(model, stage / "artifact", tokenizer=tok, manifest=manifest,
                              values_dtype=dtypes[values_dtype], factor_dtype=dtypes[factor_dtype],
                              blocks=report.blocks)
        results["bytes"] = byte_report | {"values_dtype": values_dtype, "factor_dtype": factor_dtype}
        times["save"] = time.perf_counter() - t
        results["peak_rss_mib"] = peak_rss_mib()  # again: a streamed save rebuilds the blocks only now
        write_json_atomic(stage / "artifact" / "results.json", results)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage / "artifact", out_dir)
        shutil.rmtree(partial, ignore_errors=True)  # complete: the checkpoints are no longer needed
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return CompressRun(results, out_dir)


def summary_rows(results: dict) -> list[tuple[str, str]]:
    """Rows of the short summary table printed after a run."""
    rows = [("model", results["model"]), ("method / spec", f"{results['method']} / {results['spec']}")]
    d, p = results.get("dense_ppl"), results.get("ppl")
    if d:
        rows.append(("dense ppl", f"{d['ppl']:.4f}  ({d['protocol']}, {d['text']})"))
    if p:
        rows.append(("compressed ppl", f"{p['ppl']:.4f}  ({p['protocol']}, {p['text']})"))
    rows.append(("retained fraction", f"{results['retained_fraction']:.4f}"))
    err = results["mean_rel_error"]
    kind = " (weight-space: data-free)" if results.get("rel_error_metric") == "frobenius" else ""
    rows.append(("mean rel. layer error", "n/a" if err is None else f"{err:.5f}{kind}"))
    if "bytes" in results:
        b = results["bytes"]
        rows.append(("artifact bytes",
                     f"{b.get('total', 0):,} ({b.get('compressed_layers', 0):,} in compressed layers)"))
    if "zeroshot" in results:
        z = results["zeroshot"]
        docs = "all docs" if z["limit"] is None else f"limit {z['limit']}"
        rows.append(("zero-shot average", f"{z['average']:.4f}  ({len(z['tasks'])} tasks, {docs})"))
    s = results["seconds"]
    rows.append(("time", f"compress {s['compress']:.1f} s, eval {s.get('eval', 0):.1f} s"))
    return rows
