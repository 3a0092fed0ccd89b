"""Magnitude pruning: keep the largest |W| (row-wise, or N:M). Data-free."""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .masks import select


@register("magnitude", kind="sparse", data_free=True)
def magnitude(W: torch.Tensor, H: torch.Tensor | None, spec: LayerSpec) -> SolveResult:
    validate_inputs(W, H, spec)
    t = time.perf_counter()
    mask = select(W.abs().float(), spec)
    S = W.float() * mask
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t})
