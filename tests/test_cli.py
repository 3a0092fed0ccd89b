"""The `slr` command line, in process (slr.cli.main): bad input exits 2 with one line on stderr and leaves no
partial output; help and `slr models`; and one end-to-end compress -> eval -> export -> generate on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from slr.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit is turned into its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def message_lines(err: str) -> list[str]:
    """stderr without progress bars (e.g. the one-time GGUF dequantization on a fresh cache) and without the
    memory estimate a compression prints before it starts."""
    return [ln for ln in err.strip().splitlines() if ln.strip() and "%|" not in ln
            and not ln.startswith("slr: estimated peak memory")]


def assert_one_line_error(code: int, err: str, *needles: str):
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("slr: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def assert_no_output(tmp_path, out):
    assert not out.exists(), f"{out} was left behind"
    leftovers = [p.name for p in tmp_path.rglob("*") if ".slr-tmp-" in p.name or ".tmp-" in p.name]
    assert not leftovers, leftovers


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Fast CLI tests never write into the user's cache (a GGUF is materialized into $SLR_CACHE/models)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLR_CACHE", str(cache))
    return cache


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(words(1600, seed=0))
    return p


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for s in range(0, n, 16):
        lines.append(" ".join(f"w{rng.randrange(100)}" for _ in range(min(16, n - s))))
    return "\n".join(lines) + "\n"


# ---- help and listing -----------------------------------------------------------------------------------------


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("models", "eval", "compress", "export", "generate"):
        assert cmd in out


def test_compress_help(capsys):
    code, out, _ = run(capsys, "compress", "--help")
    assert code == 0
    for opt in ("--method", "--pattern", "--sparsity", "--rank", "--out", "--calib-samples", "--windows"):
        assert opt in out
    assert "sparsegpt" in out and "wanda" in out


def test_eval_help(capsys):
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "--windows" in out and "--text" in out


def test_models(capsys, private_cache):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "smollm2-135m" in out and "gemma3-270m" in out
    assert str(private_cache) in out


def test_no_command(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err


# ---- bad input: one line, exit 2, nothing left behind ---------------------------------------------------------


def bad_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(random.Random(0).randrange(256) for _ in range(4000)))
    return p


def no_config_folder(tmp_path):
    p = tmp_path / "hf"
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"not really")
    return p


MODEL_ERRORS = {
    "unknown-name": (lambda tmp: "no-such-model-xyz", ["unknown model 'no-such-model-xyz'"]),
    "missing-gguf": (lambda tmp: tmp / "missing.gguf", ["GGUF file not found", "missing.gguf"]),
    "corrupt-gguf": (bad_gguf, ["cannot read GGUF bad.gguf"]),
    "no-config": (no_config_folder, ["has no config.json"]),
}


@pytest.mark.parametrize("case", list(MODEL_ERRORS))
def test_eval_bad_model(capsys, tmp_path, private_cache, text_file, case):
    make, needles = MODEL_ERRORS[case]
    js = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", make(tmp_path), "--text", text_file, "--json", js, "--device", "cpu")
    assert_one_line_error(code, err, *needles)
    assert not js.exists()
    assert_no_output(tmp_path, js)
    models = private_cache / "models"
    assert not models.exists() or not any(models.iterdir()), list(models.iterdir())  # no half-materialized GGUF


@pytest.mark.parametrize("case", list(MODEL_ERRORS))
def test_compress_bad_model(capsys, tmp_path, private_cache, text_file, case):
    make, needles = MODEL_ERRORS[case]
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "compress", make(tmp_path), "--method", "wanda", "--pattern", "2:4", "--out", out_dir,
                       "--text", text_file, "--calib-text", text_file, "--device", "cpu")
    assert_one_line_error(code, err, *needles)
    assert_no_output(tmp_path, out_dir)


SPEC_ERRORS = {
    "sparsity-1.5": (["--sparsity", "1.5"], ["sparsity 1.5", "outside"]),
    "sparsity-0": (["--sparsity", "0"], ["sparsity 0.0", "outside"]),
    "sparsity-negative": (["--sparsity", "-0.2"], ["outside"]),
    "pattern-4:4": (["--pattern", "4:4"], ["4:4", "invalid"]),
    "pattern-garbage": (["--pattern", "two:four"], ["cannot parse N:M pattern 'two:four'"]),
    "rank-negative": (["--rank", "-3"], ["rank -3"]),
    "windows-0": (["--pattern", "2:4", "--windows", "0"], ["--windows 0 is invalid"]),
    "windows-text": (["--pattern", "2:4", "--windows", "many"], ["--windows 'many'"]),
    "unknown-method": (["--method", "nosuch", "--pattern", "2:4"], ["unknown method 'nosuch'"]),
    "calib-negative": (["--calib-samples", "-1"], ["--calib-samples -1"]),
    "bad-opt": (["--opt", "max_iters"], ["--opt 'max_iters'"]),
    "rank-only-no-rank": (["--method", "joint"], ["joint is rank-only", "--budget"]),
}


@pytest.mark.parametrize("case", list(SPEC_ERRORS))
def test_compress_bad_spec(capsys, tmp_path, private_cache, text_file, case):
    # the default model name: these are all rejected before any model is loaded (or materialized)
    args, needles = SPEC_ERRORS[case]
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "compress", "smollm2-135m", *args, "--out", out_dir, "--text", text_file,
                       "--calib-text", text_file, "--device", "cpu")
    assert_one_line_error(code, err, *needles)
    assert_no_output(tmp_path, out_dir)
    assert not (private_cache / "models").exists()


def test_compress_sparsity_and_pattern_exclusive(capsys, tmp_path):
    code, _, err = run(capsys, "compress", "smollm2-135m", "--sparsity", "0.5", "--pattern", "2:4",
                       "--out", tmp_path / "out")
    assert code == 2 and "not allowed with argument" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("windows", ["0", "-2", "x"])
def test_eval_bad_windows(capsys, tmp_path, private_cache, text_file, windows):
    code, _, err = run(capsys, "eval", "smollm2-135m", "--windows", windows, "--text", text_file)
    assert_one_line_error(code, err, "--windows")
    assert not (private_cache / "models").exists()  # rejected before the model is touched


@pytest.mark.parametrize("content", [b"", b"  \n\t\n", b"\xff\xfe bad"], ids=["empty", "whitespace", "not-utf8"])
def test_eval_bad_text(capsys, tmp_path, private_cache, content):
    # run_eval reads the text before loading the model, so this fails fast and never materializes a model
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    code, _, err = run(capsys, "eval", "smollm2-135m", "--text", p)
    assert_one_line_error(code, err, "empty.txt")
    assert not (private_cache / "models").exists()


def test_eval_missing_text(capsys, tmp_path, private_cache):
    code, _, err = run(capsys, "eval", "smollm2-135m", "--text", tmp_path / "nope.txt")
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize("which", ["--text", "--calib-text"])
def test_compress_empty_text(capsys, tmp_path, private_cache, text_file, which):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out_dir = tmp_path / "out"
    other = "--calib-text" if which == "--text" else "--text"
    code, _, err = run(capsys, "compress", "smollm2-135m", "--pattern", "2:4", which, empty, other, text_file,
                       "--out", out_dir)
    assert_one_line_error(code, err, "empty")
    assert_no_output(tmp_path, out_dir)
    assert not (private_cache / "models").exists()


def test_compress_refuses_non_empty_out(capsys, tmp_path, private_cache, text_file):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", "smollm2-135m", "--pattern", "2:4", "--out", out_dir,
                       "--text", text_file, "--calib-text", text_file)
    assert_one_line_error(code, err, "not empty", "--overwrite")
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]


def test_eval_device_cuda_without_cuda(capsys, tmp_path, text_file):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run(capsys, "eval", "smollm2-135m", "--device", "cuda", "--text", text_file)
    assert_one_line_error(code, err, "no CUDA device")


@pytest.mark.slow
def test_compress_pattern_not_dividing_width(capsys, tmp_path, text_file):
    """2:5 is a valid pattern, but 5 does not divide SmolLM2's widths (576, 1536): found after loading the model
    (real cache), before any calibration, and nothing is written."""
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "compress", "smollm2-135m", "--pattern", "2:5", "--out", out_dir, "--text", text_file,
                       "--calib-text", text_file, "--device", "cpu")
    assert_one_line_error(code, err, "2:5", "does not divide")
    assert_no_output(tmp_path, out_dir)


# ---- end to end on a tiny random HF folder --------------------------------------------------------------------


def make_hf_folder(path):
    """save_pretrained of the tiny LLaMA plus a word-level tokenizer over w0..w99 (ids 3..102 < vocab 128)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from slr.models.tiny import tiny_model

    model = tiny_model("llama")
    model.config.max_position_embeddings = 1024  # protocol windows are 512 tokens
    model.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": 3 + i for i in range(100)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return model


