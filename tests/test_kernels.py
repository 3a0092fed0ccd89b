"""slr.kernels: a dense 4-bit S runs as torch's CPU int4 GEMM with the torch path's numbers, when and only when it
should, with its pack cached like the dense weight; a gptq 4-bit tiny model keeps its logits and the kernel across
io.save -> io.load, and `slr generate --kernel` selects it. slr's own C++ kernel (which "auto" prefers at decode) is
switched off here, except where a test says so; tests/test_cpp_kernel.py tests it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import slr
from slr import io, kernels
from slr.cli import main
from slr.models.tiny import tiny_model
from slr.nn import QSLRLinear, set_strategy
from slr.quant import QuantSpec, dequantize
from slr.solvers.base import SolveResult

pytestmark = [pytest.mark.skipif(not kernels.HAVE_INT4, reason="this torch build has no CPU int4 kernel"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]

SMOL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (d_in, d_out) of SmolLM2's linears


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setattr(kernels, "AUTO_CPP_MAX_TOKENS", 0)  # torch's kernel, not slr's C++ one
    with kernels.use_kernel("auto"):
        kernels.CALLS.clear()
        yield


def qlayer(d_in, d_out, gs, sym=True, rank=0, seed=0, bits=4, mask=None):
    """A QSLRLinear from a solver-like result: random codes, fp16 scales (and zeros), optional rank-r factors."""
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, gs, sym)
    codes = torch.randint(0, 2**bits, (d_out, d_in), generator=g, dtype=torch.uint8)
    scale = (torch.rand(d_out, d_in // gs, generator=g) * 0.02 + 1e-3).half().float()
    zero = (torch.full_like(scale, 2.0 ** (bits - 1)) if sym
            else torch.randint(0, 2**bits, scale.shape, generator=g).float())
    S = dequantize(codes, scale, zero, spec)
    mask = torch.ones(d_out, d_in, dtype=torch.bool) if mask is None else mask
    U = torch.randn(d_out, rank, generator=g) * 0.1 if rank else None
    V = torch.randn(rank, d_in, generator=g) * 0.1 if rank else None
    res = SolveResult(S=S * mask, mask=mask, U=U, V=V, qparams={"S": (scale, zero)}, qspec={"S": spec})
    return QSLRLinear.from_result(res, bias=torch.randn(d_out, generator=g))


def calls() -> int:
    return sum(kernels.CALLS.values())


def test_op_convention():
    """What slr.kernels relies on: w = (q - 8) scale + zero per group, scales_and_zeros [K/g, N, 2]."""
    g = torch.Generator().manual_seed(0)
    N, K, gs = 32, 128, 32
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    sz = torch.stack([torch.rand(K // gs, N, generator=g) + 0.5, torch.randn(K // gs, N, generator=g)], -1)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    x = torch.randn(3, K, generator=g)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, gs, sz.contiguous())
    gi = torch.arange(K) // gs
    W = (q.double() - 8) * sz[..., 0].t().double()[:, gi] + sz[..., 1].t().double()[:, gi]
    torch.testing.assert_close(y.double(), x.double() @ W.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_in,d_out", SMOL_SHAPES)
def test_kernel_equals_torch_path_on_smollm2_shapes(d_in, d_out, monkeypatch):
    """Batch 1 and 7 (one and seven tokens per call), groups 32/64/128, symmetric and asymmetric grids, with and
    without rank-8 factors: max |kernel - torch path| <= 1e-4 max |y|, and the kernel ran for every call. (128 does
    not divide 576, so a 576-input layer cannot have groups of 128.)"""
    monkeypatch.setattr(kernels, "AUTO_FP32_MAX_TOKENS", 64)  # the float32 kernel also for the batch-7 calls
    groups = [gs for gs in (32, 64, 128) if d_in % gs == 0]
    for k, (gs, sym, rank) in enumerate((gs, sym, r) for gs in groups for sym in (True, False) for r in (0, 8)):
        lin = qlayer(d_in, d_out, gs, sym, rank, seed=k)
        assert kernels.int4_pack(lin) is not None
        for shape in ((1, d_in), (7, d_in), (1, 7, d_in)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
            with torch.no_grad():
                n = calls()
                y = lin(x)
                assert calls() == n + 1, "the int4 kernel was not used"
                with kernels.use_kernel("torch"):
                    ref = lin(x)
                assert calls() == n + 1, "the torch setting used the kernel"
            assert y.shape == ref.shape == (*shape[:-1], d_out)
            err = float((y - ref).abs().max())
            assert err <= 1e-4 * float(ref.abs().max()), (gs, sym, rank, shape, err)


def test_settings_and_dtypes():
    """auto: float32 kernel only up to AUTO_FP32_MAX_TOKENS tokens, bfloat16 activations always (in bfloat16);
    bf16: float32 activations through the bfloat16 kernel; torch: never."""
    lin = qlayer(576, 192, 64, sym=False, rank=8)
    x1, x7 = torch.randn(1, 576), torch.randn(7, 576)
    with torch.no_grad():
        lin(x1)
        assert kernels.CALLS == {"int4-float32": 1}
        lin(x7)  # above the float32 threshold: the torch path
        assert kernels.CALLS == {"int4-float32": 1}
        with kernels.use_kernel("torch"):
            ref = lin(x7)
        with kernels.use_kernel("bf16"):
            y = lin(x7)
        assert kernels.CALLS == {"int4-float32": 1, "int4-bfloat16": 1} and y.dtype == torch.float32
        assert float((y - ref).abs().max()) <= 2e-2 * float(ref.abs().max())  # bfloat16 accuracy
        lin.to(torch.bfloat16)
        xb = x7.bfloat16()
        yb = lin(xb)
        assert kernels.CALLS["int4-bfloat16"] == 2 and yb.dtype == torch.bfloat16
        with kernels.use_kernel("torch"):
            refb = lin(xb)
        assert float((yb.float() - refb.float()).abs().max()) <= 2e-2 * float(refb.float().abs().max())
    with pytest.raises(slr.SLRError, match="unknown kernel setting"):
        kernels.set_kernel("cuda")
    assert kernels.get_kernel() == "auto"


def test_layers_the_kernel_does_not_take():
    """Sparse S, 8 bits, group 16, d_out not a multiple of 16, dense-cached, and a call that needs x's gradient all
    take the torch path (silently)."""
    half = torch.rand(64, 128, generator=torch.Generator().manual_seed(1)) < 0.5
    for lin in (qlayer(128, 64, 32, mask=half), qlayer(128, 64, 32, bits=8), qlayer(128, 64, 16),
                qlayer(128, 24, 32)):
        assert kernels.int4_pack(lin) is None
        with torch.no_grad():
            lin(torch.randn(1, 128))
    assert calls() == 0
    lin = qlayer(128, 64, 32, rank=4)
    set_strategy(lin, "dense-cached")
    with torch.no_grad():
        lin(torch.randn(1, 128))
    assert calls() == 0
    set_strategy(lin, "auto")
    x = torch.randn(1, 128, requires_grad=True)
    lin(x).sum().backward()
    assert calls() == 0 and x.grad is not None
    with torch.no_grad():
        lin(x)
    assert calls() == 1


def test_pack_is_cached_and_invalidated():
    lin = qlayer(128, 64, 32, sym=False, rank=4)
    x = torch.randn(1, 128)
    p = kernels.int4_pack(lin)
    assert kernels.int4_pack(lin) is p  # built once
    with torch.no_grad():
        lin.qS_codes[:128] = 15 - lin.qS_codes[:128]  # in place: the version counter changes
        y = lin(x)
        with kernels.use_kernel("torch"):
            ref = lin(x)
    assert kernels.int4_pack(lin) is not p
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    lin.clear_cache()
    assert lin._i4_cache is None
    kernels.int4_pack(lin)
    for other in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert other._i4_cache is None
        with torch.no_grad():
            torch.testing.assert_close(other(x), ref, rtol=1e-5, atol=1e-5)
    assert calls() == 3


def _gptq_tiny():
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    slr.compress_(model, slr.CompressConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    lins = [m for m in model.modules() if isinstance(m, QSLRLinear)]
    assert len(lins) == 14 and all(kernels.int4_pack(m) is not None for m in lins)
    return model


def test_gptq_tiny_llama_same_logits_and_kernel_after_save_load(tmp_path, monkeypatch):
    model = _gptq_tiny()
    ids = torch.randint(3, 103, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with kernels.use_kernel("torch"):
            ref = model(ids).logits
        assert calls() == 0
        out = model(ids).logits
    assert calls() == 14
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    io.save(model, tmp_path / "art")
    back, _ = io.load(tmp_path / "art", packed=False)  # QSLRLinear layers (tests/test_packed.py: packed ones)
    with torch.no_grad():
        kernels.CALLS.clear()
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert calls() == 14, "the loaded model does not use the kernel"
        monkeypatch.setattr(kernels, "AUTO_FP32_MAX_TOKENS", 64)
        seq = torch.randint(3, 103, (2, 9), generator=torch.Generator().manual_seed(2))
        with kernels.use_kernel("torch"):
            ref = back(seq).logits
        kernels.CALLS.clear()
        torch.testing.assert_close(back(seq).logits, ref, rtol=1e-5, atol=1e-5)
        assert calls() == 14


@pytest.mark.parametrize("cpp", [False, True])
def test_cli_generate_kernel_flag(capsys, tmp_path, monkeypatch, cpp):
    """`slr generate DIR --kernel auto|torch`: same greedy text; decode steps use a kernel only under auto (torch's,
    or slr's C++ one where it is built)."""
    if cpp:
        monkeypatch.setattr(kernels, "AUTO_CPP_MAX_TOKENS", 4)
    from test_cli import make_hf_folder

    make_hf_folder(tmp_path / "src")
    model, tok, _ = slr.load_model(str(tmp_path / "src"))
    calib = torch.randint(3, 103, (4, 32), generator=torch.Generator().manual_seed(0))
    slr.compress_(model, slr.CompressConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    slr.save(model, tmp_path / "art", tokenizer=tok)
    texts = {}
    for k in ("torch", "auto"):
        kernels.CALLS.clear()
        code = main(["generate", str(tmp_path / "art"), "w1 w2 w3", "--max-new-tokens", "4", "--device", "cpu",
                     "--kernel", k])
        out, err = capsys.readouterr()
        assert code == 0, err
        texts[k] = out
        assert (calls() > 0) == (k == "auto"), (k, dict(kernels.CALLS))
    assert texts["auto"] == texts["torch"] and texts["auto"].startswith("w1 w2 w3")
    assert kernels.get_kernel() == "auto"  # the flag does not outlive the command
