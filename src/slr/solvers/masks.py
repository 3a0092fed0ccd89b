"""Support selection: unstructured (row-wise or whole-matrix) and N:M along the input dim.

Ties are broken towards the lower (flattened) index everywhere, so a mask is a deterministic function of the scores.
"""

from __future__ import annotations

import math

import torch

from ..spec import LayerSpec, keep_per_row


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in each group of m consecutive input columns. score: [d_out, d_in].

    Entry i of a group is kept iff fewer than n entries beat it, where j beats i if score_j > score_i, or equal and
    j < i. For M <= 8 this uses (m-1) comparisons per entry on strided column views (~2x faster than a top-k per
    group); larger M uses a stable sort, which breaks ties the same way.
    """
    d_out, d_in = score.shape
    g = score.reshape(d_out, d_in // m, m)  # [d_out, d_in/m, m]
    if m > 8:
        idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(d_out, d_in)
    cols = [g[..., i] for i in range(m)]
    keep = []
    for i in range(m):
        beaten = torch.zeros(cols[i].shape, dtype=torch.uint8, device=score.device)
        for j in range(m):
            if j != i:
                beaten += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
        keep.append(beaten < n)
    return torch.stack(keep, -1).reshape(d_out, d_in)


def rowwise_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the same number of largest scores in every row (Wanda / OATS convention)."""
    k = keep_per_row(score.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    return mask


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (1 <= k <= n), exact.

    A strided sample brackets the answer in a narrow value band (lo, hi]; counting above hi and selecting within
    the band replaces a full-size k-th-value selection (~5x faster on 1M entries). Falls back to the full
    selection if the band misses.
    """
    n = flat.numel()
    step = n // 16384
    if step >= 8:
        sample = flat[::step]
        ns = sample.numel()
        p = k / n
        pos = ns * (1.0 - p)  # expected rank (from the bottom) of the answer inside the sample
        margin = 5.0 * math.sqrt(ns * p * (1.0 - p)) + 16
        lo = torch.kthvalue(sample, max(int(pos - margin), 1)).values
        hi = torch.kthvalue(sample, min(int(pos + margin) + 1, ns)).values
        above = int(torch.count_nonzero(flat > hi))
        band = (flat > lo) & (flat <= hi)
        if above < k <= above + int(torch.count_nonzero(band)):
            vals = flat[band]
            return torch.kthvalue(vals, vals.numel() - (k - above) + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def global_mask(score: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the ``kept`` largest scores over the whole matrix (3BASiL / ALPS convention).

    Thresholds at the kept-th largest value (``kth_largest``, faster than a full top-k); ties at the threshold are
    filled in index order.
    """
    n = score.numel()
    if kept <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if kept >= n:
        return torch.ones_like(score, dtype=torch.bool)
    flat = score.flatten()
    thr = kth_largest(flat, kept)
    mask = flat >= thr
    extra = int(torch.count_nonzero(mask)) - kept
    if extra > 0:  # ties at the threshold: keep the first ones in index order
        mask[torch.nonzero(flat == thr).flatten()[-extra:]] = False
    return mask.view_as(score)


def select(score: torch.Tensor, spec: LayerSpec, rowwise: bool = True) -> torch.Tensor:
    """Support for ``spec`` from a score matrix (larger = keep). Always keeps exactly spec.kept()."""
    if spec.nm is not None:
        return nm_mask(score, *spec.nm)
    if rowwise:
        return rowwise_mask(score, spec.sparsity)
    return global_mask(score, spec.kept(*score.shape))
