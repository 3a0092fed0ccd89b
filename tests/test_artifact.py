"""SLRLinear execution and the saved artifact: round trips, integrity checks, packing and byte accounting."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers as T

from slr import formats, io
from slr.config import LayerSpec
from slr.errors import SLRError
from slr.models.adapters import get_adapter
from slr.models.tiny import FAMILIES, tiny_model
from slr.nn import STRATEGIES, SharedProjection, SLRLinear, compress_block_
from slr.solvers.base import SolveResult
from slr.solvers.magnitude import magnitude
from slr.solvers.masks import nm_mask, rowwise_mask

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
R = 4


def _svd_result(W: torch.Tensor, spec: LayerSpec, r: int = R) -> SolveResult:
    s = magnitude(W, None, spec)
    U, sv, Vh = torch.linalg.svd(W - s.S, full_matrices=False)
    return SolveResult(S=s.S, mask=s.mask, U=U[:, :r] * sv[:r], V=Vh[:r].contiguous())


def _shared_results(Ws: list[torch.Tensor], spec: LayerSpec, r: int = R) -> list[SolveResult]:
    """Magnitude S_i, then one V from the SVD of the stacked residuals; U_i = R_i V^T (V shared by identity)."""
    ss = [magnitude(W, None, spec) for W in Ws]
    res = [W - s.S for W, s in zip(Ws, ss, strict=True)]
    V = torch.linalg.svd(torch.cat(res), full_matrices=False)[2][:r].contiguous()  # [r, d_in]
    return [SolveResult(S=s.S, mask=s.mask, U=Ri @ V.T, V=V) for s, Ri in zip(ss, res, strict=True)]


def _compress(model):
    """Block 0: 2:4 + own V. Block 1: 50% unstructured + shared V per group; its last group left dense.

    Returns the dense reference model whose compressed weights are S + U V.
    """
    ad = get_adapter(model)
    ref = copy.deepcopy(model)
    for bi, block in enumerate(ad.blocks(model)):
        lins = ad.linears(block)
        results = {}
        groups = ad.groups if bi == 0 else ad.groups[:-1]
        for g in groups:
            Ws = [lins[n].weight.detach() for n in g]
            if bi == 0:
                results.update({n: _svd_result(W, LayerSpec(nm=(2, 4), rank=R)) for n, W in zip(g, Ws, strict=True)})
            else:
                results.update(zip(g, _shared_results(Ws, LayerSpec(sparsity=0.5, rank=R)), strict=True))
        rblock = ad.blocks(ref)[bi]
        for n, r in results.items():
            rblock.get_submodule(n).weight.data = r.dense()
        compress_block_(block, ad, results)
    return ref


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _slr(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SLRLinear)}


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    model = tiny_model("llama")
    _compress(model)
    out = tmp_path_factory.mktemp("art") / "llama"
    io.save(model, out, values_dtype=torch.float32, factor_dtype=torch.float32)
    return model, out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_roundtrip(family, tmp_path):
    model = tiny_model(family)
    ref = _compress(model)
    ad = get_adapter(model)
    x = torch.randint(0, 128, (2, 10))
    logits = _logits(model, x)
    torch.testing.assert_close(logits, _logits(ref, x), atol=1e-5, rtol=1e-5)
    slr = _slr(model)
    n_groups = sum(len(g) for g in ad.groups) + sum(len(g) for g in ad.groups[:-1])
    assert len(slr) == n_groups
    # uncompressed linears of the last group of block 1 stay nn.Linear
    last = ad.blocks(model)[1].get_submodule(ad.groups[-1][0])
    assert type(last) is torch.nn.Linear
    multi = [g for g in ad.groups[:-1] if len(g) > 1]
    blk1 = ad.blocks(model)[1]
    for g in multi:
        sps = {id(blk1.get_submodule(n).shared) for n in g}
        assert len(sps) == 1 and None not in {blk1.get_submodule(n).shared for n in g}

    # fp32 save -> load: identical logits, same structure
    rep = io.save(model, tmp_path / "a32", values_dtype=torch.float32, factor_dtype=torch.float32)
    assert rep["compressed_layers"] == rep["compressed_layers_theory"]
    m2, tok = io.load(tmp_path / "a32")
    assert tok is None
    torch.testing.assert_close(_logits(m2, x), logits, atol=1e-6, rtol=0)
    slr2 = _slr(m2)
    assert set(slr2) == set(slr)
    for n, m in slr.items():
        assert torch.equal(slr2[n].mask(), m.mask()) and slr2[n].nm == m.nm
        assert (slr2[n].shared is None) == (m.shared is None)
        assert slr2[n].num_params() == m.num_params()
    man = json.loads((tmp_path / "a32" / io.MANIFEST).read_text())
    fmts = {r["format"] for r in man["layers"].values()}
    assert fmts == {"nm", "bitmask"}
    if getattr(model.config, "tie_word_embeddings", False):
        assert man["tied"] and m2.lm_head.weight is m2.get_input_embeddings().weight

    # fp16 storage: close
    io.save(model, tmp_path / "a16")
    m3, _ = io.load(tmp_path / "a16")
    torch.testing.assert_close(_logits(m3, x), logits, atol=2e-2, rtol=2e-2)
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("a16", "a32")}
    assert size["a16"] < size["a32"]

    # dense export -> plain transformers
    io.export_dense(tmp_path / "a32", tmp_path / "dense")
    d = T.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(_logits(d, x), logits, atol=1e-5, rtol=1e-5)

    # generate on the loaded artifact
    out = m2.generate(input_ids=x[:, :4], attention_mask=torch.ones_like(x[:, :4]), max_new_tokens=3,
                      do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_checksum_mismatch(llama_artifact, tmp_path):
    _, src = llama_artifact
    import shutil

    art = tmp_path / "a"
    shutil.copytree(src, art)
    f = art / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) - 7] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SLRError) as e:
        io.load(art)
    msg = str(e.value)
    assert "\n" not in msg and "checksum" in msg and "model.safetensors" in msg


def test_truncated_and_missing_files(llama_artifact, tmp_path):
    _, src = llama_artifact
    import shutil

    art = tmp_path / "a"
    shutil.copytree(src, art)
    f = art / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SLRError, match="cannot read model.safetensors"):
        io.load(art, verify=False)
    f.unlink()
    with pytest.raises(SLRError, match="missing"):
        io.load(art)
    (art / io.MANIFEST).unlink()
    with pytest.raises(SLRError, match="not an slr artifact"):
        io.load(art)


def test_newer_format_version(llama_artifact, tmp_path):
    _, src = llama_artifact
    import shutil

    art = tmp_path / "a"
    shutil.copytree(src, art)
    man = json.loads((art / io.MANIFEST).read_text())
    man["format_version"] = io.FORMAT_VERSION + 1
    (art / io.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(SLRError) as e:
        io.load(art)
    msg = str(e.value)
    assert "\n" not in msg and f"newer than this slr supports ({io.FORMAT_VERSION})" in msg and "upgrade slr" in msg


def test_overwrite_atomic_and_manifest(llama_artifact, tmp_path):
    model, _ = llama_artifact
    out = tmp_path / "out"
    man = {"source": {"model": "tiny-llama", "sha256": "abc"}, "config": {"method": "magnitude"},
           "plan": {"x": 1}, "format_version": 99}
    io.save(model, out, manifest=man)
    m = json.loads((out / io.MANIFEST).read_text())
    assert m["format"] == "slr" and m["format_version"] == 1 and m["source"]["model"] == "tiny-llama"
    assert set(m["files"]) == {"model.safetensors"}
    assert m["bytes"]["total"] == (out / "model.safetensors").stat().st_size
    with pytest.raises(SLRError, match="not empty"):
        io.save(model, out)

    class Boom:
        def save_pretrained(self, d):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.save(model, out, tokenizer=Boom(), overwrite=True)
    assert json.loads((out / io.MANIFEST).read_text())["source"]["model"] == "tiny-llama"  # old one intact
    with pytest.raises(RuntimeError):
        io.save(model, tmp_path / "new", tokenizer=Boom())
    assert not (tmp_path / "new").exists()
    io.save(model, out, overwrite=True, values_dtype=torch.float32, factor_dtype=torch.float32)
    assert json.loads((out / io.MANIFEST).read_text())["source"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind


def test_sharded_save(llama_artifact, tmp_path):
    model, _ = llama_artifact
    io.save(model, tmp_path / "s", values_dtype=torch.float32, factor_dtype=torch.float32, max_shard_bytes=20_000)
    files = json.loads((tmp_path / "s" / io.MANIFEST).read_text())["files"]
    assert len(files) > 1 and (tmp_path / "s" / io.INDEX_FILE).is_file()
    m2, _ = io.load(tmp_path / "s")
    x = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(_logits(m2, x), _logits(model, x), atol=1e-6, rtol=0)


def test_unstructured_chooses_smaller_format(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    block = ad.blocks(model)[0]
    lins = ad.linears(block)
    res = {"self_attn.q_proj": _svd_result(lins["self_attn.q_proj"].weight.detach(), LayerSpec(sparsity=0.5, rank=2)),
           "mlp.up_proj": _svd_result(lins["mlp.up_proj"].weight.detach(), LayerSpec(sparsity=0.99, rank=2))}
    compress_block_(block, ad, res)
    io.save(model, tmp_path / "a", values_dtype=torch.float32, factor_dtype=torch.float32)
    layers = json.loads((tmp_path / "a" / io.MANIFEST).read_text())["layers"]
    for name, want in (("model.layers.0.self_attn.q_proj", "bitmask"), ("model.layers.0.mlp.up_proj", "csr")):
        rec = layers[name]
        d_out, d_in = rec["shape"]
        sizes = formats.unstructured_index_bytes(d_out, d_in, rec["nnz"])
        assert rec["format"] == want == min(sizes, key=sizes.get)
        assert rec["bytes"] == rec["theory_bytes"]["total"]
    x = torch.randint(0, 128, (1, 7))
    torch.testing.assert_close(_logits(io.load(tmp_path / "a")[0], x), _logits(model, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_packing_roundtrip(nm):
    n, m = nm
    d_out, d_in = 24, 64
    W = torch.randn(d_out, d_in)
    mask = nm_mask(W.abs(), n, m)
    lin = SLRLinear.from_result(SolveResult(S=W * mask, mask=mask), None)
    assert lin.nm == nm
    vals, idx = formats.pack_nm(lin.values.detach(), lin.col, d_out, d_in, n, m)
    nnz = d_out * d_in // m * n
    bits = math.ceil(math.log2(m))
    assert vals.shape == (d_out, d_in * n // m) and idx.dtype == torch.uint8
    assert idx.numel() == math.ceil(nnz * bits / 8)
    if nm == (2, 4):
        assert idx.numel() * 8 == 2 * nnz  # exactly 2 bits per kept value
    v2, crow, col = formats.unpack_nm(vals, idx, d_out, d_in, n, m)
    assert torch.equal(v2, lin.values.detach()) and torch.equal(col, lin.col.long())
    assert torch.equal(crow, lin.crow.long())
    codes = torch.randint(0, 2**bits, (101,))
    assert torch.equal(formats.unpack_bits(formats.pack_bits(codes, bits), bits, 101).long(), codes)


def test_byte_accounting_2to4_r32():
    d_out, d_in, r = 576, 1536, 32
    W = torch.randn(d_out, d_in)
    mask = nm_mask(W.abs(), 2, 4)
    lin = SLRLinear.from_result(SolveResult(S=W * mask, mask=mask, U=torch.randn(d_out, r), V=torch.randn(r, d_in)))
    b = formats.layer_bytes(lin)
    want = d_out * d_in // 2 * 2 + d_out * d_in // 2 * 2 // 8 + 2 * r * (d_out + d_in)
    assert b["actual"] == b["theory"]["total"] == want == 1_130_496
    assert b["format"] == "nm" and b["dense"] == d_out * d_in * 2


def _layer(d_out=48, d_in=32, r=3, spec=None, bias=True):
    spec = spec or LayerSpec(nm=(2, 4))
    W = torch.randn(d_out, d_in)
    mask = nm_mask(W.abs(), *spec.nm) if spec.nm else rowwise_mask(W.abs(), spec.sparsity)
    res = SolveResult(S=W * mask, mask=mask, U=torch.randn(d_out, r), V=torch.randn(r, d_in))
    return SLRLinear.from_result(res, torch.randn(d_out) if bias else None), res


@pytest.mark.parametrize("spec", [LayerSpec(nm=(2, 4)), LayerSpec(sparsity=0.6)])
def test_strategies_agree(spec):
    lin, res = _layer(spec=spec)
    W = res.dense()
    for shape in [(1, 32), (3, 32), (2, 5, 32), (130, 32), (0, 32)]:
        x = torch.randn(*shape)
        want = x @ W.T + lin.bias.detach()
        for s in STRATEGIES:
            lin.strategy = s
            with torch.no_grad():
                torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(lin.mask(), res.mask) and torch.allclose(lin.to_dense(), W, atol=1e-6)
    assert lin.num_params() == int(res.mask.sum()) + 3 * (48 + 32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_keeps_support(strategy):
    lin, res = _layer(spec=LayerSpec(sparsity=0.5))
    lin.strategy = strategy
    lin.train()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = torch.randn(16, 32)
    before = lin.to_dense().detach().clone()
    for _ in range(2):
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        assert lin.values.grad.shape == lin.values.shape
        opt.step()
    assert torch.equal(lin.mask(), res.mask)
    assert (lin.sparse_dense()[~res.mask] == 0).all()
    assert not torch.allclose(lin.to_dense().detach(), before)
    lin.eval()
    with torch.no_grad():  # caches (dense-cached) see the new parameters
        torch.testing.assert_close(lin(x), x @ lin.to_dense().T + lin.bias, atol=1e-5, rtol=1e-5)


def test_dense_cache_invalidation():
    lin, _ = _layer()
    lin.strategy = "dense-cached"
    x = torch.randn(4, 32)
    with torch.no_grad():
        y0 = lin(x)
        lin.values.add_(1.0)
        y1 = lin(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, x @ lin.to_dense().detach().T + lin.bias.detach(), atol=1e-5, rtol=1e-5)


def test_shared_projection_cache_and_grad():
    V = torch.randn(3, 32)
    sp = SharedProjection(V)
    lins = []
    for _ in range(3):
        W = torch.randn(16, 32)
        mask = nm_mask(W.abs(), 2, 4)
        lins.append(SLRLinear.from_result(SolveResult(S=W * mask, mask=mask, U=torch.randn(16, 3), V=V), None, sp))
    assert [m.num_params() for m in lins] == [16 * 16 + 3 * 48, 16 * 16 + 3 * 16, 16 * 16 + 3 * 16]
    x = torch.randn(5, 32, requires_grad=True)
    n0 = sp.n_computed
    ys = [m(x) for m in lins]
    assert sp.n_computed == n0 + 1  # x V^T once for the three consumers
    sum(y.square().sum() for y in ys).backward()
    g_shared = sp.V.grad.clone()
    # reference: three independent copies of V
    Vs = [sp.V.detach().clone().requires_grad_(True) for _ in lins]
    sum((x.detach() @ (m.sparse_dense().detach() + m.U.detach() @ Vi).T).square().sum()
        for m, Vi in zip(lins, Vs, strict=True)).backward()
    torch.testing.assert_close(g_shared, sum(v.grad for v in Vs), atol=1e-4, rtol=1e-4)
    # no stale results: same x, V changed in place
    with torch.no_grad():
        a = lins[0](x)
        sp.V.mul_(2.0)
        b = lins[1](x)
        torch.testing.assert_close(b, x @ lins[1].to_dense().T, atol=1e-5, rtol=1e-5)
        lins[0](x)
        assert not torch.allclose(a, lins[0](x))


def _tiny_tokenizer():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tk = tokenizers.Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0")


def test_tokenizer_bf16_and_partial_layers(tmp_path):
    """Tokenizer round trip, bf16 load + generate under inference_mode, rank-only and sparse-only layers."""
    model = tiny_model("qwen3")
    ad = get_adapter(model)
    block = ad.blocks(model)[0]
    lins = ad.linears(block)
    W = lins["self_attn.o_proj"].weight.detach()
    U, sv, Vh = torch.linalg.svd(W, full_matrices=False)
    s = magnitude(lins["mlp.down_proj"].weight.detach(), None, LayerSpec(sparsity=0.5))
    compress_block_(block, ad, {"self_attn.o_proj": SolveResult(S=None, mask=None, U=U[:, :8] * sv[:8], V=Vh[:8]),
                                "mlp.down_proj": s})
    io.save(model, tmp_path / "a", tokenizer=_tiny_tokenizer(), values_dtype=torch.float32,
            factor_dtype=torch.float32)
    m2, tok = io.load(tmp_path / "a")
    assert tok("w1 w2 w3").input_ids == [1, 2, 3]
    x = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(_logits(m2, x), _logits(model, x), atol=1e-6, rtol=0)
    m3, tok = io.load(tmp_path / "a", dtype=torch.bfloat16)
    enc = tok(["w1 w2 w3"], return_tensors="pt")
    with torch.inference_mode():
        out = m3.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6) and m3.model.layers[0].mlp.down_proj.values.dtype == torch.bfloat16
    io.export_dense(tmp_path / "a", tmp_path / "d")
    assert (tmp_path / "d" / "tokenizer.json").is_file()
