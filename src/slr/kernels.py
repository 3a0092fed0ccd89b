"""Packed-weight matmuls for SLRLinear: a 2-4 bit S runs as slr's C++ kernels or torch's CPU int4 GEMM.

slr's C++ kernels (slr.csrc, src/slr/csrc/int4_gemv.cpp; built by ``python -m slr.csrc --build`` at install): float32
activations, AVX2 + FMA, OpenMP over output rows, for a few tokens per call (decode), on a dense S with codes below 16
(2-4 bits) or a 2:4 one. They read S packed (``nibble_pack``): dense, uint8 [N, K/2] of nibbles in blocks of 32 codes
(any N, groups a multiple of 32); 2:4, the kept values' nibbles [N, K/4] and their 2-bit positions [N, K/8] (groups a
multiple of 16, K of 64); both with float32 scales and scale * zero [N, K/g]. They sum in float32: the same numbers
as the torch path up to summation order. Loaded artifacts use them through slr.packed (which keeps only the packed
bytes); an in-memory QSLRLinear through ``int4_s`` below. Timings: benchmarks/kernels.md, benchmarks/inference.md.

torch's CPU int4 ops (probed on torch 2.13):

    aten::_convert_weight_to_int4pack_for_cpu(Tensor self, int innerKTiles) -> Tensor
        int32 codes [N, K] in [0, 15] -> uint8 [N, K/2] (two codes a byte; innerKTiles changes nothing on CPU)
    aten::_weight_int4pack_mm_for_cpu(Tensor self, Tensor mat2, int qGroupSize, Tensor qScaleAndZeros) -> Tensor
        x [M, K] float32 | bfloat16 | float16, the packed weight, qScaleAndZeros [K/g, N, 2] of x's dtype
        -> [M, N] of x's dtype, with weight w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]
    and they refuse N % 16 != 0, a group size g outside {32, 64, 128, 256}, K % g != 0.

slr's grid reads w = s (code - z) (z = 8 on a symmetric 4-bit grid): that is (code - 8) s + s (8 - z), so the pack
holds scale = s and zero = s (8 - z). In float32 both are exact (s is an fp16 value, 8 - z a small integer), so
the kernel's weights equal the dequantized ones bit for bit and only the summation order differs.

Only the bfloat16 path of the op is vectorized (float32 and float16 run a scalar loop, many times slower than a dense
GEMM; benchmarks/kernels.md). Hence the settings (``set_kernel`` / ``use_kernel``):

    auto   float32 / float16 activations (computed in float32): slr's C++ kernels for at most AUTO_CPP_MAX_TOKENS
           tokens per call; where they are not built (one line on stderr says so, once), torch's float32 int4 kernel
           (dense S only) for at most AUTO_FP32_MAX_TOKENS, where that still beats the torch path. bfloat16
           activations: torch's kernel in bfloat16, always. Same numbers as the torch path up to summation order.
    bf16   float32 / float16 activations run through torch's bfloat16 kernel (cast in and out), at any token count:
           faster than a dense float32 GEMM at decode, at bfloat16 accuracy (~3e-3 of max|y|).
    q8     auto, and a single-token call of an artifact's packed layer whose S is 4-bit dense (groups of 64k) or
           2- or 3-bit, or an int8 output head, reads x as int8 activations (blocks of 64 inputs, llama.cpp's Q8 way;
           slr.packed): faster decode, activations at int8 accuracy. The low-rank part and other calls stay float32.
    torch  never: S is dequantized and multiplied in pure torch (SLRLinear's strategies; slr.packed's layers unpack
           their bytes in pure torch). ``io.load`` does not pack under this setting.

A layer takes a kernel when S is quantized at 2-4 bits and dense (sparsity 0; or 2:4 for slr's kernels), the shapes
suit it, the layer's strategy is not ``dense-cached``, x is on the CPU and needs no gradient. Anything else falls back
silently.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from dataclasses import dataclass, field

import torch

from . import csrc
from .errors import SLRError
from .qlinear import scale_values, zero_of

KERNELS = ("auto", "bf16", "q8", "torch")
GROUP_SIZES = (32, 64, 128, 256)
N_ALIGN = 16
AUTO_FP32_MAX_TOKENS = 2  # float32 kernel vs the torch path on a dense 4-bit S: ~2.6x faster at 1 token, slower at 7
AUTO_CPP_MAX_TOKENS = 4  # slr's C++ kernel: decode (1 token per sequence) for up to 4 sequences per call
CPP_GROUP_ALIGN = 32  # its blocks of codes: the group size (and so d_in) must be a multiple
HAVE_INT4 = all(hasattr(torch.ops.aten, op) for op in
                ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
# kernel calls: "cpp-float32" / "cpp-2:4-float32" (slr's C++ kernels, dense / 2:4 S), "int4-float32" /
# "int4-bfloat16" (torch's, by compute dtype)
CALLS: collections.Counter = collections.Counter()

_CPP_DTYPES = (torch.float32, torch.float16)
_MODE = "auto"
_WARNED = False
_CPP_WARNED = False


def _check(mode: str) -> None:
    if mode not in KERNELS:
        raise SLRError(f"unknown kernel setting {mode!r}", f"choose one of: {', '.join(KERNELS)}")


def set_kernel(mode: str) -> str:
    """Set the process-wide kernel setting (``auto``, ``bf16``, ``q8`` or ``torch``); returns the previous one."""
    global _MODE, _WARNED
    _check(mode)
    prev, _MODE = _MODE, mode
    if mode == "bf16" and not HAVE_INT4 and not _WARNED:
        _WARNED = True
        print("slr: this torch build has no CPU int4 kernel; using the torch path", file=sys.stderr)
    return prev


def get_kernel() -> str:
    return _MODE


@contextlib.contextmanager
def use_kernel(mode: str):
    """``with use_kernel("torch"):`` -- the setting inside the block, the previous one after it."""
    prev = set_kernel(mode)
    try:
        yield
    finally:
        set_kernel(prev)


@dataclass
class Int4Pack:
    """A dense 4-bit S in torch's op's layout: ``weight`` uint8 [N, K/2], ``sz`` float32 [K/g, N, 2] (scale, zero)."""

    weight: torch.Tensor
    group_size: int
    in_features: int
    out_features: int
    sz: torch.Tensor
    _sz: dict = field(default_factory=dict, repr=False)

    def scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.float32:
            return self.sz
        if dtype not in self._sz:
            self._sz[dtype] = self.sz.to(dtype).contiguous()
        return self._sz[dtype]


@dataclass
class NibblePack:
    """A 4-bit S in slr's C++ kernels' layout (int4_gemv.cpp), dense or 2:4: ``weight`` uint8 [N, K/2] (dense) or
    [N, K/4] (the kept values of a 2:4 S), ``index`` None or uint8 [N, K/8] (2:4: each kept value's position in its
    group of four), ``scale`` and ``sz`` (scale * zero) float32 [N, K/g]; contiguous CPU tensors that the pack owns
    (``ptrs``: their data pointers, in the kernel's argument order)."""

    weight: torch.Tensor
    scale: torch.Tensor
    sz: torch.Tensor
    group_size: int
    in_features: int
    out_features: int
    index: torch.Tensor | None = None
    ptrs: tuple = field(init=False, repr=False)

    def __post_init__(self):
        parts = (self.weight, self.scale, self.sz) if self.index is None else (
            self.weight, self.index, self.scale, self.sz)
        self.ptrs = tuple(t.data_ptr() for t in parts)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _is_dense(layer) -> bool:
    """Every (row, column) of S is kept, in order: the CSR codes are the row-major dense matrix."""
    d_out, d_in = layer.out_features, layer.in_features
    if layer.crow is None or layer.nnz != d_out * d_in or layer._per_row() != d_in:
        return False
    return bool((layer.col.view(d_out, d_in) == torch.arange(d_in, device=layer.col.device)).all())


def _build_torch(layer, spec, codes, sbits, zero) -> Int4Pack | None:
    d_out, d_in, g = layer.out_features, layer.in_features, spec.group_size
    if (not HAVE_INT4 or g not in GROUP_SIZES or d_in % g or d_out % N_ALIGN or codes.device.type != "cpu"
            or not _is_dense(layer)):
        return None
    scale = scale_values(sbits)  # [d_out, G] float32
    zt = scale * (8.0 - zero_of(zero, spec))  # the op's zero: s (8 - z), exact in float32
    sz = torch.stack([scale.t(), zt.t()], -1).contiguous()  # [G, d_out, 2]
    try:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(d_out, d_in).to(torch.int32), 2)
    except RuntimeError:  # a build whose op refuses this layer: the torch path
        return None
    return Int4Pack(w, g, d_in, d_out, sz)


