"""slr.packed and the kernels under it: the C++ head / 2:4 float16 / unpack kernels give float64's numbers, the
pure-torch fallback unpacks the same bytes to the same matrix, and an artifact loaded packed (4-bit and 3-bit dense
S with 8-bit factors, 2:4 float16 S, int8 and float16 embeddings, Gemma's scaled embedding) keeps the unpacked
load's logits and greedy text while its decode steps run the kernels and hold no float copy of S or the head."""

from __future__ import annotations

import pytest
import torch
from test_cpp_kernel import mask24

import slr
from slr import csrc, io, kernels, packed
from slr.errors import SLRError
from slr.models.tiny import tiny_model
from slr.nn import SLRLinear

pytestmark = [pytest.mark.skipif(csrc.load() is None, reason=f"slr's C++ kernels are unavailable: {csrc.reason()}"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]
GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _auto():
    with kernels.use_kernel("auto"):
        kernels.CALLS.clear()
        yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("K", [576, 1536, 77])
def test_rows_mm_int8_float16_float32(K):
    x = torch.randn(3, K, generator=GEN)
    q = torch.randint(-127, 128, (300, K), generator=GEN, dtype=torch.int8)
    s = torch.rand(300, generator=GEN) * 0.01
    assert rel(csrc.rows_mm(x, q, s), x.double() @ (q.double() * s.double()[:, None]).t()) < 1e-5
    for w in (torch.randn(300, K, generator=GEN).half(), torch.randn(300, K, generator=GEN)):
        assert rel(csrc.rows_mm(x, w), x.double() @ w.double().t()) < 1e-5
    with pytest.raises(ValueError):
        csrc.rows_mm(x, q)  # int8 rows need their scales


def test_packed_head_kernel_and_gemm_paths():
    """PackedHead: int8 rows with a row scale give float64's logits through the kernel (up to HEAD_MAX_TOKENS tokens)
    and through float32 slices and GEMMs (more tokens, slices shorter than the vocabulary)."""
    V = packed.HEAD_SLICE + 300
    q = torch.randint(-127, 128, (V, 64), generator=GEN, dtype=torch.int8)
    s = torch.rand(V, generator=GEN) * 0.01
    head = packed.PackedHead(q, s)
    for T in (1, packed.HEAD_MAX_TOKENS, packed.HEAD_MAX_TOKENS + 1):
        x = torch.randn(T, 64, generator=GEN)
        kernels.CALLS.clear()
        got = head(x)
        assert kernels.CALLS["head"] == (T <= packed.HEAD_MAX_TOKENS)
        assert rel(got, x.double() @ (q.double() * s.double()[:, None]).t()) < 1e-5, T
        assert got.shape == (T, V)


def test_packed_head_q8_matches_its_torch_emulation(monkeypatch):
    """Under the "q8" setting a one-token call reads an int8 head with int8 activations (kernel and torch path alike);
    more tokens, and float16 rows, stay float32."""
    V, D = 1000, 576
    q = torch.randint(-127, 128, (V, D), generator=GEN, dtype=torch.int8)
    s = torch.rand(V, generator=GEN) * 0.01
    head, W = packed.PackedHead(q, s), q.double() * s.double()[:, None]
    x = torch.randn(1, D, generator=GEN)
    x[0, 5] = 50.0
    want = packed.q8_activations(x).double() @ W.t()
    with kernels.use_kernel("q8"):
        got = head(x)
        assert rel(got, want) < 1e-5 and rel(got, x.double() @ W.t()) > 1e-4
        assert rel(csrc.rows_mm(torch.cat([x, x]), q, s, q8=True)[1], want[0]) < 1e-5
        monkeypatch.setattr(packed, "_use_cpp", lambda x: False)
        assert rel(head(x), want) < 1e-5
        monkeypatch.undo()
        assert rel(head(torch.cat([x, x]))[0], x.double()[0] @ W.t()) < 1e-5
        h16 = packed.PackedHead(W.half(), None)
        assert not h16.takes_q8() and rel(h16(x), x.double() @ W.half().double().t()) < 1e-5
    with pytest.raises(ValueError, match="q8"):
        csrc.rows_mm(torch.randn(1, 100), q[:, :100].contiguous(), s, q8=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_lowrank_add(dtype):
    """y += (x V^T) U^T in one call, with V or with a given z = x V^T."""
    x, y0 = torch.randn(3, 576, generator=GEN), torch.randn(3, 1536, generator=GEN)
    U, V = torch.randn(1536, 7, generator=GEN).to(dtype), torch.randn(7, 576, generator=GEN).to(dtype)
    want = y0.double() + (x.double() @ V.double().t()) @ U.double().t()
    assert rel(csrc.lowrank_add_(y0.clone(), x, U, V=V), want) < 1e-5
    z = (x.double() @ V.double().t()).float()
    assert rel(csrc.lowrank_add_(y0.clone(), x, U, z=z), want) < 1e-5
    with pytest.raises(ValueError):
        csrc.lowrank_add_(y0.clone(), x, U, V=V, z=z)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("N,K", [(576, 576), (1536, 576), (576, 1536)])
def test_f16_nm24_mm_and_unpack(M, N, K):
    m = mask24(N, K)
    W = torch.randn(N, K, generator=GEN).half().float() * m  # [N, K], 2:4
    cols = m.nonzero()[:, 1].view(N, K // 2)
    vals, idx = W.gather(1, cols).half().contiguous(), kernels.nm24_index(cols)
    x = torch.randn(M, K, generator=GEN)
    assert rel(csrc.f16_nm24_mm(x, vals, idx), x.double() @ W.double().t()) < 1e-5
    assert torch.equal(csrc.unpack(N, K, values=vals, index=idx), W)
    assert torch.equal(packed.nm24_cols(idx), cols)


def test_unpack_int4_equals_the_torch_fallback():
    """Dense and 2:4 4-bit packs: C++ unpack == PackedLinear's pure-torch unpack == the dequantized S, bit for bit."""
    N, K, g = 96, 256, 64
    codes = torch.randint(0, 16, (N, K), generator=GEN, dtype=torch.uint8)
    scale = (torch.rand(N, K // g, generator=GEN) + 0.1).half().float()
    zero = torch.randint(0, 16, (N, K // g), generator=GEN).float()
    want = (codes.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)
    lin = packed.PackedLinear(K, N, kernels.nibble_codes(codes), None, scale, scale * zero, g, None, None, None, None,
                              None)
    assert torch.equal(packed.unnibble(lin.s_values), codes)
    assert torch.equal(lin.unpacked(True), want) and torch.equal(lin.unpacked(False), want)
    m = mask24(N, K)
    cols = m.nonzero()[:, 1].view(N, K // 2)
    kept = codes.gather(1, cols)
    lin = packed.PackedLinear(K, N, kernels.nibble_codes(kept), kernels.nm24_index(cols), scale, scale * zero, g,
                              None, None, None, None, None)
    assert torch.equal(lin.unpacked(True), want * m) and torch.equal(lin.unpacked(False), want * m)


def _artifact(tmp_path, family: str, cfg: slr.CompressConfig, embed_bits: int | None, name: str):
    model = tiny_model(family)
    calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    slr.compress_(model, cfg, calib, progress=False)
    io.save(model, tmp_path / name, embed_bits=embed_bits)
    return tmp_path / name


CASES = {  # name: (family, config, embed bits, packed layers, head class)
    "gptq4-e8": ("llama", slr.CompressConfig(method="gptq", bits=4, group_size=32), 8, 14, packed.PackedHead),
    "q3r4f8-e16": ("qwen3", slr.CompressConfig(method="prune+lr", bits=3, group_size=32, rank=4, factor_bits=8), 16,
                   14, packed.PackedHead),
    "q3g64r4f8": ("llama", slr.CompressConfig(method="prune+lr", bits=3, group_size=64, rank=4, factor_bits=8), 8,
                  14, packed.PackedHead),  # S in the 3-bit lane layout, int8 factors
    "q2g64": ("llama", slr.CompressConfig(method="gptq", bits=2, group_size=64), 8, 14, packed.PackedHead),
    "q8g64": ("llama", slr.CompressConfig(method="gptq", bits=8, group_size=64), 8, 14, packed.PackedHead),
    "nm24r4-f16": ("llama", slr.CompressConfig(method="admm", pattern="2:4", rank=4), None, 14, torch.nn.Linear),
    "gemma-gptq4-e8": ("gemma3_text", slr.CompressConfig(method="gptq", bits=4, group_size=32), 8, 14,
                       packed.PackedHead),
}

LANES = {"q3g64r4f8": (3, torch.int8), "q2g64": (2, None), "q8g64": (8, None)}  # name: (S bits, factor dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_packed_load_keeps_logits_and_text(tmp_path, monkeypatch, name):
    family, cfg, eb, n_packed, head_cls = CASES[name]
    art = _artifact(tmp_path, family, cfg, eb, name)
    ref, _ = io.load(art, packed=False)
    got, _ = io.load(art)
    assert sum(isinstance(m, packed.PackedLinear) for m in got.modules()) == n_packed
    if name in LANES:  # S at its own width, quantized factors as int8 codes
        bits, fdt = LANES[name]
        lins = [m for m in got.modules() if isinstance(m, packed.PackedLinear)]
        assert all(m.bits == bits and (m.U is None or m.U.dtype == fdt) for m in lins)
    assert not any(type(m) is SLRLinear for m in got.modules())
    assert isinstance(got.get_output_embeddings(), head_cls)
    if eb is not None:  # the head and the embedding hold their stored rows, no float32 copy
        assert isinstance(got.get_input_embeddings(), packed.RowsEmbedding)
        assert got.get_input_embeddings().rows.dtype == {8: torch.int8, 16: torch.float16}[eb]
        assert got.get_input_embeddings().weight.untyped_storage().nbytes() <= 4
    seq = torch.randint(3, 120, (2, packed.DECODE_MAX_TOKENS // 2 + 1), generator=GEN)  # more tokens than decode
    with torch.no_grad():
        want = ref(seq).logits
        assert rel(got(seq).logits, want) < 1e-5  # prefill: unpacked GEMMs
        kernels.CALLS.clear()
        one = got(seq[:, :1]).logits  # decode-sized: the kernels
        assert kernels.CALLS["packed"] == n_packed
        assert rel(one, ref(seq[:, :1]).logits) < 1e-5
        with kernels.use_kernel("torch"):
            torch.testing.assert_close(got(seq[:, :1]).logits, one, rtol=1e-5, atol=1e-5)
        with kernels.use_kernel("q8"):  # one token: int8 activations where taken, emulated alike by the torch path
            q8 = got(seq[:1, :1]).logits
            monkeypatch.setattr(packed, "_use_cpp", lambda x: False)
            torch.testing.assert_close(got(seq[:1, :1]).logits, q8, rtol=1e-4, atol=1e-4)
            monkeypatch.undo()
        ids = seq[:1, :4]
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(got.generate(ids, **kw), ref.generate(ids, **kw))


def test_what_is_not_packed(tmp_path):
    """8-bit S in groups of 32 (the 8-bit lanes take 64k), unstructured S, kernel setting "torch" at load and
    packed=False keep SLRLinear layers."""
    art = _artifact(tmp_path, "llama", slr.CompressConfig(method="gptq", bits=8, group_size=32), 8, "q8")
    m, _ = io.load(art)
    assert not any(isinstance(x, packed.PackedLinear) for x in m.modules())
    assert isinstance(m.get_output_embeddings(), packed.PackedHead)  # the head still reads int8 rows
    art = _artifact(tmp_path, "llama", slr.CompressConfig(method="wanda", sparsity=0.5), None, "u50")
    m, _ = io.load(art)
    assert not any(isinstance(x, packed.PackedLinear) for x in m.modules())
    art = _artifact(tmp_path, "llama", slr.CompressConfig(method="gptq", bits=4, group_size=32), 8, "q4")
    with kernels.use_kernel("torch"):
        m, _ = io.load(art)
    assert not any(isinstance(x, (packed.PackedLinear, packed.PackedHead)) for x in m.modules())
    m, _ = io.load(art, packed=False)
    assert sum(isinstance(x, SLRLinear) for x in m.modules()) == 14
    with pytest.raises(SLRError, match="packed=False"):
        io.save(io.load(art)[0], tmp_path / "again")
    assert not (tmp_path / "again").exists()
