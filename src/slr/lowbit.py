"""Codes kept at their own width for slr's C++ kernels: int4_gemv.cpp's lane layouts for a 2-, 3- or 8-bit S, and
quantized low-rank factors kept as their 8-bit (or narrower) codes with float32 scales.

A lane-packed S [N, K] (K a multiple of 64) holds each row in blocks of 64 codes; code 8 J + i of a block is field J
of lane i: the 2-bit layout stores lane i as a little-endian 16-bit word (16 bytes a block), the 3-bit one as a
3-byte word (24 bytes a block), the 8-bit one as the plain codes (byte 8 J + i). A 3-bit S so takes 3/8 of a byte
per weight instead of a nibble's 1/2. Quantized factors keep one byte per code (int8 ``code - zero`` on a symmetric
grid, with only the scales); U is stored in blocks of 8 output rows (``block8``: the r x 8 entries of rows 8 c ..
8 c + 7 together, scales [r / g, N]) so that the kernel reads it in row order, 8 output rows a vector.

Everything here is pure torch, and ``unlane`` / ``dequant`` are the fallback's exact inverses: the weights they give
are ``fma(code, scale, -scale * zero)``, the value the kernels rebuild (both products are exact in float32).
"""

from __future__ import annotations

import torch

from .qlinear import scale_values, zero_of

LANE_BLOCK = 64  # codes per block (and the multiple the group size and d_in must be)


def lane_width(bits: int) -> int | None:
    """The lane layout a ``bits``-bit S is kept in (2, 3 or 8), or None for 4 bits (the nibble layout)."""
    if bits <= 2:
        return 2
    if bits == 3:
        return 3
    return 8 if 4 < bits <= 8 else None


def lane_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Codes uint8 [N, K] (each below 2^width) -> the lane layout, uint8 [N, K / 8 * width]."""
    N, K = codes.shape
    if width == 8:
        return codes.to(torch.uint8).contiguous()
    c = codes.reshape(N, K // LANE_BLOCK, 8, 8).to(torch.int32)  # [N, block, J, i]
    w = sum(c[:, :, J] << (width * J) for J in range(8))  # [N, block, i]: lane i's word
    b = torch.stack([(w >> (8 * t)) & 255 for t in range(width)], -1)  # its `width` little-endian bytes
    return b.to(torch.uint8).reshape(N, K // 8 * width).contiguous()


def unlane(packed: torch.Tensor, width: int, K: int) -> torch.Tensor:
    """Inverse of ``lane_codes``: uint8 [N, K / 8 * width] -> codes uint8 [N, K]."""
    N = packed.shape[0]
    if width == 8:
        return packed
    b = packed.reshape(N, K // LANE_BLOCK, 8, width).to(torch.int32)
    w = sum(b[..., t] << (8 * t) for t in range(width))  # [N, block, i]
    c = torch.stack([(w >> (width * J)) & ((1 << width) - 1) for J in range(8)], 2)  # [N, block, J, i]
    return c.reshape(N, K).to(torch.uint8)


def scales(sbits: torch.Tensor, zero: torch.Tensor | None, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, scale * zero) float32 of a quantized part's groups: exact (an fp16 value times an integer)."""
    scale = scale_values(sbits).contiguous()
    return scale, (scale * zero_of(zero, spec)).contiguous()


def factor_codes(lin, part: str):
    """A quantized factor of a loaded layer as (codes, scale, sz, group size): V [r, K] with [r, K / g] scales; U
    transposed, [r, N] with [r / g, N] scales. A symmetric grid's codes become int8 ``code - zero`` with sz None
    (weight = scale * code); an asymmetric one keeps uint8 codes and sz = scale * zero. None when the factor is not
    stored quantized at 8 bits or fewer, or (V) when its groups are not a multiple of 8 inputs."""
    spec = getattr(lin, "qspecs", {}).get(part)
    if spec is None or spec.bits > 8 or (part == "V" and spec.group_size % 8):
        return None
    codes, sbits, zero = lin.qbuffers(part)
    scale, sz = scales(sbits, zero, spec)
    if zero is None:
        codes, sz = (codes.to(torch.int16) - 2 ** (spec.bits - 1)).to(torch.int8), None
    if part == "U":
        return codes.t().contiguous(), scale.t().contiguous(), None if sz is None else sz.t().contiguous(), \
            spec.group_size
    return codes.contiguous(), scale, sz, spec.group_size


def dequant(codes: torch.Tensor, scale: torch.Tensor, sz: torch.Tensor | None, group: int, dim: int) -> torch.Tensor:
    """Float32 values of codes whose groups of ``group`` run along ``dim`` (scale and sz have one entry a group):
    ``scale * code`` for int8 codes (sz None), else fma(code, scale, -sz); both exact, as the kernel rebuilds them."""
    s = scale.repeat_interleave(group, dim)
    if sz is None:
        return codes.float() * s
    return torch.addcmul(-sz.repeat_interleave(group, dim), codes.float(), s)


def block8(U: torch.Tensor) -> torch.Tensor:
    """U [N, r] -> [ceil(N / 8), r, 8]: entry (n, j) at [n // 8, j, n % 8] (rows past N are zero)."""
    N, r = U.shape
    pad = torch.zeros(-(-N // 8) * 8, r, dtype=U.dtype)
    pad[:N] = U
    return pad.view(-1, 8, r).transpose(1, 2).contiguous()


def unblock8(Ub: torch.Tensor, N: int) -> torch.Tensor:
    """Inverse of ``block8``: [ceil(N / 8), r, 8] -> U [N, r]."""
    return Ub.transpose(1, 2).reshape(-1, Ub.shape[1])[:N]
