"""slr.runtime, the plain-PyTorch decoder: for each family it runs, a compressed artifact (packed and unpacked) and a
dense HF folder give transformers' logits at prefill and at every cached decode step, and the same greedy tokens;
loading and generating import no transformers; other families are refused in one line; ``slr generate --runtime``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import slr
from slr import csrc, io, runtime
from slr.errors import SLRError
from slr.models.tiny import tiny_model

GEN = torch.Generator().manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _artifact(tmp_path, family: str, name: str = "art"):
    model = tiny_model(family)
    calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = slr.CompressConfig(method="prune+lr", bits=4, group_size=32, rank=4, factor_bits=8)
    slr.compress_(model, cfg, calib, progress=False)
    io.save(model, tmp_path / name, embed_bits=8)
    return tmp_path / name


def _same_as_hf(got: runtime.CausalLM, ref) -> None:
    seq = torch.randint(3, 120, (2, 9), generator=GEN)
    with torch.no_grad():
        cache = got.new_cache(2, 12)
        assert rel(got(seq[:, :6], cache, last_only=False), ref(seq[:, :6]).logits) < 1e-5  # prefill
        for t in range(6, 9):  # decode steps against the cache, one token each
            assert rel(got(seq[:, t:t + 1], cache), ref(seq[:, :t + 1]).logits[:, -1:]) < 1e-5
        assert cache.length == 9
        chunk = got.new_cache(2, 12)  # a chunk after cached tokens (its causal mask)
        got(seq[:, :4], chunk)
        assert rel(got(seq[:, 4:9], chunk, last_only=False), ref(seq).logits[:, 4:]) < 1e-5
    ids = seq[:1, :4]
    want = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got.generate(ids, 6), want)


@pytest.mark.parametrize("family", runtime.FAMILIES)
@pytest.mark.parametrize("packed", [True, False])
def test_artifact_gives_transformers_logits(tmp_path, family, packed):
    if packed and csrc.load() is None:
        pytest.skip(f"slr's C++ kernels are unavailable: {csrc.reason()}")
    art = _artifact(tmp_path, family)
    ref, _ = io.load(art, packed=False)
    got, tok = runtime.load(art, packed=packed)
    assert tok is None  # the tiny artifact has no tokenizer
    assert sum(type(m).__name__ == "PackedLinear" for m in got.modules()) == (14 if packed else 0)
    _same_as_hf(got, ref)


def test_dense_folder_gives_transformers_logits(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "dense")
    got, _ = runtime.load(tmp_path / "dense")
    _same_as_hf(got, model)


@pytest.mark.slow
def test_smollm2_dense_and_tied_head(smol):
    """The real default model (a tied head; rope_parameters of transformers 5): logits and greedy tokens."""
    from slr.models import resolve

    got, tok = runtime.load(resolve("smollm2-135m")[0])
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    ids = tok.encode("The history of the city")
    ref = smol[0]
    with torch.no_grad():
        assert rel(got(ids, got.new_cache(1, ids.shape[1]), last_only=False), ref(ids).logits) < 1e-5
    want = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got.generate(ids, 8), want)
    assert tok.decode(want[0]) == smol[1].decode(want[0], skip_special_tokens=True)


def test_eos_stops_generation(tmp_path):
    art = _artifact(tmp_path, "llama")
    got, _ = runtime.load(art)
    ids = torch.randint(3, 120, (1, 4), generator=GEN)
    first = int(got.generate(ids, 1)[0, -1])
    out = got.generate(ids, 8, eos_token_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_sliding_window_layers_match_transformers(tmp_path, family):
    """Sequences longer than the window: the prefill's banded mask and the decode steps' last-window keys (Gemma 3
    mixes sliding and full layers, each with its own rope base; mistral slides on every layer)."""
    import transformers as T

    from slr.models.tiny import tiny_config

    cfg = tiny_config(family)
    cfg.sliding_window = 8
    if family == "gemma3_text":
        cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(tmp_path / "m")
    got, _ = runtime.load(tmp_path / "m")
    assert [b.self_attn.window for b in got.model.layers] == ([8, None] if family == "gemma3_text" else [8, 8])
    seq = torch.randint(3, 120, (1, 24), generator=GEN)
    with torch.no_grad():
        want = model(seq).logits
        cache = got.new_cache(1, 24)
        assert rel(got(seq[:, :14], cache, last_only=False), want[:, :14]) < 1e-5
        for t in range(14, 24):
            assert rel(got(seq[:, t:t + 1], cache), want[:, t:t + 1]) < 1e-5


def test_other_families_are_refused(tmp_path):
    model = tiny_model("phi3")
    model.save_pretrained(tmp_path / "phi3")
    with pytest.raises(SLRError, match="model_type 'phi3'"):
        runtime.load(tmp_path / "phi3")
    assert "rope type 'linear'" in runtime.unsupported(
        {"model_type": "llama", "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}})
    assert "final_logit_softcapping" in runtime.unsupported({"model_type": "gemma3_text",
                                                            "final_logit_softcapping": 30.0})


def test_no_transformers_import(tmp_path):
    """The point of the runtime: loading and generating never import transformers (or torch._dynamo)."""
    art = _artifact(tmp_path, "llama")
    code = ("import sys, torch; from slr import runtime; m, _ = runtime.load(sys.argv[1]); "
            "m.generate(torch.tensor([[5, 6, 7]]), 3); "
            "bad = [k for k in ('transformers', 'torch._dynamo', 'sympy', 'accelerate') if k in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_generate_runtimes_agree(tmp_path, capsys):
    from test_cli import make_hf_folder

    from slr.cli import main

    src = tmp_path / "tiny"
    model = make_hf_folder(src)
    calib = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    slr.compress_(model, slr.CompressConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    import transformers as T

    io.save(model, tmp_path / "art", tokenizer=T.AutoTokenizer.from_pretrained(src), embed_bits=8)
    texts = {}
    for rt in ("slr", "hf"):
        assert main(["generate", str(tmp_path / "art"), "w1 w2 w3", "--max-new-tokens", "5", "--runtime", rt]) == 0
        texts[rt] = capsys.readouterr().out
    assert texts["slr"] == texts["hf"] and texts["slr"].strip()
    assert main(["generate", str(tmp_path / "art"), "w1", "--runtime", "slr", "--device", "meta"]) == 2
