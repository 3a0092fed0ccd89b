"""Support selection: unstructured (row-wise or whole-matrix) and N:M along the input dim."""

from __future__ import annotations

import torch

from ..spec import LayerSpec, keep_per_row


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in each group of m consecutive input columns. score: [d_out, d_in]."""
    d_out, d_in = score.shape
    g = score.reshape(d_out, d_in // m, m)
    idx = torch.topk(g, n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(d_out, d_in)


def rowwise_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the same number of largest scores in every row (Wanda / OATS convention)."""
    k = keep_per_row(score.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    return mask


def global_mask(score: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the ``kept`` largest scores over the whole matrix (3BASiL / ALPS convention)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if kept > 0:
        mask[torch.topk(score.flatten(), kept).indices] = True
    return mask.view_as(score)


def select(score: torch.Tensor, spec: LayerSpec, rowwise: bool = True) -> torch.Tensor:
    """Support for ``spec`` from a score matrix (larger = keep). Always keeps exactly spec.kept()."""
    if spec.nm is not None:
        return nm_mask(score, *spec.nm)
    if rowwise:
        return rowwise_mask(score, spec.sparsity)
    return global_mask(score, spec.kept(*score.shape))