def test_end_to_end_tiny_folder(capsys, tmp_path, private_cache, text_file):
    import transformers as T

    from slr import load

    src = tmp_path / "tiny-llama"
    make_hf_folder(src)
    out_dir = tmp_path / "art"
    code, out, err = run(capsys, "compress", src, "--method", "wanda", "--pattern", "2:4", "--calib-samples", 4,
                         "--text", text_file, "--calib-text", text_file, "--windows", 2, "--out", out_dir,
                         "--device", "cpu", "--batch-size", 2)
    assert code == 0, err
    assert "retained fraction" in out and "0.5000" in out
    res = json.loads((out_dir / "results.json").read_text())
    assert res["retained_fraction"] == 0.5
    assert res["method"] == "wanda" and res["spec"] == "2:4"
    assert res["calibration"]["samples"] == 4 and res["calibration"]["text"] == f"file:{text_file}"
    assert len(res["matrices"]) == 2 * 7
    for m in res["matrices"]:
        assert m["spec"] == "2:4" and m["kept"] * 2 == m["shape"][0] * m["shape"][1] and m["rank"] == 0
        assert 0 < m["rel_error"] < 1
    assert res["ppl"]["windows"] == 2 and res["dense_ppl"]["windows"] == 2
    assert res["ppl"]["ppl"] > 0 and res["dense_ppl"]["ppl"] > 0
    assert (out_dir / "slr_config.json").is_file() and (out_dir / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left

    # eval of the artifact reproduces the compressed perplexity recorded by compress
    js = tmp_path / "eval.json"
    code, out, err = run(capsys, "eval", out_dir, "--text", text_file, "--windows", 2, "--json", js, "--device", "cpu")
    assert code == 0, err
    ev = json.loads(js.read_text())
    assert ev["windows"] == 2 and ev["tokens"] == 2 * 511
    assert ev["ppl"] == pytest.approx(res["ppl"]["ppl"], rel=2e-3)  # fp16 storage of the values
    assert "ppl" in out

    # export to a plain dense folder that transformers loads; same logits as the artifact
    dense_dir = tmp_path / "dense"
    code, out, err = run(capsys, "export", out_dir, "--dense", dense_dir)
    assert code == 0, err
    assert "wrote dense HF folder" in out
    dense = T.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    art, _ = load(out_dir)
    ids = torch.randint(3, 103, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, art(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    code, _, err = run(capsys, "export", out_dir, "--dense", dense_dir)  # exists -> refuses, one line
    assert_one_line_error(code, err, "not empty")

    # generate from the artifact and from the exported folder: same greedy continuation
    code, gen_art, err = run(capsys, "generate", out_dir, "w1 w2 w3", "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0, err
    code, gen_dense, err = run(capsys, "generate", dense_dir, "w1 w2 w3", "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0, err
    assert gen_art.strip().startswith("w1 w2 w3") and gen_art == gen_dense
    assert 3 < len(gen_art.split()) <= 3 + 5  # special tokens (unk/bos/eos) are not printed; eos stops early

    # compressing into the existing artifact again needs --overwrite
    code, _, err = run(capsys, "compress", src, "--method", "magnitude", "--pattern", "2:4", "--calib-samples", 0,
                       "--no-eval", "--calib-text", text_file, "--out", out_dir, "--device", "cpu")
    assert_one_line_error(code, err, "not empty")
    assert json.loads((out_dir / "results.json").read_text())["method"] == "wanda"  # untouched


def test_joint_budget_end_to_end(capsys, tmp_path, private_cache, text_file):
    """`--method joint --budget F` (data-free, no --rank): one shared rank per group, artifact reloads."""
    src = tmp_path / "tiny-llama"
    make_hf_folder(src)
    out_dir = tmp_path / "art"
    code, out, err = run(capsys, "compress", src, "--method", "joint", "--budget", "0.5", "--text", text_file,
                         "--windows", 2, "--out", out_dir, "--device", "cpu", "--batch-size", 2)
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    assert 0.45 < res["retained_fraction"] <= 0.5 and res["rel_error_metric"] == "frobenius"
    assert res["calibration"]["samples"] == 128  # recorded, but never read by a data-free method
    ranks = {m["name"]: m["rank"] for m in res["matrices"] if m["block"] == 0}
    assert ranks["self_attn.q_proj"] == ranks["self_attn.k_proj"] == ranks["self_attn.v_proj"]
    assert ranks["mlp.gate_proj"] == ranks["mlp.up_proj"]
    js = tmp_path / "eval.json"
    code, out, err = run(capsys, "eval", out_dir, "--text", text_file, "--windows", 2, "--json", js, "--device", "cpu")
    assert code == 0, err
    assert json.loads(js.read_text())["ppl"] == pytest.approx(res["ppl"]["ppl"], rel=2e-3)
