"""Inference-only layers that keep the artifact's packed bytes in memory and run slr's C++ kernels on them.

``io.load`` (``packed=None``: when the C++ kernels are built, the device is the CPU, compute is float32 and the kernel
setting is not ``torch``) converts, after building each layer:

* a compressed linear whose S is quantized and dense or 2:4, or whose S is a 2:4 float16 one, into a
  ``PackedLinear``: a dense S with groups of 64k inputs (d_in a multiple of 64) at its own width, 2 or 3 bits a code
  (slr.lowbit's lane layouts) or 8 bits for 5-8-bit codes, with float16 scales; a 4-bit S (dense, groups of 32k; or
  2:4, groups of 16k, d_in a multiple of 64), and a 2- or 3-bit one the lanes do not take, as int4_gemv.cpp's
  nibbles with float32 scales; a float16 2:4 S as half floats; 2:4 with its 2-bit positions. Quantized factors stay
  codes (int8, or uint8 with their zero points; U in blocks of 8 rows), float ones float16 rows when the artifact
  stores them so, else float32; no CSR index, no float copy of S;
* the output head, and the input embedding, into rows at the width the artifact stores them (int8 with a row scale,
  or float16): ``PackedHead`` and ``RowsEmbedding``.

A call of at most ``DECODE_MAX_TOKENS`` tokens reads the packed bytes, S, factors and bias in one C++ call
(``slr_layer_mm``; decode, and short prompts); a longer one unpacks S into a float32 matrix once and runs one GEMM,
plus the two thin low-rank GEMMs (prefill: at 512 tokens the GEMM's arithmetic dwarfs the unpacking). The head does the
same below and above ``HEAD_MAX_TOKENS``. Both limits are the measured crossovers of benchmarks/prefill_rule.py. Under
``slr.kernels.use_kernel("torch")`` every layer computes the same products in pure torch from the same bytes
(``PackedLinear.unpacked(False)``, ``factors()``), so the numbers agree up to summation order. Under the ``q8``
setting a single-token call hands S, and an int8 head, int8 activations (``q8_activations``; ``takes_q8``), in the
kernel and in the torch path alike. These layers have no gradients and cannot be saved again: load with
``packed=False`` to fine-tune, re-save or export.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from . import csrc, kernels, lowbit
from .models.adapters import set_module
from .nn import SharedProjection, SLRLinear

# Up to these many tokens per call the C++ kernels (passes of 4 rows of x over the packed weights) beat unpacking and
# one GEMM, for every S layout (block linears) and for the int8 head (benchmarks/prefill_rule.py, 2 threads).
DECODE_MAX_TOKENS = 24
HEAD_MAX_TOKENS = 64
HEAD_SLICE = 8192  # output-head rows unpacked at a time at prefill
Q8_BLOCK = 64  # inputs per activation scale under the "q8" kernel setting (int4_gemv.cpp's Q8_BLOCK)


def enabled(device, dtype: torch.dtype) -> bool:
    """Whether ``io.load`` packs by default: the kernels are built and allowed, on the CPU, in float32."""
    return (kernels.get_kernel() != "torch" and torch.device(device).type == "cpu" and dtype == torch.float32
            and csrc.load() is not None)


def _use_cpp(x: torch.Tensor) -> bool:
    return kernels.get_kernel() != "torch" and x.dtype == torch.float32 and csrc.load() is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def q8_activations(x: torch.Tensor, block: int = Q8_BLOCK) -> torch.Tensor:
    """x [T, K] float32 as the "q8" kernels read it: per block of 64 inputs, d = max |x| / 127 and x^ = round(x / d) d
    (half to even; 0 for an all-zero block), in float32 as int4_gemv.cpp computes it."""
    xb = x.reshape(*x.shape[:-1], -1, block)  # [T, K/64, 64]
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, xb / torch.where(d > 0, d, 1), 0).round()
    return (q * d).reshape(x.shape)


def unnibble(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``kernels.nibble_codes``: uint8 [N, K/2] -> codes uint8 [N, K]."""
    N, H = packed.shape
    b = packed.reshape(N, H // 16, 8, 2)  # [N, block, i, (lo, hi) byte]
    c = torch.stack([b[..., 0] & 15, b[..., 0] >> 4, b[..., 1] & 15, b[..., 1] >> 4], 2)  # [N, block, j, i]
    return c.reshape(N, 2 * H)


def nm24_cols(index: torch.Tensor) -> torch.Tensor:
    """Inverse of ``kernels.nm24_index``: positions uint8 [N, K/8] -> columns int64 [N, K/2] of the kept values."""
    N, Q = index.shape
    b = index.reshape(N, Q // 8, 8).long()  # [N, block, i]
    pos = torch.stack([(b >> (2 * j)) & 3 for j in range(4)], 2)  # [N, block, j, i]
    kept = torch.arange(32).reshape(4, 8)  # kept value 8 j + i of a block
    base = 64 * torch.arange(Q // 8).reshape(-1, 1, 1) + 4 * (kept // 2)  # its group of four: 16 j + 4 (i // 2)
    return (base + pos).reshape(N, 4 * Q)


class PackedLinear(nn.Module):
    """y = x (S + U V)^T + b with S packed for slr's C++ kernels (see the module docstring). Buffers:

    * ``s_values``: uint8 nibbles [N, K/2] dense or [N, K/4] 2:4 (``bits`` 4), lane-packed codes [N, K/8 * bits]
      (``bits`` 2, 3 or 8; slr.lowbit), or float16 [N, K/2] 2:4; ``s_index``: uint8 [N, K/8] or None;
    * nibbles: ``s_scale``, ``s_sz`` float32 [N, K/g]; lanes: ``s_scale`` float16 [N, K/g] and ``s_zero`` uint8 zero
      points, or None for the one zero point ``zero_const`` of a symmetric grid; float16 values: none;
    * ``U`` in blocks of 8 rows [N/8, r, 8] (slr.lowbit.block8), ``V`` [r, K] (None with ``shared``): float16 /
      float32, or codes (slr.lowbit.factor_codes: int8 with scales only, or uint8 with scale * zero) with
      ``u_scale``, ``u_sz`` [r/gu, N] / ``v_scale``, ``v_sz`` [r, K/gv] float32 (sz None for int8); ``bias``.

    ``U`` and ``V`` are given as [N, r] / [r, K] (with ``u_q`` / ``v_q`` = (scale, sz, group) for codes, U's scales
    [N, r/gu]). Decode runs the whole layer in one kernel call."""

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, index: torch.Tensor | None,
                 scale: torch.Tensor | None, sz: torch.Tensor | None, group_size: int, U: torch.Tensor | None,
                 V: torch.Tensor | None, shared: SharedProjection | None, cid: int | None, bias: torch.Tensor | None,
                 *, bits: int = 4, u_q: tuple | None = None, v_q: tuple | None = None,
                 s_zero: torch.Tensor | None = None, zero_const: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.bits = in_features, out_features, group_size, bits
        self.zero_const = zero_const
        self.r = 0 if U is None else U.shape[1]
        self.u_group, self.v_group = (u_q or (0, 0, 0))[2], (v_q or (0, 0, 0))[2]
        us, uz = (u_q[0].t(), None if u_q[1] is None else u_q[1].t()) if u_q else (None, None)
        vs, vz = v_q[:2] if v_q else (None, None)
        for name, t in (("s_values", values), ("s_index", index), ("s_scale", scale), ("s_sz", sz), ("s_zero", s_zero),
                        ("U", None if U is None else lowbit.block8(U)), ("u_scale", us), ("u_sz", uz), ("V", V),
                        ("v_scale", vs), ("v_sz", vz), ("bias", bias)):
            self.register_buffer(name, None if t is None else t.contiguous())
        self.shared, self._cid = shared, cid

    @property
    def rank(self) -> int:
        return self.r

    def _s_kind(self) -> str:
        if self.s_values.dtype == torch.float16:
            return "float16-2:4"
        return ("nibble" if self.s_index is None else "nibble-2:4") if self.bits == 4 else f"lanes{self.bits}"

    def unpacked(self, use_cpp: bool = True) -> torch.Tensor:
        """S as a dense float32 [N, K] (C++ or, with ``use_cpp=False``, pure torch: the same values)."""
        N, K = self.out_features, self.in_features
        if use_cpp:
            return csrc.layer_unpack(self._layer()[0])
        if self.s_values.dtype == torch.float16:
            vals = self.s_values.float()
        else:
            codes = (unnibble(self.s_values) if self.bits == 4 else
                     lowbit.unlane(self.s_values, self.bits, K)).float()  # [N, K] or [N, K/2]
            grp = (torch.arange(K) // self.group_size if self.s_index is None else
                   nm24_cols(self.s_index) // self.group_size)  # the group of each value's input
            if self.bits != 4:  # lanes: (code - zero) scale, exact
                z = self.zero_const if self.s_zero is None else self.s_zero[:, grp].float()
                return (codes - z) * self.s_scale[:, grp].float()
            s, z = (self.s_scale[:, grp], self.s_sz[:, grp]) if self.s_index is None else (
                self.s_scale.gather(1, grp), self.s_sz.gather(1, grp))
            vals = torch.addcmul(-z, codes, s)  # fma(code, s, -sz) as the kernel rounds it (both products exact)
        if self.s_index is None:
            return vals
        return torch.zeros(N, K).scatter_(1, nm24_cols(self.s_index), vals)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U [N, r], V [r, K] or None when shared) in float32, dequantized as the kernel rebuilds them."""
        Ut = lowbit.unblock8(self.U, self.out_features).t()  # [r, N]
        U = (lowbit.dequant(Ut, self.u_scale, self.u_sz, self.u_group, 0) if self.u_scale is not None else
             Ut.float()).t()
        if self.V is None:
            return U, None
        return U, (lowbit.dequant(self.V, self.v_scale, self.v_sz, self.v_group, 1) if self.v_scale is not None else
                   self.V.float())

    def takes_q8(self) -> bool:
        """Whether S reads int8 activations under the "q8" kernel setting (int4_gemv.cpp's q8_takes)."""
        kind = self._s_kind()
        return kind in ("lanes2", "lanes3") or (kind == "nibble" and self.in_features % Q8_BLOCK == 0
                                    and self.group_size % Q8_BLOCK == 0)

    def _apply(self, fn, recurse=True):
        self._desc = None  # the buffers may move: rebuild the kernel's layer record
        return super()._apply(fn, recurse)

    def _layer(self):
        """(csrc.Layer over this module's buffers, its address, the same Layer with no S or None when r = 0): built
        once per set of buffers."""
        def kind(t, q):
            return csrc.ROWS_KINDS[t.dtype] if q is None else csrc.F_I8 if t.dtype == torch.int8 else csrc.F_U8

        p = _ptr
        L = csrc.Layer(K=self.in_features, N=self.out_features, skind=csrc.S_KINDS[self._s_kind()],
                       gs=self.group_size, s=p(self.s_values), idx=p(self.s_index), scale=p(self.s_scale),
                       sz=p(self.s_sz if self.bits == 4 else self.s_zero), r=self.r, bias=p(self.bias),
                       zc=self.zero_const)
        if self.r:
            L.ukind, L.u, L.uscale, L.usz, L.ugs = (kind(self.U, self.u_scale), p(self.U), p(self.u_scale),
                                                    p(self.u_sz), self.u_group)
            if self.V is None:
                L.vkind = csrc.F_GIVEN
            else:
                L.vkind, L.v, L.vscale, L.vsz, L.vgs = (kind(self.V, self.v_scale), p(self.V), p(self.v_scale),
                                                        p(self.v_sz), self.v_group)
        lr = None
        if self.r:  # the low-rank part alone (and the bias), for calls that run S as a GEMM
            lr = csrc.Layer.from_buffer_copy(L)
            lr.skind = csrc.S_KINDS["none"]
        self._desc = (L, ctypes.addressof(L), lr)
        return self._desc

    def _decode(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x2 [T, K] float32 contiguous -> y [T, N] by one kernel call: S, the low-rank part and the bias."""
        L, addr, _ = self.__dict__.get("_desc") or self._layer()
        L.act8 = kernels.get_kernel() == "q8"
        T = x2.shape[0]
        zp = None
        if self.shared is not None and self.r:  # z = x V^T from the shared projection
            z = self.shared(x, self._cid).reshape(T, self.r)
            z = z if z.dtype is torch.float32 and z.is_contiguous() else z.float().contiguous()
            zp = z.data_ptr()
        y = torch.empty(T, self.out_features)
        rc = csrc.load().slr_layer_mm(addr, x2.data_ptr(), T, zp, y.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"slr's C++ kernel refused a {tuple(x2.shape)} call: {csrc.ERRORS.get(rc, rc)}")
        kernels.CALLS["packed"] += 1
        return y

    def _lowrank(self, x2: torch.Tensor, x: torch.Tensor, cpp: bool) -> torch.Tensor:
        """x (U V)^T [T, N] (plus the bias with ``cpp``: the C++ kernel with no S, which reads the factors' codes in
        place; the torch path dequantizes them first)."""
        z = self.shared(x, self._cid).reshape(-1, self.r).float().contiguous() if self.V is None else None
        if cpp:
            return csrc.layer_mm((self.__dict__.get("_desc") or self._layer())[2], x2, z)
        U, V = self.factors()
        return F.linear(z if V is None else F.linear(x2, V), U)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # no gradients through packed bytes (a check, not a no_grad block: 2 us a call at decode)
            with torch.no_grad():
                return self.forward(x.detach())
        K = self.in_features
        x2 = x.view(-1, K) if x.is_contiguous() else x.reshape(-1, K)  # [T, K]
        if x2.dtype is not torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        cpp = _use_cpp(x2)
        if cpp and x2.shape[0] <= DECODE_MAX_TOKENS:
            y = self._decode(x2, x)  # [T, N], bias included
        else:
            q8 = x2.shape[0] == 1 and kernels.get_kernel() == "q8" and self.takes_q8()
            y = F.linear(q8_activations(x2) if q8 else x2, self.unpacked(cpp))
            if self.r:
                y += self._lowrank(x2, x, cpp)
            if self.bias is not None and not (cpp and self.r):
                y += self.bias
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype is torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        kind = {"float16-2:4": "float16 2:4", "nibble": f"4-bit dense g{self.group_size}",
                "nibble-2:4": f"4-bit 2:4 g{self.group_size}"}.get(self._s_kind(), f"{self.bits}-bit lanes "
                                                                              f"g{self.group_size}")
        fac = "" if not self.r else f", factors={self.U.dtype}{' codes' if self.u_scale is not None else ''}"
        sh = ", shared_v" if self.shared is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, S={kind}, rank={self.rank}"
                f"{fac}{sh}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _factor(t: torch.Tensor | None, stored: str) -> torch.Tensor | None:
    """A factor at the width the artifact stores it: float16 rows when stored as float16, else float32."""
    if t is None:
        return None
    return t.detach().to(torch.float16 if stored == "float16" else torch.float32).contiguous()


def _s_pack(lin: SLRLinear, spec, dtypes: dict):
    """(values, index, scale, sz, bits) of a loaded layer's S for the kernels (lanes: float16 scales and the zero
    codes or None in place of scale and sz), or None when it has none."""
    d_out, d_in = lin.out_features, lin.in_features
    if spec is not None:
        codes, sbits, zero = lin.qbuffers("S")
        width = lowbit.lane_width(spec.bits)
        if width is not None and d_in % lowbit.LANE_BLOCK == 0 and spec.group_size % lowbit.LANE_BLOCK == 0 \
                and codes.device.type == "cpu" and kernels._is_dense(lin):
            lanes = lowbit.lane_codes(codes.view(d_out, d_in), width)
            return lanes, None, sbits.contiguous().view(torch.float16), zero, width
        pack = kernels.cpp_pack(lin, spec, codes, sbits, zero) if spec.bits <= 4 else None
        return None if pack is None else (pack.weight, pack.index, pack.scale, pack.sz, 4)
    if dtypes.get("values") == "float16" and d_in % 64 == 0 and kernels.is_nm24(lin):
        values = lin.values.detach().to(torch.float16).view(d_out, d_in // 2)
        return values, kernels.nm24_index(lin.col.view(d_out, d_in // 2)), None, None, 4
    return None


def pack_layer(lin: SLRLinear, dtypes: dict) -> PackedLinear | None:
    """The PackedLinear of a loaded layer, or None when its S has no kernel (see the module docstring)."""
    spec = getattr(lin, "qspecs", {}).get("S")
    if lin.crow is None:
        return None
    with torch.no_grad():
        s = _s_pack(lin, spec, dtypes)
        if s is None:
            return None
        values, index, scale, sz, bits = s
        lanes = {} if bits == 4 else {"s_zero": sz, "zero_const": 2 ** (spec.bits - 1) if sz is None else 0}
        sz = None if bits != 4 else sz
        fac = dtypes.get("factors", "float32")
        qs = getattr(lin, "qspecs", {})
        U = V = u_q = v_q = None
        dq = lin.dq_scope() if hasattr(lin, "dq_scope") else torch.no_grad()
        with dq:
            if lin.U is not None:  # quantized factors stay codes; others float at their stored width
                uc = lowbit.factor_codes(lin, "U")
                U, u_q = (uc[0].t(), (uc[1].t(), None if uc[2] is None else uc[2].t(), uc[3])) if uc else (
                    _factor(lin.U, "float32" if "U" in qs else fac), None)
                if lin.shared is None:
                    vc = lowbit.factor_codes(lin, "V")
                    V, v_q = (vc[0], vc[1:]) if vc else (_factor(lin.V, "float32" if "V" in qs else fac), None)
        bias = None if lin.bias is None else lin.bias.detach().float()
    return PackedLinear(lin.in_features, lin.out_features, values.contiguous(), index, scale, sz,
                        spec.group_size if spec else 0, U, V, lin.shared, lin._cid, bias, bits=bits, u_q=u_q, v_q=v_q,
                        **lanes)


class PackedHead(nn.Module):
    """The output head x W^T read at its stored width: ``rows`` int8 [V, D] with ``row_scale`` float32 [V], or
    float16 [V, D]. ``weight`` is a zero-stride float32 stand-in of W's shape (for code that reads its dtype or
    shape); the logits come from ``rows``."""

    def __init__(self, rows: torch.Tensor, row_scale: torch.Tensor | None, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("rows", rows.contiguous())
        self.register_buffer("row_scale", None if row_scale is None else row_scale.float().contiguous())
        self.register_buffer("bias", bias)
        self.register_buffer("weight", torch.zeros(1, 1).expand(rows.shape), persistent=False)
        self.in_features, self.out_features = rows.shape[1], rows.shape[0]

    def dense(self, i: int = 0, j: int | None = None) -> torch.Tensor:
        """Rows i:j of W in float32."""
        w = self.rows[i:j].float()
        return w if self.row_scale is None else w * self.row_scale[i:j, None]

    def takes_q8(self) -> bool:
        """Whether the head reads int8 activations under the "q8" kernel setting (int8 rows, d a multiple of 64)."""
        return self.rows.dtype == torch.int8 and self.in_features % Q8_BLOCK == 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x.float())
        q8 = x2.shape[0] == 1 and kernels.get_kernel() == "q8" and self.takes_q8()
        if _use_cpp(x2) and x2.shape[0] <= HEAD_MAX_TOKENS:
            y = csrc.rows_mm(x2, self.rows, self.row_scale, q8=q8)
            kernels.CALLS["head"] += 1
        else:  # many tokens: a GEMM per slice of the vocabulary (a float32 copy of one slice at a time)
            V, step, xs = self.out_features, HEAD_SLICE, q8_activations(x2) if q8 else x2
            y = torch.cat([F.linear(xs, self.dense(i, i + step)) for i in range(0, V, step)], 1)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class RowsEmbedding(nn.Embedding):
    """An input embedding that looks its rows up in ``rows`` (int8 times ``row_scale``, or float16) and returns them
    in float32. Placed before nn.Embedding in a model's own embedding class (``as_rows_embedding_``), so that a
    subclass's forward (Gemma's scaling) still runs around the lookup."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.rows).float()
        return out if self.row_scale is None else out * self.row_scale[ids].unsqueeze(-1)


def as_rows_embedding_(emb: nn.Embedding, rows: torch.Tensor, row_scale: torch.Tensor | None) -> None:
    """Turn ``emb`` into a RowsEmbedding over ``rows`` in place (its float weight is dropped)."""
    cls = type(emb)
    if cls is not nn.Embedding and not issubclass(cls, RowsEmbedding):
        emb.__class__ = type(f"Rows{cls.__name__}", (cls, RowsEmbedding), {})
    elif cls is nn.Embedding:
        emb.__class__ = RowsEmbedding
    emb._parameters.pop("weight", None)
    emb.register_buffer("rows", rows.contiguous())
    emb.register_buffer("row_scale", None if row_scale is None else row_scale.float().contiguous())
    emb.register_buffer("weight", torch.zeros(1, 1).expand(rows.shape), persistent=False)


def embedding_weights(model: nn.Module, holders: dict) -> set[str]:
    """Names of the input embedding's and output head's weights (aliases included)."""
    mods = [getattr(model, g)() for g in ("get_input_embeddings", "get_output_embeddings") if hasattr(model, g)]
    return {n for n, (mod, leaf, _) in holders.items() if leaf == "weight" and any(mod is m for m in mods if m)}


def pack_rows_(model: nn.Module, holders: dict, rows: dict, tied: dict) -> None:
    """Embeddings and heads over the rows kept at their stored width (``load(packed=True)``)."""
    for name, src in [(k, k) for k in rows] + [(a, s) for a, s in tied.items() if s in rows and a in holders]:
        mod = holders[name][0]
        if isinstance(mod, nn.Embedding):
            as_rows_embedding_(mod, *rows[src])
        elif isinstance(mod, nn.Linear):
            bias = None if mod.bias is None or mod.bias.device.type == "meta" else mod.bias.detach()
            set_module(model, name.rsplit(".", 1)[0], PackedHead(*rows[src], bias))

PACKED_TYPES = (PackedLinear, PackedHead, RowsEmbedding)  # inference-only modules (io.save refuses them)
