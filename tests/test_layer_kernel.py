"""slr_layer_mm / slr_layer_unpack (one call per layer) and slr.lowbit's layouts: the lane layouts are the bytes
int4_gemv.cpp reads, the C++ unpack of every S layout equals PackedLinear's pure-torch unpack and the dequantized S
bit for bit, and a layer's output (S of every layout, factors of every kind, bias) matches float64 within 1e-4 of
max|y| on SmolLM2's shapes, for 1-6 rows of x, and the torch fallback's."""

from __future__ import annotations

import pytest
import torch
from test_cpp_kernel import mask24
from test_kernels import SMOL_SHAPES

from slr import csrc, kernels, lowbit, packed

pytestmark = pytest.mark.skipif(csrc.load() is None, reason=f"slr's C++ kernels are unavailable: {csrc.reason()}")
GEN = torch.Generator().manual_seed(0)
S_LAYOUTS = ["nibble", "nibble-2:4", "float16-2:4", "lanes2", "lanes3", "lanes8"]
FACTORS = ["none", "float16", "float32", "int8", "uint8", "shared"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_lane_layout():
    """Code 8 J + i of a 64-code block is field J of lane i: bits w J of lane i's little-endian w-bit... word."""
    for width in (2, 3, 8):
        codes = torch.randint(0, 2 ** width, (3, 128), generator=GEN, dtype=torch.uint8)
        lanes = lowbit.lane_codes(codes, width)
        assert lanes.shape == (3, 128 // 8 * width) and torch.equal(lowbit.unlane(lanes, width, 128), codes)
        if width == 8:
            assert torch.equal(lanes, codes)
            continue
        blk = lanes[1, 8 * width:16 * width].long()  # block 1 of row 1
        for i in range(8):
            word = sum(int(blk[width * i + t]) << (8 * t) for t in range(width))
            for J in range(8):
                assert (word >> (width * J)) & (2 ** width - 1) == int(codes[1, 64 + 8 * J + i])


def make_layer(layout: str, factors: str, N: int, K: int, r: int = 7, g: int = 64, bias: bool = True,
               sym: bool = False):
    """A PackedLinear with random codes of ``layout`` and factors of kind ``factors``, and its float64 (S, U, V)."""
    bits = {"lanes2": 2, "lanes3": 3, "lanes8": 8}.get(layout, 4)
    scale = ((torch.rand(N, K // g, generator=GEN) + 0.1) * 0.05).half().float()  # fp16 values, as stored
    zero = torch.randint(0, 2 ** bits, (N, K // g), generator=GEN).float()
    codes = torch.randint(0, 2 ** bits, (N, K), generator=GEN, dtype=torch.uint8)
    S = (codes.double() - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)
    index, lanes = None, {}
    if layout == "float16-2:4":
        m = mask24(N, K)
        cols = m.nonzero()[:, 1].view(N, K // 2)
        S = (torch.randn(N, K, generator=GEN).half().double() * m)
        values, index, scale, sz = S.gather(1, cols).half(), kernels.nm24_index(cols), None, None
    elif layout == "nibble-2:4":
        m = mask24(N, K)
        cols = m.nonzero()[:, 1].view(N, K // 2)
        S = S * m
        values, index, sz = kernels.nibble_codes(codes.gather(1, cols)), kernels.nm24_index(cols), scale * zero
    elif bits == 4:
        values, sz = kernels.nibble_codes(codes), scale * zero
    else:  # lanes: float16 scales, uint8 zero points (or, symmetric, one zero point)
        values, sz = lowbit.lane_codes(codes, bits), None
        lanes = {"s_zero": zero.to(torch.uint8)} if sym is False else {"zero_const": 2 ** (bits - 1)}
        if sym:
            S = (codes.double() - 2 ** (bits - 1)) * scale.double().repeat_interleave(g, 1)
        scale = scale.half()
    U = V = u_q = v_q = shared = None
    Ud = Vd = None
    if factors != "none":
        gu, gv = r, 64
        if factors in ("int8", "uint8"):
            uc = torch.randint(0, 256, (N, r), generator=GEN, dtype=torch.uint8)
            vc = torch.randint(0, 256, (r, K), generator=GEN, dtype=torch.uint8)
            us, vs = (torch.rand(N, r // gu, generator=GEN) * 1e-3).half().float(), \
                (torch.rand(r, K // gv, generator=GEN) * 1e-2).half().float()
            if factors == "int8":
                U, V = (uc.short() - 128).to(torch.int8), (vc.short() - 128).to(torch.int8)
                u_q, v_q = (us, None, gu), (vs, None, gv)
                Ud, Vd = U.double() * us.double(), V.double() * vs.double().repeat_interleave(gv, 1)
            else:
                uz, vz = torch.randint(0, 256, (N, 1), generator=GEN).float(), \
                    torch.randint(0, 256, (r, K // gv), generator=GEN).float()
                U, V, u_q, v_q = uc, vc, (us, us * uz, gu), (vs, vs * vz, gv)
                Ud = (uc.double() - uz.double()) * us.double()
                Vd = (vc.double() - vz.double().repeat_interleave(gv, 1)) * vs.double().repeat_interleave(gv, 1)
        else:
            dt = torch.float16 if factors == "float16" else torch.float32
            U, V = (torch.randn(N, r, generator=GEN) * 0.05).to(dt), (torch.randn(r, K, generator=GEN) * 0.05).to(dt)
            Ud, Vd = U.double(), V.double()
            if factors == "shared":
                shared = SharedStub(V.float())
                V = None
    b = torch.randn(N, generator=GEN) if bias else None
    lin = packed.PackedLinear(K, N, values, index, scale, sz, g if layout != "float16-2:4" else 0, U, V, shared,
                              0 if shared else None, b, bits=bits, u_q=u_q, v_q=v_q, **lanes)
    return lin, S, Ud, Vd, b


class SharedStub(torch.nn.Module):
    """A shared projection's call signature: z = x V^T for consumer ``cid``."""

    def __init__(self, V: torch.Tensor):
        super().__init__()
        self.V = V

    def forward(self, x: torch.Tensor, cid: int) -> torch.Tensor:
        return x.float() @ self.V.t()


@pytest.mark.parametrize("layout,sym", [(lay, False) for lay in S_LAYOUTS] + [(f"lanes{b}", True) for b in (2, 3, 8)])
def test_unpack_equals_the_torch_fallback_and_the_dequantized_s(layout, sym):
    lin, S, *_ = make_layer(layout, "none", 96, 256, sym=sym)
    a, b = lin.unpacked(True), lin.unpacked(False)
    assert torch.equal(a, b) and torch.equal(a.double(), S)


# every layout with no factors and int8 ones on every shape; the other factor kinds (the same code) on one
# (and the lanes' symmetric form, and rows that are not a multiple of 8, on one shape)
COMBOS = [(lay, f, *s, False) for lay in S_LAYOUTS for f in FACTORS for s in SMOL_SHAPES
          if f in ("none", "int8") or s == (576, 1536)] + [
    (f"lanes{b}", "int8", 576, 1536, True) for b in (2, 3, 8)] + [("lanes3", f, 128, 100, False) for f in FACTORS]


@pytest.mark.parametrize("layout,factors,d_in,d_out,sym", COMBOS)
def test_layer_matches_float64_and_the_fallback(layout, factors, d_in, d_out, sym):
    lin, S, Ud, Vd, b = make_layer(layout, factors, d_out, d_in, sym=sym)
    for M in (1, 2, 3, 4, 6, packed.DECODE_MAX_TOKENS + 1):  # the last: unpacked S and one GEMM
        x = torch.randn(M, d_in, generator=GEN)
        want = x.double() @ S.t() + b.double()
        if Ud is not None:
            want += (x.double() @ Vd.t()) @ Ud.t()
        prev = torch.get_num_threads()
        for threads in (1, 2):  # 2: each thread computes its own z = x V^T (no barrier)
            torch.set_num_threads(threads)
            kernels.CALLS.clear()
            try:
                with kernels.use_kernel("auto"):
                    got = lin(x)
            finally:
                torch.set_num_threads(prev)
            assert kernels.CALLS["packed"] == (M <= packed.DECODE_MAX_TOKENS)
            assert rel(got, want) < 1e-4, (M, threads, rel(got, want))
        with kernels.use_kernel("torch"):
            assert rel(lin(x), want) < 1e-5
    if Ud is not None:
        U, V = lin.factors()
        assert torch.equal(U.double(), Ud) and (V is None or torch.equal(V.double(), Vd))


def test_layer_mm_refuses_what_it_does_not_take():
    lin, *_ = make_layer("lanes3", "int8", 64, 128)
    L = lin._layer()[0]
    x = torch.randn(1, 128)
    assert csrc.layer_mm(L, x).shape == (1, 64)
    L.gs = 32  # a lane layout needs groups of 64k inputs
    with pytest.raises(RuntimeError, match="refused"):
        csrc.layer_mm(L, x)
    with pytest.raises(ValueError):
        csrc.layer_mm(lin._layer()[0], torch.randn(1, 64))


@pytest.mark.parametrize("layout,sym", [("nibble", False), ("lanes2", False), ("lanes2", True), ("lanes3", False),
                                        ("lanes3", True), ("lanes8", False), ("nibble-2:4", False)])
@pytest.mark.parametrize("d_in,d_out", SMOL_SHAPES)
def test_q8_activations_kernel_matches_its_torch_emulation(monkeypatch, layout, sym, d_in, d_out):
    """Under the "q8" setting a one-token call hands a nibble, 2- or 3-bit S int8 activations (blocks of 64 inputs, an
    all-zero block and an outlier included), in the kernel and the torch path alike; the factors, the bias, other
    layouts and calls of more tokens stay float32."""
    lin, S, Ud, Vd, b = make_layer(layout, "int8", d_out, d_in, sym=sym)
    x = torch.randn(1, d_in, generator=GEN)
    x[0, 64:128] = 0
    x[0, 3] = 300.0
    lowrank = (x.double() @ Vd.t()) @ Ud.t() + b.double()
    xq = packed.q8_activations(x)
    d = (x.view(-1, 64).abs().amax(1) / 127).repeat_interleave(64)
    assert ((xq - x).abs() <= d / 2 + 1e-6).all() and (xq[0, 64:128] == 0).all()
    steps = xq / torch.where(d > 0, d, 1)
    assert ((steps - steps.round()).abs() < 1e-3).all() and (steps.abs().max() - 127).abs() < 1e-3  # int8 grid
    taken = layout in ("nibble", "lanes2", "lanes3")
    assert lin.takes_q8() == taken
    want = (xq if taken else x).double() @ S.t() + lowrank
    with kernels.use_kernel("q8"):
        kernels.CALLS.clear()
        got = lin(x)
        assert kernels.CALLS["packed"] == 1
        assert rel(got, want) < 1e-4
        monkeypatch.setattr(packed, "_use_cpp", lambda x: False)
        assert rel(lin(x), want) < 1e-5
        monkeypatch.undo()
        x2 = torch.cat([x, x])  # two tokens: float activations
        assert rel(lin(x2)[1], x.double()[0] @ S.t() + lowrank[0]) < 1e-4
    plain = x.double() @ S.t() + lowrank
    assert (rel(got, plain) > 1e-4) == taken  # the int8 activations are really used


def test_packed_layer_takes_no_gradient():
    """An x that requires grad gives the same y, with no graph behind it (kernel and torch path)."""
    lin, *_ = make_layer("lanes2", "int8", 64, 128)
    x = torch.randn(1, 1, 128, generator=GEN)
    for mode in ("auto", "torch"):
        with kernels.use_kernel(mode):
            y = lin(x.clone().requires_grad_())
            assert not y.requires_grad and y.grad_fn is None and torch.equal(y, lin(x))
