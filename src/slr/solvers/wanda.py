"""Wanda: score |W_ij| * ||X_j||_2, pruned per output row (or N:M per group). No weight update. With spec.bits the kept
values are rounded to the grid."""

from __future__ import annotations

import time

import torch

from ..quant import rtn
from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .masks import select


def wanda_score(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    # ||X_j||_2 = sqrt(H_jj) since H = X^T X
    return W.abs().float() * torch.sqrt(torch.diagonal(H).clamp_min(0)).float()[None, :]


@register("wanda", kind="sparse", bits=True)
def wanda(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec) -> SolveResult:
    validate_inputs(W, H, spec)
    t = time.perf_counter()
    mask = select(wanda_score(W, H), spec)
    if spec.quant is None:
        return SolveResult(S=W.float() * mask, mask=mask, info={"seconds": time.perf_counter() - t})
    S, scale, zero = rtn(W.float(), spec.quant, mask)  # kept values rounded to the grid (no compensation)
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t}, qparams={"S": (scale, zero)})
