"""High-level runs used by the CLI and benchmarks: evaluate a model, compress-evaluate-save."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed, io
from .allocate.search import recorded_tokens
from .checkpoint import BlockCheckpoints, tensor_sha256
from .config import CompressConfig, RunOptions
from .data.calib import calibration_windows, tokenize_text
from .data.corpora import load_text
from .embeddings import round_embeddings_
from .errors import SLRError
from .estimate import check_fits, describe, estimate_run
from .eval.ppl import perplexity
from .eval.zeroshot import check_request as check_zeroshot_request
from .eval.zeroshot import evaluate_zeroshot
from .formats import MANIFEST, model_bytes
from .fsutil import atomic_dir, check_writable_parent, write_json_atomic
from .models import load_model
from .models.adapters import get_adapter
from .models.zoo import cache_dir
from .onload import check_request as onload_check_request
from .onload import open_onloaded
from .pipeline import compress_, plan_for
from .solvers import method

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


def open_model(name_or_path: str, device: str = "cpu"):
    """A source model (default name, HF folder, .gguf) or an slr artifact -> (model, tok, info dict)."""
    if is_artifact(name_or_path):
        model, tok = io.load(name_or_path, device=device)
        man = json.loads((Path(name_or_path) / "slr_config.json").read_text())
        src = man.get("source", {})
        if tok is None:
            raise SLRError(f"artifact {name_or_path} has no tokenizer files", "re-save it with a tokenizer")
        info = {"name": str(name_or_path), "label": f"slr artifact of {src.get('label', '?')}",
                "sha256": src.get("sha256"), "bos_per_window": bool(src.get("bos_per_window", False))}
        return model, tok, info
    model, tok, mi = load_model(name_or_path, device=device)
    return model, tok, {"name": mi.name, "label": mi.label, "sha256": mi.sha256, "bos_per_window": mi.bos_per_window}


def calibration_data(tok, config: CompressConfig, text: str | None = None,
                     bos_per_window: bool = False) -> torch.Tensor | None:
    """The run's calibration windows [config.calib_samples, config.seqlen] (PROTOCOL §4): drawn with
    ``config.seed`` from the Wikipedia sample's calibration split, or from the UTF-8 file ``text``; None when
    ``config.calib_samples`` is 0. ``bos_per_window``: the model needs BOS at the start of every window (Gemma 3;
    ``load_model``'s info says so)."""
    if config.calib_samples == 0:
        return None
    return _calibration_windows(tok, config, load_text(text, "calibration")[0], bos_per_window)


def _calibration_windows(tok, config: CompressConfig, src: str, bos_per_window: bool) -> torch.Tensor | None:
    """``calibration_data`` of a text already read."""
    if config.calib_samples == 0:
        return None
    torch.manual_seed(config.seed)
    bos = tok.bos_token_id if bos_per_window else None
    return calibration_windows(tokenize_text(tok, src), config.calib_samples, config.seqlen, config.seed, bos_id=bos)


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_eval(model_name: str, *, text_file: str | list[str] | None = None, split: str | list[str] | None = None,
             windows="64", seqlen: int = 512, batch_size: int = 4, device: str = "auto", json_path: str | None = None,
             progress: bool = True, tasks: list[str] | None = None, limit: int | None = None,
             ppl: bool = True) -> dict:
    """Protocol perplexity of MODEL (source model or artifact) on each text, and optional zero-shot tasks.

    Texts: the Wikipedia-sample ``split``s (default "test" when no file is given) and every ``text_file``.
    The top-level ppl fields are the first text's; ``perplexity`` lists all of them, each with its protocol
    label. ``tasks`` runs lm-eval zero-shot scoring (``limit`` docs per task); its result is ``zeroshot``.
    """
    if not ppl and not tasks:
        raise SLRError("nothing to evaluate: perplexity is off (--no-ppl) and no --tasks were given",
                       "drop --no-ppl, or pass --tasks piqa,... (or all)")
    w = parse_windows(windows)
    device = resolve_device(device)
    files = [text_file] if isinstance(text_file, str | os.PathLike) else list(text_file or [])
    splits = [split] if isinstance(split, str) else list(split or ([] if files else ["test"]))
    if tasks:
        tasks = check_zeroshot_request(tasks, limit)
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
        t = time.perf_counter()
        out["zeroshot"] = evaluate_zeroshot(model, tok, tasks, limit=limit, batch_size=batch_size, device=device)
        out["zeroshot"]["seconds"] = time.perf_counter() - t
    if json_path:
        write_json_atomic(Path(json_path), out)
    return out


def _check_shapes(model, spec) -> None:
    """Fail before any heavy work if the spec does not fit some matrix (N:M width, rank)."""
    ad = get_adapter(model)
    for lin in ad.linears(ad.blocks(model)[0]).values():
        spec.validate(*lin.weight.shape)


@dataclass
class CompressRun:
    """What `slr compress` produces: results (also in DIR/results.json) and the artifact path."""

    results: dict
    out_dir: Path | None


def run_compress(model_name: str, config: CompressConfig, run: RunOptions | None = None) -> CompressRun:
    """Load -> calibrate -> ``compress_`` -> evaluate -> save artifact + results.json (atomically).

    With ``run.out``, everything is staged in ``<parent>/.slr-partial-<name>/`` and renamed to ``out`` when complete;
    every finished block is checkpointed there, so ``run.resume`` continues an interrupted run (killed, crashed,
    Ctrl-C) from its last finished block and gives a bit-identical artifact. ``run.overwrite`` discards old checkpoints.

    Under ``torchrun --nproc_per_node=K`` the job joins the torch.distributed group (see slr.distributed): the
    calibration and transformer matching are data-parallel, the solves weight-parallel, and rank 0 alone evaluates
    and writes; the other ranks return a CompressRun without ppl and with ``out_dir`` None.

    ``run.onload`` (needs ``out``): the model is built on the meta device and its blocks are read one at a time from
    the safetensors shards (slr.onload); ``run.offload_activations`` keeps the calibration activations in files in the
    staging folder instead of memory. The dense ppl is then only reported when it is cached.
    """
    run = run or RunOptions()
    group = distributed.init_from_env()
    try:
        return _Run(model_name, config, run, group).go()
    finally:
        distributed.shutdown()  # a barrier first: nobody leaves before rank 0 has written


class _Run:
    """One `slr compress` job: the checks up front, then load, plan, compress, evaluate, save."""

    def __init__(self, model_name: str, config: CompressConfig, run: RunOptions, group):
        self.model_name, self.config, self.run, self.group = model_name, config, run, group
        self.device = distributed.device_for(group, resolve_device(run.device))
        self.times: dict[str, float] = {}
        self.tasks = check_zeroshot_request(run.tasks, run.limit) if run.tasks else None
        self.windows = parse_windows(run.windows)
        self.out_dir = Path(run.out) if run.out else None
        self.partial = self.out_dir.resolve().parent / f".slr-partial-{self.out_dir.name}" if self.out_dir else None
        self.progress = run.progress and group.is_main

    def _check_output(self) -> None:
        """Refuse, before any heavy work, an output that cannot be written or that would lose an interrupted run."""
        run, out_dir = self.run, self.out_dir
        if is_artifact(self.model_name):  # its SLRLinears have no .weight to compress
            raise SLRError(f"{self.model_name} is an slr artifact, not a source model",
                           "compress the original model; use `slr eval DIR` to evaluate the artifact")
        if run.onload or run.offload_activations:
            onload_check_request(self.config, out_dir, self.group.world, self.model_name, run.onload)
        if out_dir is None:
            return
        if out_dir.exists() and not out_dir.is_dir():
            raise SLRError(f"--out {out_dir} exists and is not a directory", "pass a directory path with --out")
        check_writable_parent(out_dir, "--out")
        if run.save and out_dir.exists() and any(out_dir.iterdir()) and not run.overwrite:
            raise SLRError(f"output directory {out_dir} exists and is not empty", "pass --overwrite or another --out")
        out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists() and not run.resume:
            if not run.overwrite and (self.partial / "checkpoints" / "meta.json").exists():
                raise SLRError(f"an interrupted run left checkpoints in {self.partial}",
                               "rerun the same command with --resume to continue it, or pass --overwrite to start "
                               "over")
            if self.group.is_main:
                shutil.rmtree(self.partial)
        self.group.barrier()

    def _timed(self, stage: str, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t
        return out

    def go(self) -> CompressRun:
        config, run, group, device = self.config, self.run, self.group, self.device
        spec = config.layer_spec()
        self._check_output()
        evaluate = run.evaluate
        eval_src, eval_label = load_text(run.eval_text, "test") if evaluate else (None, None)
        calib_src, calib_label = load_text(run.calib_text, "calibration")  # before loading: a bad file fails fast
        source = None
        if run.onload:
            model, tok, info, source = self._timed("load", open_onloaded, self.model_name)
        else:
            model, tok, info = self._timed("load", open_model, self.model_name, device)
        _check_shapes(model, spec)
        # onloading with nothing to evaluate in memory: the compressed blocks stay in the checkpoints and are
        # streamed into the artifact one at a time (io.save(blocks=...)), so the whole model is never resident
        rebuild = bool(evaluate or self.tasks)
        est = estimate_run(model, config.calib_samples, config.seqlen, onload=run.onload,
                           offload_activations=run.offload_activations, batch_size=run.batch_size, rebuild=rebuild,
                           allocate=config.alloc.method, refine=config.refine and config.refine.method,
                           tm_samples=config.refine and config.refine.max_samples,
                           tm_dense_targets=bool(config.refine and config.refine.dense_targets > 0),
                           distill=config.distill is not None,
                           solved=getattr(config.alloc.options, "pools", None) == "solved",
                           prefix_tokens=recorded_tokens(config.alloc.options, config.calib_samples)
                           if config.alloc.method == "search" and config.alloc.budget_bits is None else 0)
        check_fits(est)  # before printing it, so a refusal stays one line
        if self.progress:
            print(f"slr: {describe(est)}", file=sys.stderr)
        results: dict = {
            "model": info["label"], "model_arg": self.model_name, "model_sha256": info["sha256"],
            "method": config.method, "config": config.to_dict(), "spec": spec.label, "seed": config.seed,
            "calibration": {"text": calib_label, "samples": config.calib_samples, "seqlen": config.seqlen,
                            "seed": config.seed},
            "device": device, "git_commit": git_commit(), "torch": torch.__version__,
            "world_size": group.world, "onload": run.onload, "offload_activations": run.offload_activations,
        }
        eval_ids = tokenize_text(tok, eval_src) if evaluate else None
        evaluate = evaluate and group.is_main  # rank 0 evaluates and writes; the other ranks only compress
        if evaluate and run.eval_dense:
            d = self._timed("eval_dense", dense_ppl_cached, model, tok, info, eval_src, self.windows, 512, device,
                            cached_only=run.onload)
            if d is not None:
                results["dense_ppl"] = d | {"text": eval_label}
        calib = _calibration_windows(tok, config, calib_src, info["bos_per_window"])
        plan, alloc_info = self._timed("allocate", plan_for, model, config, calib, device)
        if alloc_info is not None:
            results["allocation"] = alloc_info
        report = self._timed("compress", self._compress, model, calib, plan, info, calib_label, source, rebuild)
        if not group.is_main:
            return CompressRun(results, None)
        round_embeddings_(model, run.embed_bits)  # as the artifact stores them: the ppl below is the artifact's
        self.times.update({f"compress.{k}": v for k, v in report.seconds.items()})
        results.update({
            "retained_fraction": report.retained_fraction, "retained_params": report.retained_params,
            "dense_params": report.dense_params, "mean_rel_error": report.mean_rel_error,
            "rel_error_metric": "frobenius"
            if calib is None or (method(config.method).data_free and config.refine is None) else "activation",
            "matrices": [vars(r) | {"shape": list(r.shape)} for r in report.records],
        })
        if report.resumed:  # seconds["compress"] is this process's; the compress.* stages include those blocks
            results["resumed_blocks"] = report.resumed
        if report.refine:
            results["refine"] = report.refine
        if report.distill is not None:
            results["distill"] = report.distill
        if alloc_info is not None:
            results["plan"] = plan.to_dict()
        if evaluate:
            r = self._timed("eval", perplexity, model, tok, eval_src, windows=self.windows,
                            bos_per_window=info["bos_per_window"], device=device, ids=eval_ids, progress=self.progress)
            results["ppl"] = r.to_dict() | {"text": eval_label}
        if self.tasks:  # the in-memory compressed model, through HFLM(pretrained=model)
            results["zeroshot"] = self._timed("zeroshot", evaluate_zeroshot, model, tok, self.tasks, limit=run.limit,
                                              batch_size=run.batch_size, device=device)
        results["seconds"] = self.times
        results["peak_rss_mib"] = peak_rss_mib()
        results["memory_estimate_mib"] = est["total"] / 2**20
        return self._save(model, tok, info, spec, results, report)

    def _compress(self, model, calib, plan, info, calib_label, source, rebuild):
        config, run, partial, group = self.config, self.run, self.partial, self.group
        checkpoints = None
        if partial is not None:
            fingerprint = {"model_sha256": info["sha256"], "config": config.to_dict(), "calib_text": calib_label,
                           "calib_sha256": tensor_sha256(calib),
                           "plan": None if config.alloc.is_uniform else plan.to_dict(), "torch": torch.__version__}
            checkpoints = BlockCheckpoints(partial / "checkpoints", fingerprint, run.resume, writer=group.is_main,
                                           sync=group.barrier)
        try:
            return compress_(model, config, calib, plan=plan, device=self.device, batch_size=run.batch_size,
                             progress=self.progress, checkpoints=checkpoints, onload=source,
                             offload_activations=str(partial / "activations") if run.offload_activations else None,
                             rebuild=rebuild)
        except SLRError:
            # bad input (NaN weights or H, ...): the rerun after the fix is a different run, so its checkpoints are
            # useless; a kill or Ctrl-C (not an SLRError) keeps them for --resume
            if partial is not None and group.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise

    def _save(self, model, tok, info, spec, results, report) -> CompressRun:
        run, out_dir, partial = self.run, self.out_dir, self.partial
        if out_dir is None or not run.save:
            b = model_bytes(model, values_dtype=STORAGE_DTYPES[run.values_dtype],
                            factor_dtype=STORAGE_DTYPES[run.factor_dtype])
            if b["bpw"] is not None:  # not saved: the compressed linears' bytes as io.save would write them
                results["bytes"] = b | {"values_dtype": run.values_dtype, "factor_dtype": run.factor_dtype}
            if out_dir is not None:
                write_json_atomic(out_dir / "results.json", results)
                shutil.rmtree(partial, ignore_errors=True)
            return CompressRun(results, out_dir)
        t = time.perf_counter()
        manifest = {"source": {"name": info["name"], "label": info["label"], "sha256": info["sha256"],
                               "bos_per_window": info["bos_per_window"]},
                    "config": self.config.to_dict(), "plan": results.get("plan", {"*": spec.label})}
        with atomic_dir(out_dir, overwrite=True) as stage:  # run.overwrite was checked before any work
            byte_report = io.save(model, stage, tokenizer=tok, manifest=manifest,
                                  values_dtype=STORAGE_DTYPES[run.values_dtype],
                                  factor_dtype=STORAGE_DTYPES[run.factor_dtype], embed_bits=run.embed_bits,
                                  blocks=report.blocks)
            on_disk = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())  # before results.json
            results["bytes"] = byte_report | {"values_dtype": run.values_dtype, "factor_dtype": run.factor_dtype,
                                              "on_disk": on_disk}
            self.times["save"] = time.perf_counter() - t
            results["peak_rss_mib"] = peak_rss_mib()  # again: a streamed save rebuilds the blocks only now
            write_json_atomic(stage / "results.json", results)
        shutil.rmtree(partial, ignore_errors=True)  # complete: the checkpoints are no longer needed
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
    b = results.get("bytes") or {}
    if b.get("bpw") is not None:
        rows.append(("bits per weight", f"{b['bpw']:.3f}  (compressed linears, PROTOCOL §5)"))
    if "total" in b:
        rows.append(("artifact bytes", f"{b.get('on_disk', b['total']):,} on disk ({b.get('compressed_layers', 0):,} "
                     f"in compressed layers)"))
    if "zeroshot" in results:
        z = results["zeroshot"]
        docs = "all docs" if z["limit"] is None else f"limit {z['limit']}"
        rows.append(("zero-shot average", f"{z['average']:.4f}  ({len(z['tasks'])} tasks, {docs})"))
    s = results["seconds"]
    rows.append(("time", f"compress {s['compress']:.1f} s, eval {s.get('eval', 0):.1f} s"))
    return rows
