"""The public API runs the job a config describes, the CLI and a TOML file map onto the same config, and options are
typed: unknown keys and wrong types are one-line errors that name the valid keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_cli import run

import slr
from slr.config import AllocConfig, CompressConfig, RefineConfig, RunOptions, load_toml
from slr.errors import SLRError
from slr.models.tiny import tiny_model
from slr.solvers import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_config() -> dict:
    """The CompressConfig keywords of the README's Python API example (so the test follows the README)."""
    block = README.read_text().split("```python", 1)[1].split("```", 1)[0]
    m = re.search(r"slr\.CompressConfig\((.*?)\)\n", block, re.S)
    assert m, "the README's Python example builds an slr.CompressConfig"
    return eval(f"dict({m.group(1)})", {"slr": slr})  # noqa: S307  (our own README)


def test_readme_api_plan_equals_cli_plan(capsys, tmp_path, tiny_folder):
    """slr.compress_ with the README's config (knapsack, budget 0.5) plans what `slr compress` plans."""
    src, text = tiny_folder
    kw = readme_api_config()
    assert kw["alloc"].method == "knapsack" and kw["alloc"].budget == 0.5
    kw |= {"calib_samples": 8, "seqlen": 64, "solver": {"max_iters": 5, "min_iters": 5}}
    config = CompressConfig(**kw)
    model, tok, info = slr.load_model(str(src))
    calib = slr.calibration_data(tok, config, str(text), info.bos_per_window)
    report = slr.compress_(model, config, calib, progress=False)
    assert report.allocation["allocator"] == "knapsack"
    assert report.retained_fraction == pytest.approx(0.5, abs=1e-3)

    out = tmp_path / "cli"
    toml = tmp_path / "run.toml"
    toml.write_text(f'method = "{config.method}"\npattern = "{config.pattern}"\nrank = {config.rank}\n'
                    f'calib_samples = 8\nseqlen = 64\n[solver]\nmax_iters = 5\nmin_iters = 5\n'
                    f'[alloc]\nmethod = "knapsack"\nbudget = 0.5\n[run]\nevaluate = false\nsave = false\n')
    code, _, err = run(capsys, "compress", src, "--config", toml, "--calib-text", text, "--out", out,
                       "--device", "cpu")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["plan"] == report.plan.to_dict()
    assert res["config"] == config.to_dict()
    assert res["retained_fraction"] == report.retained_fraction


def test_compress_runs_allocation_and_refine():
    """compress_ reads config.alloc and config.refine (it used to ignore them)."""
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(method="prune+lr", sparsity=0.6, rank=4, alloc=AllocConfig("knapsack", budget=0.4),
                         refine=RefineConfig(lr=1e-3, epochs=2, batch_size=4))
    report = slr.compress_(model, cfg, calib, progress=False)
    assert report.allocation["allocator"] == "knapsack"
    assert report.retained_fraction == pytest.approx(0.4, abs=2e-3)
    specs = {s.label for s in report.plan.specs.values()}
    assert len(specs) > 1, "knapsack gives matrices different specs"
    assert len(report.refine) == 2 and all(s["steps"] > 0 for s in report.refine)


def test_flags_equal_toml(capsys, tmp_path, tiny_folder):
    """Every compress flag lands where the TOML layout puts it; flags override the file."""
    src, text = tiny_folder
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{src}"\nmethod = "wanda"\nsparsity = 0.7\ncalib_samples = 4\nseqlen = 64\n'
                    '[run]\nevaluate = false\nsave = false\n')
    code, _, err = run(capsys, "compress", "--config", toml, "--sparsity", 0.6, "--calib-text", text,
                       "--out", tmp_path / "a", "--device", "cpu")
    assert code == 0, err
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["config"]["sparsity"] == 0.6 and a["config"]["method"] == "wanda"
    assert a["retained_fraction"] == pytest.approx(0.4, abs=0.01)


def test_unknown_options_name_the_valid_ones(tmp_path):
    with pytest.raises(SLRError, match="max_iter=3 is not an option of the admm solver.*use one of: .*max_iters"):
        CompressConfig(method="admm", rank=4, solver={"max_iter": 3})
    with pytest.raises(SLRError, match="does not fit the admm solver's option max_iters"):
        CompressConfig(method="admm", rank=4, solver={"max_iters": "many"})
    with pytest.raises(SLRError, match="spam=1 is not an option of the knapsack allocator.*span"):
        AllocConfig("knapsack", options={"spam": 1})
    with pytest.raises(SLRError, match="unknown allocator 'greedy'"):
        AllocConfig("greedy")
    with pytest.raises(SLRError, match="unknown method 'admmm'.*admm"):
        CompressConfig(method="admmm")
    with pytest.raises(SLRError, match="'bugdet' is not a key of \\[alloc\\].*budget"):
        CompressConfig.from_dict({"method": "wanda", "alloc": {"bugdet": 0.5}})
    with pytest.raises(SLRError, match="'windowz' is not a key of \\[run\\]"):
        RunOptions.from_dict({"windowz": 3})
    bad = tmp_path / "bad.toml"
    bad.write_text("method = [\n")
    with pytest.raises(SLRError, match="cannot read config file"):
        load_toml(bad)


def test_cli_config_errors_are_one_line(capsys, tmp_path, tiny_folder):
    src, _ = tiny_folder
    toml = tmp_path / "run.toml"
    toml.write_text('method = "wanda"\n[alloc]\nbudgett = 0.5\n')
    code, out, err = run(capsys, "compress", src, "--config", toml)
    assert code == 2 and "is not a key of [alloc]" in err and "use one of: method, budget, options" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--tm-epochs", 3)
    assert code == 2 and "add --refine tm" in err


def test_registry_says_what_a_method_does():
    assert METHODS["admm"].kind == "slr" and METHODS["admm"].takes_rank and METHODS["admm"].takes_sparsity
    assert METHODS["joint"].group and METHODS["joint"].data_free and not METHODS["joint"].takes_sparsity
    assert METHODS["sparsegpt"].kind == "sparse" and not METHODS["sparsegpt"].takes_rank
    assert {n for n, m in METHODS.items() if m.bits} == {"gptq", "rtn", "sparsegpt", "wanda", "magnitude", "prune+lr",
                                                          "admm"}
    assert {n for n, m in METHODS.items() if m.needs_bits} == {"gptq", "rtn"} and METHODS["rtn"].data_free
    # the spec follows the kind: rank-only methods keep no sparse part, a budget stands in for their rank
    assert CompressConfig(method="lowrank", rank=8).layer_spec().sparsity == 1.0
    assert CompressConfig(method="svd", alloc=AllocConfig(budget=0.5)).layer_spec().rank == 1
    with pytest.raises(SLRError, match="rank-only and needs a rank or a budget"):
        CompressConfig(method="svd")
    with pytest.raises(SLRError, match="sparsegpt has no low-rank part"):
        CompressConfig(method="sparsegpt", rank=8)
    with pytest.raises(SLRError, match="lowrank keeps no sparse part"):
        CompressConfig(method="lowrank", rank=8, pattern="2:4")


def test_config_round_trips_through_dict():
    cfg = CompressConfig(method="admm", pattern="2:4", rank=8, solver={"max_iters": 7},
                         alloc=AllocConfig("cap", budget=0.5, options={"span": 0.2}), refine=RefineConfig(epochs=3))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CompressConfig.from_dict(d) == cfg
    assert cfg.solver.max_iters == 7 and cfg.alloc.options.span == 0.2
