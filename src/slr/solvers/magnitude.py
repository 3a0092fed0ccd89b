"""Magnitude pruning: keep the largest |W| (row-wise, or N:M). Data-free. With spec.bits the kept values are rounded
to the grid."""

from __future__ import annotations

import time

import torch

from ..quant import rtn
from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .masks import select


@register("magnitude", kind="sparse", data_free=True, bits=True)
def magnitude(W: torch.Tensor, H: torch.Tensor | None, spec: LayerSpec) -> SolveResult:
    validate_inputs(W, H, spec)
    t = time.perf_counter()
    mask = select(W.abs().float(), spec)
    if spec.quant is None:
        return SolveResult(S=W.float() * mask, mask=mask, info={"seconds": time.perf_counter() - t})
    S, scale, zero = rtn(W.float(), spec.quant, mask)  # kept values rounded to the grid (no compensation)
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t}, qparams={"S": (scale, zero)})
