"""benchmarks/inference.py: the per-(model, strategy) measurement on a tiny llama, the report and the CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from slr import io
from slr.config import LayerSpec
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.nn import compress_block_
from slr.solvers.base import SolveResult
from slr.solvers.magnitude import magnitude

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("slr_bench_inference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _result(W: torch.Tensor, r: int = 4) -> SolveResult:
    s = magnitude(W, None, LayerSpec(nm=(2, 4), rank=r))
    U, sv, Vh = torch.linalg.svd(W - s.S, full_matrices=False)
    return SolveResult(S=s.S, mask=s.mask, U=U[:, :r] * sv[:r], V=Vh[:r].contiguous())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dense HF folder, artifact folder) of one random tiny llama: every block linear 2:4 + rank 4."""
    root = tmp_path_factory.mktemp("inf")
    model = tiny_model("llama")
    model.save_pretrained(root / "dense")
    ad = get_adapter(model)
    for block in ad.blocks(model):
        compress_block_(block, ad, {n: _result(lin.weight.detach()) for n, lin in ad.linears(block).items()})
    io.save(model, root / "art")
    return root / "dense", root / "art"


IDS = list(range(3, 19)) * 2  # 32 ids < vocab 128


@pytest.mark.parametrize("strategy", ["auto", "sparse", "dense-onthefly", "dense-cached", "slr-runtime"])
def test_measure_artifact(bench, tiny, strategy):
    rec = bench.measure({"kind": "artifact", "path": str(tiny[1]), "label": "t"}, strategy, IDS, prefill=16,
                        decode=4, decode_prompt=8, repeats=1, threads=1)
    assert rec["strategy"] == strategy and rec["kind"] == "artifact" and rec["threads"] == 1
    for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "peak_rss_load_mib", "peak_rss_end_mib",
              "load_s", "model_mem_mib"):
        assert rec[k] > 0, k
    assert rec["peak_rss_end_mib"] >= rec["peak_rss_load_mib"]
    assert rec["slr_layers"] == 14
    b = rec["bytes"]
    for k in ("compressed_layers", "compressed_layers_theory", "compressed_layers_dense", "dense_remainder", "total"):
        assert b[k] > 0, k
    assert b["compressed_layers_dense_fp16"] == 2 * b["compressed_layers_params"]
    assert b["ratio_vs_theory"] == pytest.approx(b["compressed_layers"] / b["compressed_layers_theory"])
    assert 0 < b["ratio_vs_dense_fp16"] < 1.5
    json.dumps(rec)  # the child sends it as JSON


def test_measure_dense_and_report(bench, tiny):
    target = {"kind": "dense", "path": str(tiny[0]), "label": "dense"}
    dense = bench.measure(target, None, IDS, prefill=16, decode=4, decode_prompt=8, repeats=1, threads=1)
    assert dense["strategy"] == "dense" and dense["prefill_tok_s"] > 0 and dense["decode_tok_s"] > 0
    n = sum(lin.weight.numel() for b in range(2) for lin in get_adapter(tiny_model("llama")).linears(
        tiny_model("llama").model.layers[b]).values())
    assert dense["bytes"] == {"layers_params": n, "layers_fp32": 4 * n, "layers_fp16": 2 * n}
    own = bench.measure(target, "slr-runtime", IDS, prefill=16, decode=4, decode_prompt=8, repeats=1, threads=1)
    assert own["strategy"] == "slr-runtime" and own["kind"] == "dense" and own["bytes"] == dense["bytes"]
    art = bench.measure({"kind": "artifact", "path": str(tiny[1]), "label": "nm24r4"}, "auto", IDS, prefill=16,
                        decode=4, decode_prompt=8, repeats=1, threads=1)
    failed = {"label": "nm24r4", "kind": "artifact", "model": "x", "strategy": "sparse", "error": "boom"}
    records = [own, dense, art, failed]
    bench.add_ratios(records)  # the transformers dense row is the baseline, wherever it sits
    assert own["decode_vs_dense"] == pytest.approx(own["decode_tok_s"] / dense["decode_tok_s"])
    assert dense["decode_vs_dense"] == 1.0 and art["decode_vs_dense"] > 0 and failed["decode_vs_dense"] is None
    args = bench.parse_args(["--prefill", "16", "--decode", "4"])
    machine = {"date": "d", "git_commit": "c", "cpu": "cpu", "cpu_count": 2, "torch": "t", "loadavg_start": [0.0]}
    md = bench.markdown(records, machine, args)
    assert md.count("\n| ") == 5  # header + 4 rows
    assert "nm24r4 | auto" in md and "error: boom" in md and "Failed runs: nm24r4/sparse" in md
    assert "## Observations" in md and "decodes" in md


