"""Packed-weight matmuls for SLRLinear: a dense 4-bit S runs as torch's CPU int4 weight-only GEMM.

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

Only the bfloat16 path of the op is vectorized; float32 and float16 run a scalar loop. Time against a dense fp32
F.linear (torch 2.13, x86, 1 thread of a loaded 2-core box, 1536x576, 1 | 7 tokens per call): float32 kernel ~21x |
~36x, bfloat16 kernel ~0.75x | ~0.55x, today's dequantize-and-matmul path ~57x | ~15x. Hence the settings
(``set_kernel`` / ``use_kernel``):

    auto   the kernel in the activations' own precision: bfloat16 activations always; float32 / float16 ones (computed
           in float32) for at most AUTO_FP32_MAX_TOKENS tokens per call, where it still beats the torch path.
           Same numbers as the torch path up to summation order.
    bf16   also float32 / float16 activations run through the bfloat16 kernel (cast in and out), at any token count:
           faster than a dense float32 GEMM at decode, at bfloat16 accuracy (~3e-3 of max|y|).
    torch  never: S is dequantized and multiplied in pure torch (SLRLinear's strategies).

A layer takes the kernel when S is quantized at 4 bits and dense (sparsity 0), the shapes suit the op, the layer's
strategy is not ``dense-cached``, x is on the CPU and needs no gradient. Anything else falls back silently.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from dataclasses import dataclass, field

import torch

from .errors import SLRError
from .qlinear import scale_values, zero_of

KERNELS = ("auto", "bf16", "torch")
GROUP_SIZES = (32, 64, 128, 256)
N_ALIGN = 16
AUTO_FP32_MAX_TOKENS = 2  # float32 kernel vs the torch path on a dense 4-bit S: ~2.6x faster at 1 token, slower at 7
HAVE_INT4 = all(hasattr(torch.ops.aten, op) for op in
                ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
CALLS: collections.Counter = collections.Counter()  # kernel calls by compute dtype ("int4-float32", "int4-bfloat16")

_MODE = "auto"
_WARNED = False


def _check(mode: str) -> None:
    if mode not in KERNELS:
        raise SLRError(f"unknown kernel setting {mode!r}", f"choose one of: {', '.join(KERNELS)}")


def set_kernel(mode: str) -> str:
    """Set the process-wide kernel setting (``auto``, ``bf16`` or ``torch``); returns the previous one."""
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
    """A dense 4-bit S in the op's layout: ``weight`` uint8 [N, K/2], ``sz`` float32 [K/g, N, 2] (scale, zero)."""

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


def _build(layer, spec, codes, sbits, zero) -> Int4Pack | None:
    d_out, d_in, g = layer.out_features, layer.in_features, spec.group_size
    if (g not in GROUP_SIZES or d_in % g or d_out % N_ALIGN or codes.device.type != "cpu"
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


def int4_pack(layer) -> Int4Pack | None:
    """The layer's S packed for the int4 kernel (built once, cached on the layer under ``_i4_cache`` and rebuilt when
    its code, scale, zero or index buffers change; ``clear_cache`` drops it), or None when S is not a dense 4-bit one
    the op takes."""
    spec = getattr(layer, "qspecs", {}).get("S")
    if spec is None or spec.bits != 4 or not HAVE_INT4:
        return None
    codes, sbits, zero = layer.qbuffers("S")
    key = (spec, *((_version(t), t.data_ptr(), t.device) for t in (codes, sbits, zero, layer.crow, layer.col)
                   if t is not None))
    cache = layer.__dict__.get("_i4_cache")
    if cache is None or cache[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # normal tensors even when first built in inference_mode
            cache = (key, _build(layer, spec, codes, sbits, zero))
        layer._i4_cache = cache
    return cache[1]


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
    """S's output x S^T [..., d_out] by the int4 kernel when the setting, the layer and this call allow it (see the
    module docstring), else None (the caller runs the torch path)."""
    if _MODE == "torch" or not HAVE_INT4 or layer.strategy == "dense-cached" or x.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and x.requires_grad:  # the op has no backward
        return None
    dt = _compute_dtype(x, tokens)
    if dt is None:
        return None
    pack = int4_pack(layer)
    return None if pack is None else int4_linear(x, pack, dt)