def nibble_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (uint8, < 16; K a multiple of 32) -> int4_gemv.cpp's bytes [N, K/2]: in each block of 32 codes,
    byte 2 i holds codes 8 j + i for j = 0, 1 (low, high nibble) and byte 2 i + 1 those for j = 2, 3, so the
    little-endian word i holds code 8 j + i in its bits 4 j .. 4 j + 3."""
    N, K = codes.shape
    c = codes.reshape(N, K // 32, 4, 8)  # [N, block, j, i]
    lo, hi = c[:, :, 0] | (c[:, :, 1] << 4), c[:, :, 2] | (c[:, :, 3] << 4)  # [N, block, i]
    return torch.stack([lo, hi], -1).reshape(N, K // 2).contiguous()


def nm24_index(col: torch.Tensor) -> torch.Tensor:
    """Columns [N, K/2] of a 2:4 S's kept values -> int4_gemv.cpp's positions [N, K/8]: in each block of 32 kept
    values, byte i holds in bits 2 j .. 2 j + 1 the position (col % 4) of kept value 8 j + i."""
    N, H = col.shape
    p = (col % 4).to(torch.uint8).reshape(N, H // 32, 4, 8)  # [N, block, j, i]
    return (p[:, :, 0] | (p[:, :, 1] << 2) | (p[:, :, 2] << 4) | (p[:, :, 3] << 6)).reshape(N, H // 4).contiguous()


def is_nm24(layer) -> bool:
    """S keeps exactly two of every four inputs of a row, in column order: CSR row r holds K/2 values whose columns
    fall two by two in groups 0, 0, 1, 1, 2, 2, ..."""
    d_out, d_in = layer.out_features, layer.in_features
    if layer.crow is None or d_in % 4 or layer.nnz * 2 != d_out * d_in or layer._per_row() != d_in // 2:
        return False
    col = layer.col.view(d_out, d_in // 2).long()
    quad = torch.arange(d_in // 2, device=col.device) // 2
    return bool((col // 4 == quad).all() and (col[:, 0::2] < col[:, 1::2]).all())


def cpp_pack(layer, spec, codes, sbits, zero) -> NibblePack | None:
    """S (codes below 16: 2-4 bits) packed for slr's C++ kernels, or None when its layout has no kernel."""
    d_out, d_in, g = layer.out_features, layer.in_features, spec.group_size
    if codes.device.type != "cpu" or d_in % g:
        return None
    scale = scale_values(sbits).contiguous()  # [d_out, G] float32
    sz = (scale * zero_of(zero, spec)).contiguous()  # exact: an fp16 value times an integer below 16
    if g % CPP_GROUP_ALIGN == 0 and _is_dense(layer):
        return NibblePack(nibble_codes(codes.view(d_out, d_in).to(torch.uint8)), scale, sz, g, d_in, d_out)
    if g % 16 == 0 and d_in % 64 == 0 and is_nm24(layer):
        col = layer.col.view(d_out, d_in // 2)
        return NibblePack(nibble_codes(codes.view(d_out, d_in // 2).to(torch.uint8)), scale, sz, g, d_in, d_out,
                          index=nm24_index(col))
    return None


_BUILDERS = {"torch": _build_torch, "cpp": cpp_pack}


_KEY_BUFFERS = ("qS_codes", "qS_scale", "qS_zero", "crow", "col")


def _pack(layer, kind: str):
    """The layer's S packed for a kernel (``kind``: "torch" or "cpp"), built on first use and cached on the layer
    under ``_i4_cache`` = (key, {kind: pack or None}); the key changes with S's code, scale, zero or index buffers
    (version, storage or device), which drops every pack (``clear_cache`` too). None when S is not a dense 4-bit one
    that kernel takes. Called on every forward: the key reads the buffers straight from ``_buffers``."""
    spec = getattr(layer, "qspecs", {}).get("S")
    if spec is None or spec.bits > 4:
        return None
    bufs = layer._buffers
    key = [spec]
    for name in _KEY_BUFFERS:
        t = bufs.get(name)
        if t is not None:
            key += (_version(t), t.data_ptr(), t.is_cpu)
    key = tuple(key)
    cache = layer.__dict__.get("_i4_cache")
    if cache is None or cache[0] != key:
        cache = layer._i4_cache = (key, {})
    packs = cache[1]
    if kind not in packs:
        with torch.inference_mode(False), torch.no_grad():  # normal tensors even when first built in inference_mode
            packs[kind] = _BUILDERS[kind](layer, spec, *layer.qbuffers("S"))
    return packs[kind]


def int4_pack(layer) -> Int4Pack | None:
    """The layer's S packed for torch's int4 kernel, or None when S is not a dense 4-bit one the op takes."""
    return _pack(layer, "torch") if HAVE_INT4 else None


def nibble_pack(layer) -> NibblePack | None:
    """The layer's S packed for slr's C++ kernels, or None when S is not a 4-bit one they take: dense with groups of
    32k inputs, or 2:4 with groups of 16k and d_in a multiple of 64."""
    return _pack(layer, "cpp")


def cpp_ready() -> bool:
    """slr's C++ kernel is built and runs here; the first time it is not, one line on stderr says why."""
    global _CPP_WARNED
    if csrc.load() is not None:
        return True
    if not _CPP_WARNED:
        _CPP_WARNED = True
        instead = "torch's float32 int4 kernel (dense, 1-2 tokens) or the torch path" if HAVE_INT4 else "the torch path"
        print(f"slr: the C++ int4 kernel is unavailable ({csrc.reason()}); a 4-bit S runs {instead}",
              file=sys.stderr)
    return False


def cpp_linear(x: torch.Tensor, pack: NibblePack) -> torch.Tensor:
    """x [..., K] @ S^T -> [..., N] in x's dtype, computed by slr's C++ kernel in float32 (which must be loaded:
    ``cpp_ready()``). Every torch call it can skip it skips: at decode this Python is a fair part of the time."""
    K, N = pack.in_features, pack.out_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, S takes {K}")
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # [T, K]
    if x2.dtype is not torch.float32:
        x2 = x2.float()
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    T = x2.shape[0]
    y = torch.empty(T, N)
    lib = csrc.load()
    fn = lib.slr_int4_mm if pack.index is None else lib.slr_int4_nm24_mm
    rc = fn(x2.data_ptr(), T, K, *pack.ptrs, pack.group_size, N, y.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"slr's C++ int4 kernel refused the call: {csrc.ERRORS.get(rc, rc)}")
    CALLS["cpp-float32" if pack.index is None else "cpp-2:4-float32"] += 1
    if x.dtype is not torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


def int4_linear(x: torch.Tensor, pack: Int4Pack, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ S^T -> [..., N] in x's dtype, computed by the int4 kernel in ``dtype`` (default: bfloat16 for
    bfloat16 x, float32 otherwise)."""
    dt = dtype or (torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
    x2 = x.reshape(-1, pack.in_features).to(dt).contiguous()  # [T, K]
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, pack.out_features)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, pack.weight, pack.group_size, pack.scales_and_zeros(dt))
        CALLS[f"int4-{str(dt).removeprefix('torch.')}"] += 1
    return y.to(x.dtype).reshape(*x.shape[:-1], pack.out_features)


def _compute_dtype(x: torch.Tensor, tokens: int) -> torch.dtype | None:
    if x.dtype == torch.bfloat16:
        return torch.bfloat16
    if x.dtype not in (torch.float32, torch.float16):
        return None
    if _MODE == "bf16":
        return torch.bfloat16
    return torch.float32 if tokens <= AUTO_FP32_MAX_TOKENS else None


def int4_s(layer, x: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """S's output x S^T [..., d_out] by a kernel when the setting, the layer and this call allow it (see the module
    docstring), else None (the caller runs the torch path)."""
    if _MODE == "torch" or not x.is_cpu or layer.strategy == "dense-cached":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters(recurse=False))):
        return None  # the kernels have no backward (trained scales are Parameters of the layer)
    spec = getattr(layer, "qspecs", {}).get("S")
    if spec is None or spec.bits > 4:
        return None
    if (_MODE == "auto" and 0 < tokens <= AUTO_CPP_MAX_TOKENS and x.dtype in _CPP_DTYPES and cpp_ready()):
        pack = nibble_pack(layer)
        if pack is not None:
            return cpp_linear(x, pack)
    if not HAVE_INT4:
        return None
    dt = _compute_dtype(x, tokens)
    if dt is None:
        return None
    pack = int4_pack(layer)
    return None if pack is None else int4_linear(x, pack, dt)