def test_parse_args_labels(bench):
    a = bench.parse_args(["--artifact", "x/a", "--label", "A", "--artifact", "y/b", "--strategies", "auto,sparse"])
    assert [(t["path"], t["label"]) for t in a.artifacts] == [("x/a", "A"), ("y/b", "b")]
    assert a.strategies == ["auto", "sparse"] and a.threads == 2 and a.prefill == 512 and a.decode == 128
    assert bench.parse_args([]).artifacts == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--label", "A"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--strategies", "fast"])


def test_best_of_rounds(bench):
    """--rounds: a row keeps its fastest decode's record and its fastest prefill; a failed round is skipped."""
    recs = [{"decode_tok_s": 10.0, "prefill_tok_s": 90.0, "peak_rss_end_mib": 1},
            {"error": "killed"}, {"decode_tok_s": 12.0, "prefill_tok_s": 80.0, "peak_rss_end_mib": 2}]
    best = bench.best_of_rounds(recs)
    assert (best["decode_tok_s"], best["prefill_tok_s"], best["peak_rss_end_mib"]) == (12.0, 90.0, 2)
    assert [r["decode_tok_s"] for r in best["rounds"]] == [10.0, None, 12.0]
    assert bench.best_of_rounds([{"error": "a"}]) == {"error": "a"}
    assert "rounds" not in bench.best_of_rounds(recs[:1])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_cli_end_to_end(bench, tiny, tmp_path):
    """The parent spawns one fresh child per (model, strategy) and writes JSON + markdown (one child: time)."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(IDS))
    out_json, out_md = tmp_path / "inf.json", tmp_path / "inf.md"
    records = bench.main(["--dense", "none", "--artifact", str(tiny[1]), "--label", "nm24r4", "--strategies",
                          "sparse", "--prefill", "16", "--decode", "4", "--decode-prompt", "8", "--repeats", "1",
                          "--rounds", "2", "--threads", "1", "--ids-file", str(ids), "--out-json", str(out_json),
                          "--out-md", str(out_md)])
    assert [(r["label"], r["strategy"]) for r in records] == [("nm24r4", "sparse")]
    saved = json.loads(out_json.read_text())
    for r in saved:
        assert "error" not in r, r.get("error")
        assert r["threads"] == 1 and r["machine"]["threads"] == 1 and r["machine"]["cpu_count"] >= 1
        assert "torch" in r["machine"] and "git_commit" in r["machine"]
        # a fresh child: the peak after importing torch is far below the parent's and the peaks only grow
        assert 0 < r["peak_rss_baseline_mib"] <= r["peak_rss_load_mib"] <= r["peak_rss_end_mib"]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert len(saved[0]["rounds"]) == 2 and "2 times, the rows taking turns" in out_md.read_text()
    assert "nm24r4 | sparse" in out_md.read_text()


def test_decode_profile_runtime_matches_transformers(bench, tiny):
    """benchmarks/decode_profile.py in slr.runtime and in transformers: the same greedy tokens, every bucket timed."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("slr_bench_decode_profile", SCRIPT.parent / "decode_profile.py")
        prof = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prof)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    target = {"kind": "artifact", "path": str(tiny[1]), "label": "t"}
    recs = [prof.measure(target, s, IDS, prompt=8, steps=4, repeats=1, threads=1) for s in ("auto", "slr-runtime")]
    assert [r["strategy"] for r in recs] == ["auto", "slr-runtime"]
    assert recs[0]["generated_ids"] == recs[1]["generated_ids"] and all(r["tokens_match"] for r in recs)
    assert all(recs[1]["buckets_ms"][k] is not None for k in ("linears", "head", "attention_core"))
