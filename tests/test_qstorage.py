"""Quantized storage (issue 20): QSLRLinear keeps codes + fp16 group scales, the artifact bit-packs them, bytes and
bits per weight are counted at their width, 8-bit embeddings, and quantized artifacts round-trip to the same logits."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers as T
from safetensors import safe_open
from test_cli import assert_no_output, assert_one_line_error, run

from slr import formats, io
from slr.api import summary_rows
from slr.checkpoint import BlockCheckpoints
from slr.config import RefineConfig
from slr.embeddings import dequantize_rows, embedding_names, quantize_rows, round_embeddings_
from slr.errors import SLRError
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.nn import STRATEGIES, QSharedProjection, QSLRLinear, SLRLinear, compress_block_
from slr.qlinear import grids
from slr.quant import QuantSpec, rtn
from slr.refine import _trainable
from slr.solvers.base import SolveResult
from slr.solvers.masks import nm_mask, rowwise_mask
from slr.spec import LayerSpec

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def _mask(W: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    if spec.nm is not None:
        return nm_mask(W.abs(), *spec.nm)
    if spec.sparsity == 0:
        return torch.ones_like(W, dtype=torch.bool)
    return rowwise_mask(W.abs(), spec.sparsity)


def qresult(W: torch.Tensor, spec: LayerSpec, V: torch.Tensor | None = None) -> SolveResult:
    """RTN S on its support, then a rank-r SVD of the residual, factors rounded to their grid when factor_bits < 16.
    ``V`` (already on its grid) is shared: U is fitted to it."""
    W = W.detach().float()
    mask = _mask(W, spec)
    S, s, z = rtn(W, spec.quant, mask)
    res = SolveResult(S=S, mask=mask, qparams={"S": (s, z)})
    if spec.rank:
        if V is None:
            Us, sv, Vh = torch.linalg.svd(W - S, full_matrices=False)
            U, V = Us[:, :spec.rank] * sv[:spec.rank], Vh[:spec.rank].contiguous()
            if spec.factor_bits != 16:
                V, sv_, zv = rtn(V, spec.factor_quant(V.shape[1]))
                res.qparams["V"] = (sv_, zv)
        else:
            U = (W - S) @ torch.linalg.pinv(V)
        if spec.factor_bits != 16:
            U, su, zu = rtn(U, spec.factor_quant(U.shape[1]))
            res.qparams["U"] = (su, zu)
        res.U, res.V = U, V
    res.qspec = grids(spec, res)
    return res


def shared_group(Ws: list[torch.Tensor], spec: LayerSpec) -> list[SolveResult]:
    first = qresult(Ws[0], spec)
    out = [first]
    for W in Ws[1:]:
        r = qresult(W, spec, V=first.V)
        r.qparams["V"], r.qspec["V"] = first.qparams["V"], first.qspec["V"]
        out.append(r)
    return out


SPECS = [  # block 0 / block 1, different groups get different specs
    LayerSpec(nm=(2, 4), rank=4, bits=4, group_size=16, factor_bits=8),
    LayerSpec(sparsity=0.0, rank=4, bits=3, group_size=32, sym=False, factor_bits=4),
    LayerSpec(sparsity=0.5, bits=2, group_size=16, sym=False),
    LayerSpec(sparsity=0.0, bits=8, group_size=64),
]


def qcompress(model):
    """Quantized S + factors on every linear (several specs, one group with a shared quantized V); returns the dense
    reference model holding S + U V."""
    ad = get_adapter(model)
    ref = copy.deepcopy(model)
    k = 0
    for bi, block in enumerate(ad.blocks(model)):
        lins = ad.linears(block)
        results = {}
        for g in ad.groups:
            spec = SPECS[k % len(SPECS)]
            k += 1
            Ws = [lins[n].weight for n in g]
            if bi == 1 and len(g) > 1 and spec.rank and spec.factor_bits != 16 and not results:
                results.update(zip(g, shared_group(Ws, spec), strict=True))
            else:
                results.update({n: qresult(W, spec) for n, W in zip(g, Ws, strict=True)})
        for n, r in results.items():
            ad.blocks(ref)[bi].get_submodule(n).weight.data = r.dense()
        compress_block_(block, ad, results)
    return ref


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---- bit packing ------------------------------------------------------------------------------------------------
def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    stream = [(int(c) >> i) & 1 for c in codes for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return torch.tensor([sum(b << i for i, b in enumerate(stream[j:j + 8])) for j in range(0, len(stream), 8)],
                        dtype=torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 3, 8, 13, 64, 1001):
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        packed = formats.pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(formats.unpack_bits(packed, bits, n).long(), codes)
        if n <= 64:
            assert torch.equal(packed, _reference_pack(codes, bits))  # one LSB-first stream for every width
    with pytest.raises(SLRError, match="expected"):
        formats.unpack_bits(torch.zeros(3, dtype=torch.uint8), bits, 100)


def test_int8_embedding_rows():
    W = torch.randn(50, 24) * torch.linspace(0.01, 3, 50)[:, None]
    W[3] = 0
    codes, scales = quantize_rows(W)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and int(codes.abs().max()) <= 127
    back = dequantize_rows(codes, scales)
    assert torch.equal(back[3], torch.zeros(24))
    assert bool(((back - W).abs() <= scales.float()[:, None] * 0.5 + 1e-6).all())
    assert torch.equal(dequantize_rows(*quantize_rows(back)), back)  # on the grid: idempotent


# ---- the layer --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS + [LayerSpec(sparsity=0.6, rank=3, bits=4, group_size=8, factor_bits=4)],
                         ids=lambda s: s.label)
def test_qlinear_matches_float_layer(spec):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    res = qresult(W, spec)
    bias = torch.randn(24)
    q = QSLRLinear.from_result(res, bias)
    f = SLRLinear.from_result(res, bias)
    for part in res.qparams:  # stored as codes, not as float Parameters
        attr = {"S": "values", "U": "U", "V": "V"}[part]
        assert attr not in dict(q.named_parameters()) and getattr(q, f"q{part}_codes").dtype == torch.uint8
        assert (getattr(q, f"q{part}_zero", None) is None) == res.qspec[part].sym
    assert torch.equal(q.to_dense(), f.to_dense()) and torch.equal(q.to_dense(), res.dense())
    assert torch.equal(q.mask(), res.mask) and q.num_params() == f.num_params() and q.nnz == f.nnz
    assert q.rank == f.rank and q.nm == f.nm and "S=int" in repr(q)
    for shape in [(1, 64), (3, 64), (2, 70, 64)]:
        x = torch.randn(*shape)
        want = x @ res.dense().T + bias
        for s in STRATEGIES:
            q.strategy = s
            with torch.no_grad():
                torch.testing.assert_close(q(x), want, atol=1e-4, rtol=1e-4)
    q.strategy = "dense-cached"
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = q(x)
        assert q._w_cache is not None
        q.qS_codes[0] = (int(q.qS_codes[0]) + 1) % 2**res.qspec["S"].bits  # the cache follows the codes
        assert not torch.equal(q(x), y)
    q2 = copy.deepcopy(q).double()
    assert q2.to_dense().dtype == torch.float64 and q2.qS_codes.dtype == torch.uint8
    params, _ = _trainable(torch.nn.ModuleList([q]), RefineConfig())
    assert {id(p) for p in params} == {id(p) for p in q.parameters()}  # only the float parts train


def test_off_grid_values_are_refused():
    spec = LayerSpec(sparsity=0.5, bits=4, group_size=16)
    res = qresult(torch.randn(8, 32), spec)
    res.S = res.S + 0.3 * res.qparams["S"][0].repeat_interleave(16, 1) * res.mask
    with pytest.raises(SLRError, match="not on their 4-bit grid"):
        QSLRLinear.from_result(res)
    res.qspec = {}
    with pytest.raises(SLRError, match="no grid"):
        QSLRLinear.from_result(res)
    with pytest.raises(SLRError, match="does not quantize it"):
        grids(LayerSpec(sparsity=0.5), qresult(torch.randn(8, 32), spec))


def test_checkpoint_keeps_qparams(tmp_path):
    spec = SPECS[1]
    Ws = [torch.randn(16, 64), torch.randn(16, 64)]
    results = dict(zip(("a", "b"), shared_group(Ws, spec), strict=True))
    ck = BlockCheckpoints(tmp_path / "ck", {"x": 1}, resume=False)
    ck.save(0, results, [], {})
    back, _, _, _ = ck.load(0)
    for n, r in results.items():
        assert back[n].qspec == r.qspec and set(back[n].qparams) == set(r.qparams) == {"S", "U", "V"}
        for p, (s, z) in r.qparams.items():
            assert torch.equal(back[n].qparams[p][0], s) and torch.equal(back[n].qparams[p][1], z)
    assert back["b"].V is back["a"].V


# ---- byte accounting ----------------------------------------------------------------------------------------------
def test_byte_accounting_quantized_2to4_r32():
    d_out, d_in, r = 576, 1536, 32
    spec = LayerSpec(nm=(2, 4), rank=r, bits=4, group_size=64, factor_bits=8)
    lin = QSLRLinear.from_result(qresult(torch.randn(d_out, d_in), spec))
    b = formats.layer_bytes(lin)
    nnz = d_out * d_in // 2
    want = {"values": nnz * 4 // 8, "scales": d_out * (d_in // 64) * 2, "index": nnz * 2 // 8,
            # U [576, 32]: 32 is not a multiple of 64, so one group per row; V [32, 1536]: 24 groups per row
            "factors": d_out * r + d_out * 2 + r * d_in + r * (d_in // 64) * 2}
    want["total"] = sum(want.values())
    assert b["theory"] == want and b["actual"] == want["total"] == 429_696
    assert b["bits_per_weight"] == round(8 * want["total"] / (d_out * d_in), 4)  # 3.885 bpw
    # a dense 4-bit S with group 64 and no factors is GPTQ's 4.25 bpw: codes + one fp16 scale per 64, no index
    dense = QSLRLinear.from_result(qresult(torch.randn(d_out, d_in), LayerSpec(sparsity=0.0, bits=4, group_size=64)))
    bd = formats.layer_bytes(dense)
    assert bd["format"] == "dense" and bd["theory"]["index"] == 0 and bd["bits_per_weight"] == 4.25
    asym = formats.theoretical_bytes(d_out, d_in, d_out * d_in, 0, quant={"S": QuantSpec(3, 64, sym=False)})
    assert 8 * asym["total"] / (d_out * d_in) == 3 + (16 + 3) / 64


# ---- artifacts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_quantized_artifact_roundtrip(family, tmp_path):
    model = tiny_model(family)
    ref = qcompress(model)
    x = torch.randint(0, 128, (2, 10))
    logits = _logits(model, x)
    torch.testing.assert_close(logits, _logits(ref, x), atol=1e-5, rtol=1e-5)  # codes give back S + U V
    slr = {n: m for n, m in model.named_modules() if isinstance(m, SLRLinear)}
    assert all(isinstance(m, QSLRLinear) for m in slr.values())
    assert any(isinstance(m.shared, QSharedProjection) for m in slr.values())

    for bits in (16, 8):
        mem = copy.deepcopy(model)
        round_embeddings_(mem, bits)  # what api.run_compress evaluates: the artifact's embeddings
        want = _logits(mem, x)
        out = tmp_path / f"e{bits}"
        rep = io.save(model, out, embed_bits=bits)
        assert rep["compressed_layers"] == rep["compressed_layers_theory"]  # packed tensors = theoretical bytes
        assert rep["bpw"] == round(8 * rep["compressed_layers"] / rep["compressed_params"], 4)
        m2, _ = io.load(out, packed=False)
        torch.testing.assert_close(_logits(m2, x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_logits(io.load(out)[0], x), want, atol=1e-5, rtol=1e-5)  # packed where it can
        man = json.loads((out / io.MANIFEST).read_text())
        assert man["format_version"] == io.FORMAT_VERSION and man["embed"]["bits"] == bits
        assert {r["format"] for r in man["layers"].values()} >= {"nm", "dense"}
        assert all("quant" in r for r in man["layers"].values())
        slr2 = {n: m for n, m in m2.named_modules() if isinstance(m, SLRLinear)}
        for n, m in slr.items():
            assert type(slr2[n]) is QSLRLinear and slr2[n].qspecs == m.qspecs
            assert torch.equal(slr2[n].mask(), m.mask()) and slr2[n].num_params() == m.num_params()
            assert (slr2[n].shared is None) == (m.shared is None)
        names = embedding_names(model)
        with safe_open(str(out / io.SINGLE_FILE), "pt") as f:
            keys = set(f.keys())
            if bits == 8:
                assert all(f.get_tensor(k).dtype == torch.int8 for k in keys if k.endswith(".q8"))
                assert {k.removesuffix(".q8") for k in keys if k.endswith(".q8")} & set(names)
            else:
                assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if k in names)
        if bits == 8:  # dense export of a quantized artifact: a plain HF folder with the same logits
            io.export_dense(out, tmp_path / "dense")
            d = T.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
            torch.testing.assert_close(_logits(d, x), want, atol=1e-5, rtol=1e-5)
            m3, _ = io.load(out, dtype=torch.bfloat16)
            torch.testing.assert_close(_logits(m3, x).float(), want, atol=0.1, rtol=0.1)


def test_bytes_on_disk_match_theory(tmp_path):
    """A model big enough that safetensors' header is small next to the tensors: on disk <= 1.02 x theory."""
    cfg = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).float().eval()
    ad = get_adapter(model)
    block = ad.blocks(model)[0]
    spec = LayerSpec(nm=(2, 4), rank=8, bits=4, group_size=64, factor_bits=4)
    compress_block_(block, ad, {n: qresult(lin.weight, spec) for n, lin in ad.linears(block).items()})
    rep = io.save(model, tmp_path / "a", embed_bits=8)
    mb = formats.model_bytes(model)
    assert mb["compressed_layers_theory"] == rep["compressed_layers"] == rep["compressed_layers_theory"]
    assert mb["bpw"] == rep["bpw"] and 3.0 < rep["bpw"] < 4.0  # 2 + 0.5 index + 0.25 scales + factors
    emb = 2 * (512 * 256 + 512 * 2)  # untied embedding and head: int8 codes + an fp16 scale per row
    norms = 3 * 256 * 4
    assert rep["dense_remainder"] == emb + norms
    disk = (tmp_path / "a" / io.SINGLE_FILE).stat().st_size
    assert disk == rep["total"] and disk <= 1.02 * (rep["compressed_layers_theory"] + emb + norms)


