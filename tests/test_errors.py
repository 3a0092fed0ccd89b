"""Bad input across the CLI and the Python API (the cases of docs/errors.md): each one gives exactly one line
`slr: error: <problem> -- fix: <fix>` and exit code 2 (an interrupt: one line and 130), or one single-line SLRError,
and leaves no partial output behind: no output dir/file, no staging dir, no `.slr-tmp-*` / `.tmp-*` leftovers.

Everything runs on the tiny random LLaMA folder of test_cli (two blocks, width 64) or is rejected before any model is
loaded, so the whole file takes well under a minute."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import assert_no_output, assert_one_line_error, make_hf_folder, message_lines, run, words

from slr import io
from slr.cli import main
from slr.errors import SLRError

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

FAST = ["--calib-samples", 2, "--no-eval", "--device", "cpu", "--batch-size", 2]  # tiny and quick


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Never touch the user's cache; a default model name must not be materialized by a rejected command."""
    c = tmp_path / "cache"
    monkeypatch.setenv("SLR_CACHE", str(c))
    return c


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(tiny HF folder, 1600-word corpus, 3-word corpus, artifact of the tiny folder), built once per module."""
    root = tmp_path_factory.mktemp("assets")
    src = root / "tiny-llama"
    make_hf_folder(src)
    corpus = root / "corpus.txt"
    corpus.write_text(words(1600, seed=0))
    short = root / "short.txt"
    short.write_text("w1 w2 w3\n")
    art = root / "art"
    code = main(["compress", str(src), "--method", "magnitude", "--pattern", "2:4", "--calib-samples", "0", "--no-eval",
                 "--calib-text", str(corpus), "--out", str(art), "--device", "cpu"])
    assert code == 0 and (art / io.MANIFEST).is_file()
    return src, corpus, short, art


def assert_nothing_written(tmp_path: Path, out: Path):
    """assert_no_output, and no staging/checkpoint folder or write probe either (for checks before any work)."""
    assert_no_output(tmp_path, out)
    extra = [p.name for p in tmp_path.rglob("*") if p.name.startswith((".slr-partial-", ".slr-probe-"))]
    assert not extra, extra


def one_line_api_error(e: pytest.ExceptionInfo, *needles: str):
    msg = str(e.value)
    assert "\n" not in msg and " -- fix: " in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# ---- the source model (compress) ------------------------------------------------------------------------------


def _copy(src, tmp):
    dst = tmp / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(src, tmp, edit):
    from safetensors.torch import load_file, save_file

    dst = _copy(src, tmp)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _empty(src, tmp):
    (tmp / "model").mkdir()
    return tmp / "model"


def _config(text):
    def make(src, tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text(text)
        return tmp / "model"

    return make


def _bert(src, tmp):
    import transformers as T

    cfg = T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    T.BertModel(cfg).save_pretrained(tmp / "model")
    return tmp / "model"


def _truncate(src, tmp):
    dst = _copy(src, tmp)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:300])
    return dst


def _bad_header(src, tmp):
    dst = _copy(src, tmp)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = b"\xff" * 8  # the little-endian header length: now absurd
    f.write_bytes(bytes(data))
    return dst


def _no_weights(src, tmp):
    dst = _copy(src, tmp)
    (dst / "model.safetensors").unlink()
    return dst


def _nan_weight(sd):
    k = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    sd[k][0, 0] = float("nan")


def _inf_embedding(sd):
    sd["model.embed_tokens.weight"][:] = float("inf")  # RMSNorm(inf) = NaN: every calibration activation is NaN


SOURCE_ERRORS = {
    "empty-folder": (_empty, ["has no config.json", "not a Hugging Face model folder"]),
    "garbage-config": (_config("{not json"), ["config.json in", "is not valid JSON", "re-copy config.json"]),
    "unknown-model-type": (_config('{"model_type": "nosuchtype"}'),
                           ["has model_type 'nosuchtype', which this transformers does not know"]),
    "non-causal-bert": (_bert, ["holds a BertModel, not a causal language model", "*ForCausalLM"]),
    "non-causal-t5-config": (_config('{"model_type": "t5"}'), ["holds a t5 model, not a causal language model"]),
    "truncated-safetensors": (_truncate, ["cannot load the model", "SafetensorError", "corrupted or truncated"]),
    "corrupt-safetensors-header": (_bad_header, ["cannot load the model", "SafetensorError", "header"]),
    "missing-safetensors": (_no_weights, ["cannot load the model", "model.safetensors"]),
    "nan-weight": (lambda s, t: _edit_weights(s, t, _nan_weight),
                   ["weight 0.self_attn.q_proj contains NaN or Inf values", "check the model weights"]),
    "inf-embedding-nan-H": (lambda s, t: _edit_weights(s, t, _inf_embedding),
                            ["calibration statistics (H) of block 0", "contains NaN or Inf values"]),
}


@pytest.mark.parametrize("case", list(SOURCE_ERRORS))
def test_compress_bad_source(capsys, tmp_path, assets, case):
    src, corpus, _, _ = assets
    make, needles = SOURCE_ERRORS[case]
    model = make(src, tmp_path)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", model, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, *needles)
    assert_nothing_written(tmp_path, out)  # also no checkpoint folder when a block fails on bad input


def test_compress_artifact_as_source(capsys, tmp_path, assets):
    _, corpus, _, art = assets
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", art, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, f"{art} is an slr artifact, not a source model", "compress the original")
    assert_nothing_written(tmp_path, out)


def test_failed_compression_leaves_no_checkpoints(capsys, tmp_path, assets):
    src, corpus, _, _ = assets
    model = _edit_weights(src, tmp_path, _nan_weight)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", model, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, "contains NaN or Inf values")
    assert_nothing_written(tmp_path, out)


# ---- the compression spec: rejected before the model is loaded ------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")

SPEC_ERRORS = {
    "budget-0": (["--allocate", "knapsack", "--budget", "0"], ["budget 0.0 is outside (0, 1)", "--budget 0.5"]),
    "budget-1.5": (["--allocate", "knapsack", "--budget", "1.5"], ["budget 1.5 is outside (0, 1)"]),
    "budget-nan": (["--allocate", "knapsack", "--budget", "nan"], ["budget nan is outside (0, 1)"]),
    "budget-negative": (["--budget", "-0.3"], ["budget -0.3 is outside (0, 1)"]),
    "sparsity-nan": (["--sparsity", "nan"], ["sparsity nan is outside (0, 1)", "--sparsity 0.5"]),
    "pattern-2-4": (["--pattern", "2-4"], ["cannot parse N:M pattern '2-4'", "--pattern 2:4"]),
    "pattern-5:4": (["--pattern", "5:4"], ["N:M pattern 5:4 is invalid (need 0 <= N < M)"]),
    "opt-unknown-key": (["--method", "admm", "--rank", "4", "--opt", "max_iter=10"],
                        ["--opt max_iter=10 is not an option of the admm solver", "max_iters"]),
    "opt-wrong-type": (["--method", "admm", "--rank", "4", "--opt", "max_iters=many"],
                       ["--opt max_iters=many does not fit the admm solver's option max_iters", "max_iters=400"]),
    "alloc-opt-unknown-key": (["--allocate", "knapsack", "--budget", "0.5", "--alloc-opt", "sample=3"],
                              ["--alloc-opt sample=3 is not an option of the knapsack allocator", "samples"]),
    "alloc-opt-wrong-type": (["--allocate", "cap", "--budget", "0.5", "--alloc-opt", "steps=0.5"],
                             ["--alloc-opt steps=0.5 does not fit the cap allocator's option steps"]),
    "alloc-opt-knapsack-metric": (["--allocate", "knapsack", "--budget", "0.5", "--alloc-opt", "metric=full"],
                                  ["unknown knapsack metric 'full'", "metric=whitened"]),
    "alloc-opt-knapsack-span": (["--allocate", "knapsack", "--budget", "0.5", "--alloc-opt", "span=1.5"],
                                ["knapsack span 1.5 is not in (0, 1]", "span=0.1"]),
    "alloc-opt-cap-span": (["--allocate", "cap", "--budget", "0.5", "--alloc-opt", "span=0"],
                           ["CAP span 0 is not in (0, 1]", "span=1 turns it off"]),
    "alloc-opt-no-equals": (["--alloc-opt", "pools"], ["--alloc-opt 'pools' is not KEY=VALUE", "pools=whitened"]),
    "tasks-unknown": (["--tasks", "nosuchtask"], ["unknown zero-shot task 'nosuchtask'", "piqa"]),
    "limit-0": (["--tasks", "piqa", "--limit", "0"], ["--limit 0 is not positive"]),
    "device-tpu": (["--device", "tpu"], ["unknown device 'tpu'", "cpu"]),
    "device-cuda-without-cuda": pytest.param(["--device", "cuda"], ["no CUDA device is available"], marks=no_cuda),
}


def _params(table: dict):
    """{id: (args, needles) | pytest.param(args, needles, marks=...)} -> parametrize values with those ids."""
    for k, v in table.items():
        yield pytest.param(*v.values, marks=v.marks, id=k) if hasattr(v, "marks") else pytest.param(*v, id=k)


@pytest.mark.parametrize("args,needles", list(_params(SPEC_ERRORS)))
def test_compress_bad_spec_before_load(capsys, tmp_path, cache, assets, args, needles):
    # the default model name: it must not even be materialized into the cache
    _, corpus, _, _ = assets
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", "smollm2-135m", "--method", "wanda", "--out", out,
                       "--calib-text", corpus, "--text", corpus, "--device", "cpu", *args)
    assert_one_line_error(code, err, *needles)
    assert_nothing_written(tmp_path, out)
    assert not (cache / "models").exists()


# ---- the compression spec: rejected once the model's shapes or the calibration text are known ------------------

LOADED_SPEC_ERRORS = {
    "pattern-not-dividing-width": (["--pattern", "2:3"], ["N:M pattern 2:3 does not divide the input width 64"]),
    "rank-above-min-dim": (["--method", "admm", "--sparsity", "0.5", "--rank", "100000"],
                           ["rank 100000 exceeds min(d_out, d_in) = 64", "--rank <= 64"]),
    "calib-text-too-short": (["--pattern", "2:4", "--calib-text", "SHORT"],
                             ["calibration text has 3 tokens", "--calib-text"]),
    "calib-text-empty": (["--pattern", "2:4", "--calib-text", "EMPTY"],
                         ["empty.txt' is empty or whitespace only", "pass a UTF-8 text file with --calib-text FILE"]),
    "alloc-opt-bad-value": (["--sparsity", "0.5", "--allocate", "cap", "--budget", "0.5",
                             "--alloc-opt", "pools=nosuch"],
                            ["unknown CAP pools 'nosuch'", "whitened"]),
    "alloc-opt-bad-mode": (["--sparsity", "0.5", "--allocate", "knapsack", "--budget", "0.5",
                            "--alloc-opt", "mode=bogus"], ["unknown allocation mode 'bogus'", "sparse, slr, rank"]),
}


@pytest.mark.parametrize("case", list(LOADED_SPEC_ERRORS))
def test_compress_bad_spec_after_load(capsys, tmp_path, assets, case):
    src, corpus, short, _ = assets
    args, needles = LOADED_SPEC_ERRORS[case]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [{"SHORT": short, "EMPTY": empty}.get(a, a) for a in args]
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--calib-text", corpus, "--out", out, *FAST,
                       *args)
    assert_one_line_error(code, err, *needles)
    assert_nothing_written(tmp_path, out)


# ---- output paths ---------------------------------------------------------------------------------------------


def test_compress_out_not_empty(capsys, tmp_path, assets):
    src, corpus, _, _ = assets
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, f"output directory {out} exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert_nothing_written(tmp_path, out)


def test_compress_out_is_a_file(capsys, tmp_path, assets):
    src, corpus, _, _ = assets
    out = tmp_path / "out"
    out.write_text("mine")
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, f"--out {out} exists and is not a directory")
    assert out.read_text() == "mine"
    out.unlink()
    assert_nothing_written(tmp_path, out)


def test_compress_out_under_a_file(capsys, tmp_path, assets):
    # works as root too (chmod does not stop root): the parent of --out is a regular file
    src, corpus, _, _ = assets
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    out = blocker / "sub" / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, f"cannot create --out {out}", f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "mine"
    assert_nothing_written(tmp_path, out)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_compress_out_unwritable(capsys, tmp_path, assets):
    # /proc refuses new entries even for root, where a chmod-based test would be skipped
    src, corpus, _, _ = assets
    out = Path("/proc/slr-test-out")
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, f"cannot create --out {out}", "/proc is not writable")
    assert not out.exists() and not list(Path("/proc").glob(".slr-*"))
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_export_existing_dir_without_overwrite(capsys, tmp_path, assets):
    _, _, _, art = assets
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "export", art, "--dense", dense)
    assert_one_line_error(code, err, f"output directory {dense} is not empty", "--overwrite")
    assert [p.name for p in dense.iterdir()] == ["keep.txt"]
    shutil.rmtree(dense)
    assert_nothing_written(tmp_path, dense)


def test_export_under_a_file(capsys, tmp_path, assets):
    _, _, _, art = assets
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    dense = blocker / "dense"
    code, _, err = run(capsys, "export", art, "--dense", dense)
    assert_one_line_error(code, err, f"cannot create the output directory {dense}", "is a file, not a directory")
    assert_nothing_written(tmp_path, dense)


def test_eval_json_under_a_file(capsys, tmp_path, assets):
    src, corpus, _, _ = assets
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    js = blocker / "r.json"
    code, _, err = run(capsys, "eval", src, "--text", corpus, "--windows", 1, "--json", js, "--device", "cpu")
    assert_one_line_error(code, err, f"cannot create --json {js}", "is a file, not a directory")
    assert_nothing_written(tmp_path, js)


# ---- full disk and Ctrl-C (simulated) ---------------------------------------------------------------------------


def _fake_save_file(exc_factory):
    """safetensors.torch.save_file that writes half an artifact shard, then fails; checkpoints are written for real."""
    import safetensors.torch as st

    real = st.save_file

    @functools.wraps(real)
    def fake(tensors, filename, metadata=None):
        if not Path(filename).name.startswith("part-"):  # only io._ShardWriter's shard files
            return real(tensors, filename, metadata=metadata)
        real(tensors, filename, metadata=metadata)
        p = Path(filename)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        raise exc_factory(filename)

    return fake


def _enospc(filename):
    return OSError(errno.ENOSPC, "No space left on device", str(filename))


def _safetensors_enospc(filename):
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # real text


def _leftover_shards(tmp_path):
    return [p for p in tmp_path.rglob("*") if p.name.startswith("part-") or p.name == "model.safetensors"]


@pytest.mark.parametrize("exc", [_enospc, _safetensors_enospc], ids=["oserror", "safetensors-error"])
def test_compress_disk_full(capsys, tmp_path, monkeypatch, assets, exc):
    import safetensors.torch as st

    src, corpus, _, _ = assets
    monkeypatch.setattr(st, "save_file", _fake_save_file(exc))
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, "no space left on device while writing", "free disk space")
    assert_no_output(tmp_path, out)
    assert not _leftover_shards(tmp_path)


def test_compress_disk_full_writing_results(capsys, tmp_path, monkeypatch, assets):
    # a write outside io.save (results.json): the CLI still prints one line, and the staging dir is removed
    import slr.api

    src, corpus, _, _ = assets

    def full(path, obj):
        Path(path).write_text("{")  # a partial file inside the staging dir
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(slr.api, "write_json_atomic", full)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, "no space left on device while writing", "results.json", "free disk space")
    assert_no_output(tmp_path, out)
    assert not _leftover_shards(tmp_path) and not list(tmp_path.rglob("results.json"))


def test_compress_disk_full_checkpointing(capsys, tmp_path, monkeypatch, assets):
    # the per-block checkpoints (slr.checkpoint) hit the full disk first; safetensors raises its own error type
    import slr.checkpoint

    src, corpus, _, _ = assets

    def full(tensors, filename, metadata=None):
        raise _safetensors_enospc(filename)

    monkeypatch.setattr(slr.checkpoint, "save_file", full)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, "no space left on device", "free disk space")
    assert_no_output(tmp_path, out)
    assert not _leftover_shards(tmp_path) and not list(tmp_path.rglob("block_*"))


def test_save_disk_full_api(tmp_path, monkeypatch):
    import safetensors.torch as st

    from slr.models.tiny import tiny_model

    monkeypatch.setattr(st, "save_file", _fake_save_file(_enospc))
    out = tmp_path / "art"
    with pytest.raises(SLRError) as e:
        io.save(tiny_model("llama"), out)
    one_line_api_error(e, f"no space left on device while writing {out}", "free disk space")
    assert_nothing_written(tmp_path, out)
    assert not _leftover_shards(tmp_path)


def assert_interrupted(code: int, err: str):
    assert code == 130, err
    lines = message_lines(err)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("slr: interrupted; no partial output was written"), lines[0]
    assert "Traceback" not in err


def _only_checkpoints(tmp_path):
    """Resume checkpoints are kept by design (--resume); nothing else of the run may be left."""
    for partial in tmp_path.glob(".slr-partial-*"):
        assert {p.name for p in partial.iterdir()} <= {"checkpoints"}, list(partial.iterdir())


def test_compress_ctrl_c_mid_compression(capsys, tmp_path, monkeypatch, assets):
    from slr.solvers import METHODS

    src, corpus, _, _ = assets
    real = METHODS["wanda"].fn
    calls = []

    @functools.wraps(real)
    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 9:  # 7 linears per block: in the middle of block 1
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setitem(METHODS, "wanda", dataclasses.replace(METHODS["wanda"], fn=interrupted))
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert len(calls) == 9
    assert_interrupted(code, err)
    assert "--resume" in err
    assert_no_output(tmp_path, out)
    _only_checkpoints(tmp_path)


def test_compress_ctrl_c_while_saving(capsys, tmp_path, monkeypatch, assets):
    import safetensors.torch as st

    src, corpus, _, _ = assets
    monkeypatch.setattr(st, "save_file", _fake_save_file(lambda f: KeyboardInterrupt()))
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_interrupted(code, err)
    assert_no_output(tmp_path, out)
    assert not _leftover_shards(tmp_path)
    _only_checkpoints(tmp_path)


def test_report_ctrl_c_has_no_resume_hint(capsys, tmp_path, monkeypatch):
    import slr.cli

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(slr.cli, "write_report", interrupted)
    code, _, err = run(capsys, "report", tmp_path, "--out", tmp_path / "r.html")
    assert_interrupted(code, err)
    assert "--resume" not in err  # `slr report --out` is not a compress run
    assert_nothing_written(tmp_path, tmp_path / "r.html")


# ---- eval ------------------------------------------------------------------------------------------------------


def _text(content: bytes | None):
    def make(tmp, assets):
        p = tmp / "my.txt"
        if content is not None:
            p.write_bytes(content)
        return p

    return make


EVAL_ERRORS = {
    "no-ppl-no-tasks": (["--no-ppl"], ["nothing to evaluate", "drop --no-ppl, or pass --tasks"]),
    "limit-0": (["--tasks", "piqa", "--limit", "0"], ["--limit 0 is not positive", "--limit N with N >= 1"]),
    "limit-negative": (["--tasks", "piqa", "--limit", "-3"], ["--limit -3 is not positive"]),
    "unknown-task": (["--tasks", "piqa,nosuchtask"], ["unknown zero-shot task 'nosuchtask'"]),
    "windows-0": (["--windows", "0"], ["--windows 0 is invalid", "--windows all"]),
    "windows-text": (["--windows", "many"], ["--windows 'many' is not a number"]),
    "text-empty": (["--text", _text(b"")], ["my.txt", "empty"]),
    "text-not-utf8": (["--text", _text(b"\xff\xfe bad")], ["my.txt", "is not valid UTF-8"]),
    "text-missing": (["--text", _text(None)], ["my.txt", "does not exist"]),
    "text-too-short": (["--text", _text(b"w1 w2 w3\n")], ["evaluation text has 3 tokens", "--text"]),
    "device-tpu": (["--device", "tpu"], ["unknown device 'tpu'"]),
    "device-cuda-without-cuda": pytest.param(["--device", "cuda"], ["no CUDA device is available"], marks=no_cuda),
}


@pytest.mark.parametrize("args,needles", list(_params(EVAL_ERRORS)))
def test_eval_bad_input(capsys, tmp_path, assets, args, needles):
    src, corpus, _, _ = assets
    args = [a(tmp_path, assets) if callable(a) else a for a in args]
    js = tmp_path / "r.json"
    code, _, err = run(capsys, "eval", src, "--text", corpus, "--windows", 1, "--json", js, "--device", "cpu", *args)
    assert_one_line_error(code, err, *needles)
    assert_nothing_written(tmp_path, js)


# ---- the artifact (export, eval, load) -------------------------------------------------------------------------


def _art_copy(art, tmp):
    dst = tmp / "a"
    shutil.copytree(art, dst)
    return dst


def _flip_byte(art, tmp):
    dst = _art_copy(art, tmp)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return dst


def _truncate_art(art, tmp):
    dst = _art_copy(art, tmp)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return dst


def _drop_file(art, tmp):
    dst = _art_copy(art, tmp)
    (dst / "model.safetensors").unlink()
    return dst


def _manifest(edit):
    def make(art, tmp):
        dst = _art_copy(art, tmp)
        m = json.loads((dst / io.MANIFEST).read_text())
        edit(m)
        (dst / io.MANIFEST).write_text(json.dumps(m))
        return dst

    return make


def _garbage_manifest(art, tmp):
    dst = _art_copy(art, tmp)
    (dst / io.MANIFEST).write_text('{"format": "slr", "format_')
    return dst


def _drop_tensor(art, tmp):
    # a consistent but incomplete artifact: one tensor removed, checksum updated
    from safetensors.torch import load_file, save_file

    dst = _art_copy(art, tmp)
    f = dst / "model.safetensors"
    sd = load_file(f)
    del sd["model.norm.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    m = json.loads((dst / io.MANIFEST).read_text())
    m["files"]["model.safetensors"] = io._sha256(f)
    (dst / io.MANIFEST).write_text(json.dumps(m))
    return dst


def _newer(m):
    m["format_version"] = io.FORMAT_VERSION + 1


ARTIFACT_ERRORS = {
    "not-an-artifact": (lambda art, tmp: _copy(art.parent / "tiny-llama", tmp),
                        ["is not an slr artifact (no slr_config.json)", "pass the folder written by slr compress"]),
    "checksum-mismatch": (_flip_byte, ["checksum mismatch in model.safetensors", "re-copy the artifact"]),
    "truncated-safetensors": (_truncate_art, ["checksum mismatch in model.safetensors: the file is corrupted"]),
    "missing-tensor-file": (_drop_file, ["artifact file model.safetensors is missing", "re-copy the complete"]),
    "missing-tensor": (_drop_tensor, ["artifact has no tensor for model.norm.weight"]),
    "newer-format-version": (_manifest(_newer), [f"artifact format version {io.FORMAT_VERSION + 1} is newer than this "
                                                 f"slr supports ({io.FORMAT_VERSION})",
                                                 "upgrade slr"]),
    "garbage-manifest": (_garbage_manifest, ["slr_config.json is unreadable"]),
}


# eval of a plain HF folder is a source-model eval, not an error: not-an-artifact is an export case only
ARTIFACT_CASES = [pytest.param(c, cmd, id=f"{c}-{cmd}") for c in ARTIFACT_ERRORS for cmd in ("export", "eval")
                  if (c, cmd) != ("not-an-artifact", "eval")]


@pytest.mark.parametrize("case,command", ARTIFACT_CASES)
def test_bad_artifact(capsys, tmp_path, assets, case, command):
    src, corpus, _, art = assets
    make, needles = ARTIFACT_ERRORS[case]
    path = make(art, tmp_path)
    out = tmp_path / ("dense" if command == "export" else "r.json")
    args = ["--dense", out] if command == "export" else ["--text", corpus, "--windows", 1, "--json", out,
                                                         "--device", "cpu"]
    code, _, err = run(capsys, command, path, *args)
    assert_one_line_error(code, err, *needles)
    assert_nothing_written(tmp_path, out)


def test_load_not_an_artifact_api(tmp_path, assets):
    src, _, _, _ = assets
    with pytest.raises(SLRError) as e:
        io.load(src)
    one_line_api_error(e, "is not an slr artifact (no slr_config.json)")
    with pytest.raises(SLRError) as e:
        io.load(tmp_path / "nope")
    one_line_api_error(e, "does not exist or is not a directory")


# ---- report ----------------------------------------------------------------------------------------------------


def test_report_without_results(capsys, tmp_path, assets):
    src, _, _, _ = assets
    html = tmp_path / "r.html"
    code, _, err = run(capsys, "report", src, "--out", html)
    assert_one_line_error(code, err, f"{src} has no results.json", "slr compress --out DIR")
    assert_nothing_written(tmp_path, html)
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "r_files").exists()


# ---- NaN / Inf through the Python API --------------------------------------------------------------------------


def _data_solvers():
    from slr.solvers import METHODS

    return sorted(n for n, m in METHODS.items() if not m.data_free)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("method", _data_solvers())
def test_solver_nonfinite_hessian_api(method, bad):
    from slr.config import LayerSpec
    from slr.solvers import get_solver

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(16, 32, generator=g), torch.randn(64, 32, generator=g)
    H = X.T @ X
    H[3, 5] = float(bad)
    with pytest.raises(SLRError) as e:
        get_solver(method)(W, H, LayerSpec(sparsity=0.5, rank=2))
    one_line_api_error(e, "Hessian (X^T X) contains NaN or Inf values", "calibration data")


@pytest.mark.parametrize("method", ["magnitude", "svd", "rpca", "joint"])
def test_data_free_solver_nonfinite_weight_api(method):
    from slr.config import LayerSpec
    from slr.solvers import method as registered

    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    W[1, 2] = float("nan")
    spec = LayerSpec(sparsity=1.0 if method in ("svd", "joint") else 0.5, rank=2)
    with pytest.raises(SLRError) as e:
        m = registered(method)
        if m.group:
            m.fn([W], None, [spec])
        else:
            m.fn(W, None, spec)
    one_line_api_error(e, "weight contains NaN or Inf values", "check the model weights")


def test_compress_nan_calibration_api():
    # calibration activations that turn NaN (here: an Inf embedding) are caught before any solver runs
    import slr
    from slr.models.tiny import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("inf")
    calib = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.named_parameters() if "layers" in n}
    with pytest.raises(SLRError) as e:
        slr.compress_(model, slr.CompressConfig(method="wanda", pattern="2:4", seqlen=16), calib, progress=False)
    one_line_api_error(e, "calibration statistics (H) of block 0", "contains NaN or Inf values")
    for n, p in model.named_parameters():  # nothing was half-compressed
        if n in before:
            assert torch.equal(p, before[n]), n


def test_compress_will_not_fit_in_memory(capsys, tmp_path, assets, monkeypatch):
    """The memory estimate printed before a run is checked against what is available ($SLR_MEMORY_LIMIT_MIB here)."""
    src, corpus, _, _ = assets
    out = tmp_path / "out"
    monkeypatch.setenv("SLR_MEMORY_LIMIT_MIB", "1")
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert_one_line_error(code, err, "of memory but only", "GiB")
    assert_nothing_written(tmp_path, out)
    monkeypatch.setenv("SLR_MEMORY_LIMIT_MIB", "100000")
    code, _, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-text", corpus,
                       "--out", out, *FAST)
    assert code == 0, err
    assert "estimated peak memory" in err
    est = json.loads((out / "results.json").read_text())["memory_estimate_mib"]
    assert est > 600  # model + one block + runtime
