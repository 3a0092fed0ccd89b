"""slr's C++ int4 kernel (slr.csrc, src/slr/csrc/int4_gemv.cpp) and its place in slr.kernels' "auto" setting: the
torch path's numbers (within 1e-4 of max|y|) on SmolLM2's layer shapes at decode, taken when and only when it should
be, a gptq 4-bit tiny llama's logits unchanged; without the library slr falls back after one line saying why, and a
failed build never fails."""

from __future__ import annotations

import pytest
import torch
from test_kernels import SMOL_SHAPES, qlayer

import slr
from slr import csrc, kernels
from slr.csrc.__main__ import main as csrc_main
from slr.models.tiny import tiny_model
from slr.nn import QSLRLinear, set_strategy

BUILT = csrc.load() is not None
needs_kernel = pytest.mark.skipif(not BUILT, reason=f"slr's C++ int4 kernel is unavailable: {csrc.reason()}")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(autouse=True)
def _auto():
    with kernels.use_kernel("auto"):
        kernels.CALLS.clear()
        yield


def cpp_calls() -> int:
    return kernels.CALLS["cpp-float32"]


def test_nibble_layout():
    """nibble_codes is the layout int4_gemv.cpp reads: word i of block b holds code 32 b + 8 j + i in bits 4 j."""
    codes = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    words = kernels.nibble_codes(codes).view(3, 2, 8, 2).to(torch.int32)  # [n, block, i, byte]
    words = words[..., 0] | (words[..., 1] << 8)
    back = torch.stack([(words >> (4 * j)) & 15 for j in range(4)], 2)  # [n, block, j, i]
    assert torch.equal(back.reshape(3, 64).to(torch.uint8), codes)


