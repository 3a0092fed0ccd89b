"""Layer onloading: a meta-device skeleton filled one block at a time from the safetensors shards (and activations on
disk) compresses to exactly what the in-memory pipeline gives; the CLI writes a bit-identical artifact and refuses
what onloading cannot do."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_cli import assert_no_output, assert_one_line_error, run

from slr.calibration import DiskActivations
from slr.checkpoint import BlockCheckpoints
from slr.config import CompressConfig
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.onload import skeleton
from slr.pipeline import compress_

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "opt"])
def test_onloaded_compression_matches_in_memory(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    sk, source = skeleton(tmp_path / "src")
    blocks = get_adapter(sk).blocks(sk)
    assert all(p.is_meta for b in blocks for p in b.parameters())  # nothing of the blocks is resident
    assert not any(p.is_meta for n, p in sk.named_parameters() if ".layers." not in n)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(method="admm", sparsity=0.5, rank=2, calib_samples=4, solver={"max_iters": 10})
    compress_(model, cfg, ids, progress=False, batch_size=2)
    ck = BlockCheckpoints(tmp_path / "ck", {"test": 1}, resume=False)
    report = compress_(sk, cfg, ids, progress=False, batch_size=2, onload=source, checkpoints=ck,
                       offload_activations=str(tmp_path / "act"))
    assert "onload.rebuild" in report.seconds
    assert not any(p.is_meta for p in sk.parameters())
    with torch.no_grad():
        torch.testing.assert_close(sk(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not any((tmp_path / "act").iterdir())  # the activation files are removed


def test_disk_activations_roundtrip(tmp_path):
    xs = [torch.randn(2, 3, 4) for _ in range(3)]
    d = DiskActivations.of(xs, tmp_path)
    assert len(d) == 3 and torch.equal(d[1], xs[1])
    d.map(lambda h: h * 2)
    assert [torch.equal(a, 2 * b) for a, b in zip(d, xs)] == [True] * 3
    assert len(list(d.root.iterdir())) == 3  # the old generation is gone
    d.cleanup()
    assert not d.root.exists()


ARGS = ["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "4", "--windows", "2", "--device", "cpu",
        "--batch-size", "2"]


@pytest.fixture
def setup(tiny_folder):
    return tiny_folder


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_onload_artifact_is_bit_identical(setup, tmp_path, capsys):
    src, text = setup
    common = [*ARGS, "--text", text, "--calib-text", text]
    code, _, err = run(capsys, "compress", src, *common, "--out", tmp_path / "ref")
    assert code == 0, err
    code, _, err = run(capsys, "compress", src, *common, "--out", tmp_path / "onl", "--onload", "--offload-activations")
    assert code == 0, err
    assert "with onloading" in err  # the onloading memory estimate
    assert sha(tmp_path / "ref" / "model.safetensors") == sha(tmp_path / "onl" / "model.safetensors")
    r = json.loads((tmp_path / "onl" / "results.json").read_text())
    assert r["onload"] and r["offload_activations"] and r["peak_rss_mib"] > 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert r["ppl"]["ppl"] == ref["ppl"]["ppl"]
    # the dense ppl is only read from the cache, which is keyed by the model's hash (a plain HF folder has none)
    assert "dense_ppl" in ref and "dense_ppl" not in r
    assert not list(tmp_path.glob(".slr-partial-*"))


@pytest.mark.parametrize("extra,needles", [
    (["--onload"], ["--onload keeps the compressed blocks", "--out DIR"]),
    (["--offload-activations"], ["--offload-activations keeps", "--out DIR"]),
    (["--onload", "--out", "OUT", "--allocate", "owl", "--budget", "0.5"], ["--allocate owl reads every matrix",
                                                                           "drop --onload"]),
], ids=["onload-no-out", "offload-no-out", "onload-allocator"])
def test_cli_onload_refusals(setup, tmp_path, capsys, extra, needles):
    src, text = setup
    extra = [str(tmp_path / "out") if e == "OUT" else e for e in extra]
    code, _, err = run(capsys, "compress", src, *ARGS, "--text", text, "--calib-text", text, *extra)
    assert_one_line_error(code, err, *needles)
    assert_no_output(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("family,method,spec", [("llama", "wanda", {"sparsity": 0.5}),
                                                ("opt", "admm", {"sparsity": 0.5, "rank": 2}),
                                                ("qwen2", "joint", {"rank": 2})])
def test_streamed_save_matches_in_memory_save(family, method, spec, tmp_path):
    """compress_(rebuild=False) + io.save(blocks=...) packs one block at a time and writes the same files."""
    from slr import io

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(method=method, calib_samples=4, solver={"max_iters": 10} if method == "admm" else {}, **spec)
    compress_(model, cfg, ids, progress=False, batch_size=2)
    io.save(model, tmp_path / "ref")
    sk, source = skeleton(tmp_path / "src")
    ck = BlockCheckpoints(tmp_path / "ck", {"test": 1}, resume=False)
    report = compress_(sk, cfg, ids, progress=False, batch_size=2, onload=source, checkpoints=ck, rebuild=False)
    assert report.blocks is not None and len(report.blocks) == len(get_adapter(sk).blocks(sk))
    assert all(p.is_meta for b in get_adapter(sk).blocks(sk) for p in b.parameters())  # nothing was rebuilt
    io.save(sk, tmp_path / "streamed", blocks=report.blocks)
    assert sha(tmp_path / "ref" / "model.safetensors") == sha(tmp_path / "streamed" / "model.safetensors")
    man = [json.loads((tmp_path / d / "slr_config.json").read_text()) for d in ("ref", "streamed")]
    assert [m["layers"] for m in man] == [man[0]["layers"]] * 2 and man[0]["tied"] == man[1]["tied"]
    assert man[0]["bytes"] == man[1]["bytes"]


def test_cli_onload_no_eval_streams_the_save(setup, tmp_path, capsys):
    src, text = setup
    common = [*ARGS, "--text", text, "--calib-text", text, "--no-eval"]
    code, _, err = run(capsys, "compress", src, *common, "--out", tmp_path / "ref")
    assert code == 0, err
    code, _, err = run(capsys, "compress", src, *common, "--out", tmp_path / "onl", "--onload")
    assert code == 0, err
    assert "streamed save" in err  # the estimate's final phase is the streamed save, not a rebuilt model
    assert sha(tmp_path / "ref" / "model.safetensors") == sha(tmp_path / "onl" / "model.safetensors")
    r = json.loads((tmp_path / "onl" / "results.json").read_text())
    assert "compress.onload.load" in r["seconds"] and "compress.onload.rebuild" not in r["seconds"]
    assert r["peak_rss_mib"] > 0
    assert not list(tmp_path.glob(".slr-partial-*"))