def test_bad_embed_bits(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", "smollm2-135m", "--pattern", "2:4", "--embed-bits", 4, "--out", out,
                       "--device", "cpu")
    assert_one_line_error(code, err, "--embed-bits 4", "16", "8")
    assert not out.exists()
    model = tiny_model("llama")
    with pytest.raises(SLRError, match="--embed-bits 12"):
        io.save(model, tmp_path / "x", embed_bits=12)
    assert not (tmp_path / "x").exists()


def test_corrupted_scales_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    qcompress(model)
    art = tmp_path / "a"
    io.save(model, art, embed_bits=8)
    f = art / io.SINGLE_FILE
    sd = load_file(f)
    k = next(k for k in sd if k.endswith(".slr.values.scales"))
    sd[k] = sd[k][:, :-1].contiguous()
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(SLRError) as e:
        io.load(art, verify=False)
    assert "\n" not in str(e.value) and "scales" in str(e.value) and "corrupted" in str(e.value)


def test_summary_rows_show_bpw():
    res = {"model": "m", "method": "gptq", "spec": "u0-q4g64", "retained_fraction": 1.0, "mean_rel_error": 0.01,
           "seconds": {"compress": 1.0}, "bytes": {"bpw": 4.25, "total": 1000, "on_disk": 1500,
                                                   "compressed_layers": 800}}
    rows = dict(summary_rows(res))
    assert rows["bits per weight"].startswith("4.250") and rows["artifact bytes"].startswith("1,500 on disk")
    assert "bits per weight" not in dict(summary_rows(res | {"bytes": {}}))