@needs_kernel
@pytest.mark.parametrize("N,K,gs", [(37, 96, 32), (64, 256, 128), (130, 576, 64)])
def test_int4_mm_matches_float64(N, K, gs):
    """The raw kernel against float64 x W^T: odd N (the one-row tail), 1..9 rows of x (passes of 4), 1 and 2
    threads, asymmetric zeros."""
    g = torch.Generator().manual_seed(N)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = (torch.rand(N, K // gs, generator=g) * 0.02 + 1e-3).half().float()
    zero = torch.randint(0, 16, scale.shape, generator=g).float()
    W = ((codes.float().view(N, -1, gs) - zero[..., None]) * scale[..., None]).view(N, K).double()
    w, sz = kernels.nibble_codes(codes), (scale * zero).contiguous()
    for M in range(1, 10):
        x = torch.randn(M, K, generator=g)
        ref = x.double() @ W.t()
        for threads in (1, 2):
            y = csrc.int4_mm(x, w, scale, sz, gs, threads=threads)
            assert y.shape == (M, N) and y.dtype == torch.float32
            assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (M, threads)
    with pytest.raises(ValueError, match="bad operands"):
        csrc.int4_mm(x.double(), w, scale, sz, gs)


@needs_kernel
@pytest.mark.parametrize("d_in,d_out", SMOL_SHAPES)
def test_kernel_equals_torch_path_on_smollm2_shapes(d_in, d_out):
    """1 and 3 tokens per call, groups 32/64/128 (where they divide d_in), symmetric and asymmetric grids, rank-8
    factors and a bias: max |kernel - torch path| <= 1e-4 max |y|, and the C++ kernel ran for every call."""
    groups = [gs for gs in (32, 64, 128) if d_in % gs == 0]
    for k, (gs, sym) in enumerate((gs, sym) for gs in groups for sym in (True, False)):
        lin = qlayer(d_in, d_out, gs, sym, rank=8, seed=k)
        assert kernels.nibble_pack(lin) is not None
        for shape in ((1, d_in), (3, d_in), (1, 3, d_in)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
            with torch.no_grad():
                n = cpp_calls()
                y = lin(x)
                assert cpp_calls() == n + 1, "the C++ kernel was not used"
                with kernels.use_kernel("torch"):
                    ref = lin(x)
            assert sum(kernels.CALLS.values()) == cpp_calls(), dict(kernels.CALLS)
            assert y.shape == ref.shape == (*shape[:-1], d_out)
            err = float((y - ref).abs().max())
            assert err <= 1e-4 * float(ref.abs().max()), (gs, sym, shape, err)


def mask24(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """A random 2:4 mask: two kept inputs in every group of four."""
    r = torch.rand(d_out, d_in // 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.zeros_like(r, dtype=torch.bool).scatter_(2, r.topk(2, dim=2).indices, True).view(d_out, d_in)


def test_nm24_index_layout():
    """nm24_index is the layout int4_gemv.cpp reads: byte i of block b holds kept value 8 j + i's position in bits
    2 j."""
    col = mask24(3, 128).nonzero()[:, 1].view(3, 64)
    b = kernels.nm24_index(col).view(3, 2, 8).to(torch.int32)  # [n, block, i]
    back = torch.stack([(b >> (2 * j)) & 3 for j in range(4)], 2)  # [n, block, j, i]
    assert torch.equal(back.reshape(3, 64), (col % 4).to(torch.int32))


@needs_kernel
@pytest.mark.parametrize("N,K,gs", [(37, 64, 16), (64, 256, 32), (130, 576, 64)])
def test_int4_nm24_mm_matches_float64(N, K, gs):
    """The raw 2:4 kernel against float64 x W^T: 1..9 rows of x, 1 and 2 threads, asymmetric zeros."""
    g = torch.Generator().manual_seed(N)
    col = mask24(N, K, seed=N).nonzero()[:, 1].view(N, K // 2)
    codes = torch.randint(0, 16, (N, K // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand(N, K // gs, generator=g) * 0.02 + 1e-3).half().float()
    zero = torch.randint(0, 16, scale.shape, generator=g).float()
    gi = col // gs
    W = torch.zeros(N, K, dtype=torch.float64).scatter_(
        1, col, (codes.double() - zero.double().gather(1, gi)) * scale.double().gather(1, gi))
    vals, idx, sz = kernels.nibble_codes(codes), kernels.nm24_index(col), (scale * zero).contiguous()
    for M in range(1, 10):
        x = torch.randn(M, K, generator=g)
        ref = x.double() @ W.t()
        for threads in (1, 2):
            y = csrc.int4_nm24_mm(x, vals, idx, scale, sz, gs, threads=threads)
            assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (M, threads)


@needs_kernel
@pytest.mark.parametrize("d_in,d_out", SMOL_SHAPES)
def test_nm24_kernel_equals_torch_path_on_smollm2_shapes(d_in, d_out):
    """A 2:4 S with 4-bit values: as the dense test, through the 2:4 kernel."""
    groups = [gs for gs in (32, 64, 128) if d_in % gs == 0]
    for k, (gs, sym) in enumerate((gs, sym) for gs in groups for sym in (True, False)):
        lin = qlayer(d_in, d_out, gs, sym, rank=8, seed=k, mask=mask24(d_out, d_in, seed=k))
        assert lin.nm == (2, 4) and kernels.nibble_pack(lin).index is not None
        for shape in ((1, d_in), (3, d_in), (1, 3, d_in)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
            with torch.no_grad():
                n = kernels.CALLS["cpp-2:4-float32"]
                y = lin(x)
                assert kernels.CALLS["cpp-2:4-float32"] == n + 1, "the 2:4 kernel was not used"
                with kernels.use_kernel("torch"):
                    ref = lin(x)
            assert set(kernels.CALLS) == {"cpp-2:4-float32"}, dict(kernels.CALLS)
            err = float((y - ref).abs().max())
            assert err <= 1e-4 * float(ref.abs().max()), (gs, sym, shape, err)


@needs_kernel
def test_when_auto_takes_the_cpp_kernel():
    """auto: float32 and float16 activations at 1..AUTO_CPP_MAX_TOKENS tokens; not at more, not for bfloat16 ones
    (torch's kernel), not under bf16 or torch, nor for a layer it cannot take or a call that needs a gradient. Any
    d_out is fine (torch's kernel wants multiples of 16)."""
    lin = qlayer(128, 24, 32, sym=False, rank=4)
    with torch.no_grad():
        for t in range(1, kernels.AUTO_CPP_MAX_TOKENS + 1):
            lin(torch.randn(t, 128))
        assert cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS
        lin(torch.randn(kernels.AUTO_CPP_MAX_TOKENS + 1, 128))
        for mode in ("bf16", "torch"):
            with kernels.use_kernel(mode):
                lin(torch.randn(1, 128))
        assert cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS
        half = torch.rand(64, 128, generator=torch.Generator().manual_seed(1)) < 0.5
        m24 = mask24(64, 96)  # 2:4, but d_in not a multiple of 64
        for other in (qlayer(128, 64, 32, mask=half), qlayer(128, 64, 32, bits=8), qlayer(128, 64, 16),
                      qlayer(96, 64, 32, mask=m24)):
            assert kernels.nibble_pack(other) is None
            other(torch.randn(1, other.in_features))
        assert cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS
        set_strategy(lin, "dense-cached")
        lin(torch.randn(1, 128))
        set_strategy(lin, "auto")
        assert cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS
    x = torch.randn(1, 128, requires_grad=True)
    lin(x).sum().backward()
    assert cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS and x.grad is not None

    lin16 = qlayer(128, 64, 64, rank=4).half()
    x16 = torch.randn(2, 128).half()
    with torch.no_grad():
        y = lin16(x16)
        with kernels.use_kernel("torch"):
            ref = lin16(x16)
    assert y.dtype == torch.float16 and cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS + 1
    assert float((y.float() - ref.float()).abs().max()) <= 2e-3 * float(ref.float().abs().max())  # fp16 rounding
    lin16.bfloat16()
    with torch.no_grad():
        lin16(x16.bfloat16())
    assert cpp_calls() == kernels.AUTO_CPP_MAX_TOKENS + 1


@needs_kernel
@pytest.mark.parametrize("pattern,key", [(None, "cpp-float32"), ("2:4", "cpp-2:4-float32")])
def test_gptq_tiny_llama_same_logits_under_auto_and_torch(pattern, key):
    """A gptq 4-bit tiny llama (dense S, or 2:4): every linear runs the C++ kernel at decode, same logits."""
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = slr.CompressConfig(method="gptq", bits=4, group_size=32, pattern=pattern)
    slr.compress_(model, cfg, calib, progress=False)
    lins = [m for m in model.modules() if isinstance(m, QSLRLinear)]
    assert len(lins) == 14 and all(kernels.nibble_pack(m) is not None for m in lins)
    ids = torch.randint(3, 103, (2, 1), generator=torch.Generator().manual_seed(1))  # two sequences, one token
    with torch.no_grad():
        with kernels.use_kernel("torch"):
            ref = model(ids).logits
        assert not kernels.CALLS
        out = model(ids).logits
    assert kernels.CALLS == {key: 14}
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_unavailable_kernel_falls_back_with_one_line(monkeypatch, capsys):
    """No library: the torch path's (or torch's kernel's) numbers, and one line on stderr, once."""
    monkeypatch.setattr(csrc, "_tried", True)
    monkeypatch.setattr(csrc, "_lib", None)
    monkeypatch.setattr(csrc, "_reason", "not built (test)")
    monkeypatch.setattr(kernels, "_CPP_WARNED", False)
    lin = qlayer(128, 64, 32, rank=4)
    x = torch.randn(1, 128)
    with torch.no_grad():
        y, y2 = lin(x), lin(x)
        with kernels.use_kernel("torch"):
            ref = lin(x)
    assert cpp_calls() == 0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "C++ int4 kernel is unavailable (not built (test))" in err, err


def test_build_without_a_compiler_does_not_fail(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SLR_KERNEL_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    assert csrc.build() is None
    assert csrc_main(["--build"]) == 0
    err = capsys.readouterr().err
    assert err.count("no C++ compiler found") == 2 and not (tmp_path / "k").exists()


@pytest.mark.skipif(csrc.compiler() is None, reason="no C++ compiler")
def test_build_into_a_cache_folder(monkeypatch, tmp_path):
    """The install step's build, into an empty cache folder: one library named by the source's hash; a rebuild is
    a no-op."""
    monkeypatch.setenv("SLR_KERNEL_DIR", str(tmp_path))
    path = csrc.build()
    assert path is not None and path.parent == tmp_path and path.name.startswith("int4_gemv-")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    mtime = path.stat().st_mtime_ns
    assert csrc.build() == path and path.stat().st_mtime_ns == mtime
