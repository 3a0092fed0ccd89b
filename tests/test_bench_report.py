"""benchmarks/run.py's g50 tables: allocators are told apart by their options, and TM runs are paired with the
run of the same allocator and options."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("slr_bench_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path.remove(str(SCRIPT.parent))


def rec(allocate: str, ppl: float, refine: str | None = None, opts: dict | None = None, alloc: dict | None = None):
    return {"model": "m", "method": "admm", "config": "g50", "allocate": allocate, "refine": refine, "ppl": ppl,
            "calib_samples": 128, "dense_ppl": 20.0, "retained_fraction": 0.5, "compress_s": 1.0, "git_commit": "x",
            "stage_s": {"compress.refine": 2.0} if refine else {}, "tm_epochs": 3, "tm_samples": 16,
            **({"alloc_opts": opts} if opts else {}), **({"allocation": alloc} if alloc else {})}


def test_alloc_label_and_latest(bench):
    assert bench.alloc_label(rec("uniform", 30.0)) == "uniform"
    assert bench.alloc_label(rec("knapsack", 30.0, opts={"span": 0.1})) == "knapsack (span=0.1)"
    # defaults the allocator ran with come from the allocation summary
    assert bench.alloc_label(rec("cap", 30.0, opts={"pools": "whitened"}, alloc={"span": 0.1, "init": "knapsack"})) \
        == "cap (init=knapsack, pools=whitened, span=0.1)"
    recs = [rec("knapsack", 41.0), rec("knapsack", 33.0, opts={"span": 0.1}), rec("knapsack", 32.0, opts={"span": 0.1})]
    kept = bench.latest(recs)
    assert sorted(r["ppl"] for r in kept) == [32.0, 41.0]  # one per label, the newest


def test_tm_pairs_use_the_same_allocator_options(bench):
    recs = [rec("uniform", 35.0), rec("knapsack", 41.0), rec("knapsack", 33.4, opts={"span": 0.1}),
            rec("knapsack", 41.1, "tm"), rec("knapsack", 33.3, "tm", opts={"span": 0.1})]
    text = "\n".join(bench.allocation_tables(recs))
    assert "| admm | g50 | knapsack | 41.000 | 41.100 |" in text
    assert "| admm | g50 | knapsack (span=0.1) | 33.400 | 33.300 |" in text
    assert "| admm | knapsack (span=0.1) | - | 0.5000 | n/a | 33.400 | +10.7% |" in text  # (35 - 33.4) / (35 - 20)


def test_records_and_tables_carry_bpw(bench):
    res = {"model": "m (q4)", "method": "gptq", "config": {"sparsity": 0.0, "pattern": None, "rank": 0},
           "spec": "u0-q4g64", "calibration": {"samples": 8}, "seconds": {"compress": 1.0, "eval": 2.0},
           "retained_fraction": 1.0, "ppl": {"ppl": 30.0, "windows": 64, "text": "t"}, "dense_ppl": {"ppl": 20.0},
           "mean_rel_error": 0.01, "git_commit": "x", "seed": 0,
           "bytes": {"bpw": 4.25, "total": 1000, "on_disk": 1200}}
    r = bench.record(res, "u50")
    assert r["bpw"] == 4.25 and r["artifact_bytes"] == 1200
    old = bench.record({k: v for k, v in res.items() if k != "bytes"}, "u50")  # results.json from before bpw
    assert "bpw" not in old and "artifact_bytes" not in old
    unsaved = bench.record(res | {"bytes": {"bpw": 3.5, "compressed_layers_theory": 10}}, "u50")
    assert unsaved["bpw"] == 3.5 and "artifact_bytes" not in unsaved
    g50 = [rec("uniform", 35.0) | {"bpw": 6.5}]
    assert "| admm | uniform | - | 0.5000 | 6.500 | 35.000 |" in "\n".join(bench.allocation_tables(g50))
