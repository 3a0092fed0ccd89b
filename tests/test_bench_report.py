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


def test_refine_pairs_stay_within_one_model(bench):
    # a run of another model with the same method, config and allocator is never the "before" of a refined run
    recs = [rec("knapsack", 41.0), rec("knapsack", 36.0) | {"model": "other"}, rec("knapsack", 37.0, "tm")]
    text = "\n".join(bench.allocation_tables(recs))
    assert "| admm | g50 | knapsack | 41.000 | 37.000 |" in text
    assert "| 36.000 | 37.000 |" not in text


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


def test_frontier_marks_the_frontier_and_judges_each_budget_against_gptq(bench, tmp_path):
    def q(method, config, bpw, ppl):
        return {"model": "SmolLM2 x", "method": method, "config": config, "allocate": "uniform", "bpw": bpw,
                "ppl": ppl, "dense_ppl": 20.0, "git_commit": "c"}

    recs = [q("gptq", "q4g64", 4.25, 22.0), q("rtn", "q4g64", 4.25, 23.0), q("gptq", "q3g64", 3.25, 30.0),
            q("prune+lr", "q3g64r40f8", 4.21, 21.2), q("prune+lr", "q2g64r40f8", 3.21, 26.0),
            q("gptq", "q2g64", 2.25, 500.0), q("gptq", "q4g64", 4.25, 21.5) | {"solver_opts": {"clip": True}}]
    png = tmp_path / "f.png"
    text = "\n".join(bench.frontier_section(recs, bench.CONFIGS, bench._method, png))
    assert png.stat().st_size > 1000
    assert "| 5.000 | 20.000 | source GGUF (Q4_1) |" in text
    assert "| 4.210 | 21.200 | prune+lr | q3g64r40f8 | Q + L | uniform | yes | c |" in text
    assert "| 4.250 | 23.000 | rtn | q4g64 | Q | uniform |  | c |" in text  # gptq has a lower ppl at 4.25
    # 4.25: (21.2 - 20) / (22 - 20) = 0.6 <= 0.7; 3.25: (26 - 20) / (30 - 20) = 0.6 > 0.5; 2.5: 500 > 100
    assert "| 4.25 | q4g64, 22.000 | prune+lr q3g64r40f8 (4.210, 21.200) | Q + L | 0.60 | gap ratio <= 0.7 | yes |" \
        in text  # the clipped gptq row (slr's option) is not the production baseline
    assert "| 4.250 | 21.500 | gptq (clip=True) | q4g64 | Q | uniform |  | c |" in text
    assert "| 3.25 | q3g64, 30.000 | prune+lr q2g64r40f8 (3.210, 26.000) | Q + L | 0.60 | gap ratio <= 0.5 | **no** |" \
        in text
    assert "| 2.5 | q2g64, 500.000 | gptq q2g64 (2.250, 500.000) | Q | 1.00 | ppl <= 100 | **no** |" in text
    assert bench.frontier_section([r | {"bpw": None} for r in recs], bench.CONFIGS, bench._method, png) == []


def test_tm_rows_name_the_windows_they_ran_and_dense_targets(bench):
    tm = rec("uniform", 33.0, "tm") | {"tm_epochs": 8, "tm_samples": 32, "tm_windows": 32, "tm_heldout_windows": 16,
                                       "tm_lr": 3e-4, "tm_batch_size": 8, "tm_dense_targets": 1.0}
    text = "\n".join(bench.allocation_tables([rec("uniform", 35.0), tm]))
    assert "| 35.000 | 33.000 | 8, 32, 16, 0.0003, 8, dense targets 1.0 |" in text
    paper = rec("uniform", 34.0, "tm") | {"tm_epochs": 20, "tm_samples": 128, "tm_windows": 112,
                                          "tm_heldout_windows": 16, "tm_lr": 2e-5, "tm_batch_size": 8}
    text = "\n".join(bench.allocation_tables([rec("uniform", 35.0), paper]))
    assert "| 35.000 | 34.000 | 20, 112, 16, 2e-05, 8 |" in text  # the windows it trained on, not the cap


def test_tm_sweep_settings_and_table(bench):  # bench puts benchmarks/ on sys.path (tm_sweep imports run)
    spec = importlib.util.spec_from_file_location("slr_bench_tm_sweep", SCRIPT.parent / "tm_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_setting("lr=3e-4,epochs=8,batch_size=4") == {"lr": 3e-4, "epochs": 8, "batch_size": 4}
    row = {"block": 5, "setting": "lr=3e-4,epochs=8", "heldout_before": 0.1, "heldout_after": 0.095, "gain": 0.05,
           "kept_epoch": 8, "tm_s": 12.5}
    md = mod.render({"model": "m", "method": "admm", "pattern": "2:4", "rank": 32, "train": 32, "heldout": 16,
                     "threads": 2, "commit": "abc", "rows": [row], "note": "A note."})
    assert "| 5 | lr=3e-4,epochs=8 | 1.0000e-01 | 9.5000e-02 | 5.0% | 8 | 12.5 |" in md and "A note." in md


def test_each_tm_schedule_keeps_its_row(bench):
    base = rec("uniform", 35.0)
    a = rec("uniform", 33.0, "tm") | {"tm_epochs": 8, "tm_lr": 3e-4}
    b = rec("uniform", 33.5, "tm") | {"tm_epochs": 8, "tm_lr": 3e-4, "tm_dense_targets": 1.0}
    c = rec("uniform", 32.9, "tm") | {"tm_epochs": 8, "tm_lr": 3e-4}  # a's schedule again: replaces a's row
    history = [base, a, b, c]
    text = "\n".join(bench.allocation_tables(bench.latest(history), history))
    assert "| 35.000 | 33.500 |" in text and "| 35.000 | 32.900 |" in text and "| 35.000 | 33.000 |" not in text


def test_refined_runs_pair_with_the_base_of_their_solver_options(bench):
    old = rec("uniform", 36.0)  # other solver options (the defaults of its time)
    tm = rec("uniform", 33.2, "tm") | {"solver_opts": {"rho_grow": [1.07, 1.2, 1.5]}}
    base = rec("uniform", 33.8) | {"solver_opts": {"rho_grow": [1.07, 1.2, 1.5]}}  # recorded after the TM run
    kd = rec("uniform", 31.6) | {"distill": {"epochs": 2, "lr": 1e-4}, "solver_opts": {"max_iters": 130}}
    history = [old, kd, tm, base]
    text = "\n".join(bench.allocation_tables(bench.latest(history), history))
    assert "| 33.800 | 33.200 |" in text  # the base with its options, though recorded after it
    assert "| 36.000 | 31.600 |" in text  # no base with max_iters=130: the newest before it