def test_cli_gptq_end_to_end(capsys, tmp_path, tiny_folder):
    """`slr compress --method gptq --bits 4` writes a packed artifact at 4 + 16/g bits per weight that `slr eval`
    reads back to the same perplexity; bad bit widths and group sizes are one-line errors that leave nothing."""
    src, text = tiny_folder
    out = tmp_path / "q4"
    common = ["--calib-samples", 4, "--calib-text", text, "--text", text, "--windows", 2, "--device", "cpu"]
    code, stdout, err = run(capsys, "compress", src, "--method", "gptq", "--bits", 4, "--group-size", 16,
                            "--out", out, *common)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["spec"] == "u0-q4g16" and res["bytes"]["bpw"] == pytest.approx(4 + 16 / 16)
    assert "bits per weight" in stdout
    code, _, err = run(capsys, "eval", out, "--text", text, "--windows", 2, "--device", "cpu", "--json",
                       tmp_path / "ev.json")
    assert code == 0, err
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["ppl"] == pytest.approx(res["ppl"]["ppl"], rel=1e-4)
    for argv, words in ((["--bits", 5], "bit width 5 is not one of 2, 3, 4, 8"),
                        (["--bits", 4, "--group-size", 48], "group size 48 does not divide"),
                        (["--bits", 4, "--factor-bits", 6], "factor bit width 6"),
                        (["--method", "admm", "--rank", 2, "--bits", 4, "--embed-bits", 4], "embed")):
        bad = tmp_path / "bad"
        argv = ["--method", "gptq", *argv] if "--method" not in argv else argv
        code, _, err = run(capsys, "compress", src, *argv, "--out", bad, *common)
        assert_one_line_error(code, err, words)
        assert_no_output(tmp_path, bad)
