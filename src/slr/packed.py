"""Inference-only layers that keep the artifact's packed bytes in memory and run slr's C++ kernels on them.

``io.load`` (``packed=None``: when the C++ kernels are built, the device is the CPU, compute is float32 and the kernel
setting is not ``torch``) converts, after building each layer:

* a compressed linear whose S is quantized at 2-4 bits and dense (groups of 32k inputs) or 2:4 (groups of 16k,
  d_in a multiple of 64), or whose S is a 2:4 float16 one, into a ``PackedLinear``: S as int4_gemv.cpp's nibbles
  (2- and 3-bit codes too: a code below 16 fits a nibble) or half floats, with the 2-bit positions of a 2:4 S; the
  factors as float16 rows when the artifact stores them so, else float32; no CSR index, no float copy of S;
* the output head, and the input embedding, into rows at the width the artifact stores them (int8 with a row scale,
  or float16): ``PackedHead`` and ``RowsEmbedding``.

A call of at most ``DECODE_MAX_TOKENS`` tokens reads the packed bytes (decode); a longer one unpacks S into a float32
matrix once and runs one GEMM (prefill: at 512 tokens the GEMM's arithmetic dwarfs the unpacking). Under
``slr.kernels.use_kernel("torch")`` every layer computes the same products in pure torch from the same bytes
(``torch_unpack``), so the numbers agree up to summation order. These layers have no gradients and cannot be saved
again: load with ``packed=False`` to fine-tune, re-save or export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import csrc, kernels
from .models.adapters import set_module
from .nn import SharedProjection, SLRLinear

DECODE_MAX_TOKENS = 4  # the kernels' rows of x per pass over the weights (int4_gemv.cpp MAX_M)
HEAD_SLICE = 8192  # output-head rows unpacked at a time at prefill


def enabled(device, dtype: torch.dtype) -> bool:
    """Whether ``io.load`` packs by default: the kernels are built and allowed, on the CPU, in float32."""
    return (kernels.get_kernel() != "torch" and torch.device(device).type == "cpu" and dtype == torch.float32
            and csrc.load() is not None)


def _use_cpp(x: torch.Tensor) -> bool:
    return kernels.get_kernel() != "torch" and x.dtype == torch.float32 and csrc.load() is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


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
    """y = x (S + U V)^T + b with S packed for slr's C++ kernels (see the module docstring). Buffers: ``s_values``
    (uint8 nibbles [N, K/2] dense or [N, K/4] 2:4, or float16 [N, K/2] 2:4), ``s_index`` (uint8 [N, K/8] or None),
    ``s_scale``, ``s_sz`` (float32 [N, K/g], 4-bit only), ``U`` [N, r], ``V`` [r, K] (None with ``shared``),
    ``bias``."""

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, index: torch.Tensor | None,
                 scale: torch.Tensor | None, sz: torch.Tensor | None, group_size: int, U: torch.Tensor | None,
                 V: torch.Tensor | None, shared: SharedProjection | None, cid: int | None, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        for name, t in (("s_values", values), ("s_index", index), ("s_scale", scale), ("s_sz", sz), ("U", U), ("V", V),
                        ("bias", bias)):
            self.register_buffer(name, None if t is None else t.contiguous())
        self.shared, self._cid = shared, cid

    @property
    def rank(self) -> int:
        return 0 if self.U is None else self.U.shape[1]

    def unpacked(self, use_cpp: bool = True) -> torch.Tensor:
        """S as a dense float32 [N, K] (C++ or, with ``use_cpp=False``, pure torch: the same values)."""
        N, K = self.out_features, self.in_features
        if use_cpp:
            return csrc.unpack(N, K, values=self.s_values, index=self.s_index, scale=self.s_scale, sz=self.s_sz,
                               group_size=self.group_size)
        if self.s_values.dtype == torch.float16:
            vals = self.s_values.float()
        else:
            codes = unnibble(self.s_values).float()  # [N, K] or [N, K/2]
            grp = (torch.arange(K) // self.group_size if self.s_index is None else
                   nm24_cols(self.s_index) // self.group_size)  # the group of each value's input
            s, z = (self.s_scale[:, grp], self.s_sz[:, grp]) if self.s_index is None else (
                self.s_scale.gather(1, grp), self.s_sz.gather(1, grp))
            vals = torch.addcmul(-z, codes, s)  # fma(code, s, -sz) as the kernel rounds it (both products exact)
        if self.s_index is None:
            return vals
        return torch.zeros(N, K).scatter_(1, nm24_cols(self.s_index), vals)

    def _apply(self, fn, recurse=True):
        self._calls = None  # the buffers may move: rebuild the kernel calls
        return super()._apply(fn, recurse)

    def _kernel_calls(self):
        """((S's kernel, its pointer arguments), the low-rank part's (V's pointer and rows kind, or None when V is
        shared; U's; r; N) or None, K): built once per set of buffers."""
        lib, K, N = csrc.load(), self.in_features, self.out_features
        if self.s_values.dtype == torch.float16:
            s = (lib.slr_f16_nm24_mm, (self.s_values.data_ptr(), self.s_index.data_ptr(), N))
        elif self.s_index is None:
            s = (lib.slr_int4_mm, (self.s_values.data_ptr(), self.s_scale.data_ptr(), self.s_sz.data_ptr(),
                                   self.group_size, N))
        else:
            s = (lib.slr_int4_nm24_mm, (self.s_values.data_ptr(), self.s_index.data_ptr(), self.s_scale.data_ptr(),
                                        self.s_sz.data_ptr(), self.group_size, N))
        lr = None
        if self.U is not None:
            v = None if self.shared is not None else (self.V.data_ptr(), csrc.ROWS_KINDS[self.V.dtype])
            lr = (v, (self.U.data_ptr(), csrc.ROWS_KINDS[self.U.dtype]), self.rank, N)
        self._calls = (s, lr, K)
        return self._calls

    def _decode(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x2 [T <= 4, K] float32 contiguous -> y [T, N] by the C++ kernels, the low-rank part included."""
        (fn, args), lr, K = self.__dict__.get("_calls") or self._kernel_calls()
        T, th = x2.shape[0], torch.get_num_threads()
        y = torch.empty(T, self.out_features)
        rc = fn(x2.data_ptr(), T, K, *args, y.data_ptr(), th)
        if rc:
            raise RuntimeError(f"slr's C++ kernel refused a {tuple(x2.shape)} call: {csrc.ERRORS.get(rc, rc)}")
        kernels.CALLS["packed"] += 1
        if lr is not None:  # y += (x V^T) U^T in one call (z from the shared projection when V is shared)
            v, (up, uk), r, N = lr
            zp = None
            if v is None:
                z = self.shared(x, self._cid).reshape(T, r)
                z = z if z.dtype is torch.float32 and z.is_contiguous() else z.float().contiguous()
                zp = z.data_ptr()
            if csrc.load().slr_lowrank_add(x2.data_ptr(), T, K, v and v[0], v[1] if v else 0, zp, up, uk, r, N,
                                           y.data_ptr(), th):
                raise RuntimeError("slr's C++ low-rank kernel refused a call")
        return y

    def _lowrank(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self.shared(x, self._cid).reshape(-1, self.rank) if self.shared is not None else \
            F.linear(x2, self.V.float())
        return F.linear(z, self.U.float())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        x2 = x.reshape(-1, K)  # [T, K]
        if x2.dtype is not torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        cpp = _use_cpp(x2)
        if cpp and x2.shape[0] <= DECODE_MAX_TOKENS:
            y = self._decode(x2, x)  # [T, N]
        else:
            y = F.linear(x2, self.unpacked(cpp))
            if self.U is not None:
                y += self._lowrank(x2, x)
        if self.bias is not None:
            y += self.bias
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype is torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        kind = ("float16 2:4" if self.s_values.dtype == torch.float16 else
                f"4-bit {'2:4' if self.s_index is not None else 'dense'} g{self.group_size}")
        sh = ", shared_v" if self.shared is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, S={kind}, rank={self.rank}{sh}"


def _factor(t: torch.Tensor | None, stored: str) -> torch.Tensor | None:
    """A factor at the width the artifact stores it: float16 rows when stored as float16, else float32."""
    if t is None:
        return None
    return t.detach().to(torch.float16 if stored == "float16" else torch.float32).contiguous()


def pack_layer(lin: SLRLinear, dtypes: dict) -> PackedLinear | None:
    """The PackedLinear of a loaded layer, or None when its S has no kernel (see the module docstring)."""
    d_out, d_in = lin.out_features, lin.in_features
    spec = getattr(lin, "qspecs", {}).get("S")
    if lin.crow is None:
        return None
    with torch.no_grad():
        if spec is not None:
            if spec.bits > 4:
                return None
            codes, sbits, zero = lin.qbuffers("S")
            pack = kernels.cpp_pack(lin, spec, codes, sbits, zero)
            if pack is None:
                return None
            values, index, scale, sz = pack.weight, pack.index, pack.scale, pack.sz
        elif dtypes.get("values") == "float16" and d_in % 64 == 0 and kernels.is_nm24(lin):
            values, index, scale, sz = lin.values.detach().to(torch.float16).view(d_out, d_in // 2), \
                kernels.nm24_index(lin.col.view(d_out, d_in // 2)), None, None
        else:
            return None
        fac = dtypes.get("factors", "float32")
        if getattr(lin, "qspecs", {}).keys() & {"U", "V"}:
            fac = "float32"  # quantized factors: dequantized once (a rank-r GEMV is a small part of a step)
        dq = lin.dq_scope() if hasattr(lin, "dq_scope") else torch.no_grad()
        with dq:
            U = _factor(lin.U, fac)
            V = None if lin.shared is not None else _factor(lin.V, fac)
        bias = None if lin.bias is None else lin.bias.detach().float()
    return PackedLinear(d_in, d_out, values.contiguous(), index, scale, sz, spec.group_size if spec else 0, U, V,
                        lin.shared, lin._cid, bias)


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

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x.float())
        if _use_cpp(x2) and x2.shape[0] <= DECODE_MAX_TOKENS:
            y = csrc.rows_mm(x2, self.rows, self.row_scale)
        else:  # many tokens: a GEMM per slice of the vocabulary (a float32 copy of one slice at a time)
            V, step = self.out_features, HEAD_SLICE
            y = torch.cat([F.linear(x2, self.dense(i, i + step)) for i in range(0, V, step)], 1)
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
