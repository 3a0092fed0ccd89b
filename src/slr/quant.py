"""Group-wise integer quantization of weight values (the grid that S's values and the factors live on).

A ``QuantSpec`` (bits b, group size g, symmetric or not) quantizes a [d_out, d_in] matrix in groups of g consecutive
inputs of each row. Per group: scale s (stored as fp16, so it is rounded to fp16 here) and an integer zero point z in
[0, 2^b - 1]; a value w is stored as the code q = clamp(round(w / s) + z, 0, 2^b - 1) and read back as s (q - z).
Symmetric: z = 2^(b-1) and s = 2 max|w| / (2^b - 1) (GPTQ's symmetric grid); asymmetric: s = (max - min) / (2^b - 1)
and z = round(-min / s) (the grid covers [min, max] of the group). With a ``mask`` (a sparse S), only the kept
entries of a group set its range. A group with no range (all zero) gets s = 1, so it stores zeros exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SLRError

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """b-bit codes in groups of ``group_size`` inputs, symmetric (``sym``) or asymmetric, fp16 scales."""

    bits: int
    group_size: int = 64
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def validate(self, d_in: int | None = None) -> None:
        if self.bits not in BITS:
            raise SLRError(f"bit width {self.bits} is not one of {', '.join(map(str, BITS))}",
                           "pass --bits 4 (or 8, 3, 2)")
        if self.group_size < 1:
            raise SLRError(f"group size {self.group_size} is not positive", "pass e.g. --group-size 64")
        if d_in is not None and d_in % self.group_size != 0:
            raise SLRError(f"group size {self.group_size} does not divide the input width {d_in}",
                           f"pass a --group-size that divides {d_in}, e.g. 32 or 64")

    def group_bits(self) -> int:
        """Stored bits per group besides the codes: the fp16 scale, and the b-bit zero point when asymmetric."""
        return 16 + (0 if self.sym else self.bits)


def _groups(W: torch.Tensor, g: int) -> torch.Tensor:
    d_out, d_in = W.shape
    return W.reshape(d_out, d_in // g, g)  # [d_out, n_groups, g]


CLIP_GRID = torch.arange(100, 19, -1) / 100  # shrink factors of the clipping search: 1.00, 0.99, ..., 0.20
CLIP_NORM = 2.4  # the error norm the search minimises (GPTQ's reference code)


def fit_params(W: torch.Tensor, q: QuantSpec, mask: torch.Tensor | None = None,
               clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each [d_out, d_in / g] float32, for ``W`` [d_out, d_in] (only the ``mask`` entries count).

    The grid spans each group's range [min, max] (with 0 in it); ``clip``: each group's range shrunk by the factor of
    ``CLIP_GRID`` whose rounding error sum |w - ŵ|^2.4 over the group is the smallest (range 1.0 included, so never
    worse in that norm than no clipping).
    """
    Wg = _groups(W.float(), q.group_size)
    if mask is not None:
        m = _groups(mask, q.group_size)
        hi = torch.where(m, Wg, torch.zeros_like(Wg)).amax(-1)
        lo = torch.where(m, Wg, torch.zeros_like(Wg)).amin(-1)
    else:
        hi, lo = Wg.amax(-1), Wg.amin(-1)
    hi, lo = hi.clamp_min(0), lo.clamp_max(0)  # the grid always holds 0 (pruned entries, padding)
    if not clip:
        return _grid(hi, lo, q)
    keep = torch.ones_like(Wg, dtype=torch.bool) if mask is None else m
    best, best_err = None, None
    for p in CLIP_GRID.tolist():
        scale, zero = _grid(p * hi, p * lo, q)  # [d_out, groups]
        codes = (torch.round(Wg / scale[..., None]) + zero[..., None]).clamp(0, q.maxq)
        err = (((codes - zero[..., None]) * scale[..., None] - Wg).abs().pow(CLIP_NORM) * keep).sum(-1)
        if best is None:
            best, best_err = (scale, zero), err
            continue
        better = err < best_err
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
        best_err = torch.minimum(err, best_err)
    return best


def _grid(hi: torch.Tensor, lo: torch.Tensor, q: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the b-bit grid over [lo, hi] (lo <= 0 <= hi), the scale rounded to fp16 as stored."""
    if q.sym:
        amax = torch.maximum(hi, -lo)
        scale = 2 * amax / q.maxq
        zero = torch.full_like(scale, float(2 ** (q.bits - 1)))
    else:
        scale = (hi - lo) / q.maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()  # stored as fp16
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # fp16 underflow: smallest subnormal
    if not q.sym:
        zero = torch.round(-lo / scale).clamp(0, q.maxq)
    return scale, zero


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: QuantSpec) -> torch.Tensor:
    """Codes [d_out, d_in] uint8 in [0, 2^b - 1]."""
    Wg = _groups(W.float(), q.group_size)
    codes = torch.round(Wg / scale[..., None]) + zero[..., None]
    return codes.clamp(0, q.maxq).to(torch.uint8).reshape(W.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: QuantSpec) -> torch.Tensor:
    """Values [d_out, d_in] float32 = scale (code - zero), group by group."""
    cg = _groups(codes.float(), q.group_size)
    return ((cg - zero[..., None]) * scale[..., None]).reshape(codes.shape)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: QuantSpec) -> torch.Tensor:
    """One input column w [d_out] on its group's grid (scale, zero [d_out]): the dequantized value, float32."""
    c = (torch.round(w.float() / scale) + zero).clamp(0, q.maxq)
    return scale * (c - zero)


def rtn(W: torch.Tensor, q: QuantSpec, mask: torch.Tensor | None = None):
    """Round to nearest: (W on the grid [d_out, d_in] float32 (zero outside ``mask``), scale, zero)."""
    q.validate(W.shape[1])
    scale, zero = fit_params(W, q, mask)
    What = dequantize(quantize(W, scale, zero, q), scale, zero, q)
    if mask is not None:
        What = What * mask
    return What, scale, zero
