"""Wanda: score |W_ij| * ||X_j||_2, pruned per output row (or N:M per group). No weight update."""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .masks import select


def wanda_score(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    # ||X_j||_2 = sqrt(H_jj) since H = X^T X
    return W.abs().float() * torch.sqrt(torch.diagonal(H).clamp_min(0)).float()[None, :]


@register("wanda", kind="sparse")
def wanda(W: torch.Tensor, H: torch.Tensor, spec: LayerSpec) -> SolveResult:
    validate_inputs(W, H, spec)
    t = time.perf_counter()
    mask = select(wanda_score(W, H), spec)
    S = W.float() * mask
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t})
