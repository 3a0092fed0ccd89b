"""SparseGPT (Frantar & Alistarh 2023): OBS column sweep with lazy block updates.

Mask chosen adaptively per block of ``blocksize`` columns by w^2 / [H^-1]_jj^2; N:M chosen per group
of M columns as the sweep reaches it. Pruning error is propagated to the not-yet-visited columns.
"""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, damp_hessian, register, validate_inputs


def _hinv_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float64), with damping and dead-input handling."""
    Hd = damp_hessian(H, percdamp)
    for extra in (0.0, 0.1, 1.0, 10.0):  # escalate damping if Cholesky fails
        try:
            Hx = Hd + extra * torch.diagonal(Hd).mean() * torch.eye(Hd.shape[0], dtype=Hd.dtype)
            L = torch.linalg.cholesky(Hx)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping")


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    fixed_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (S, mask). If ``fixed_mask`` is given, only the OBS update on that support is done."""
    W = W.double().clone()  # [d_out, d_in]
    d_out, d_in = W.shape
    if spec.nm is not None and fixed_mask is None:  # N:M groups must not straddle a block boundary
        blocksize = -(-blocksize // spec.nm[1]) * spec.nm[1]
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    Hinv = _hinv_upper(H, percdamp)  # [d_in, d_in]
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = keep
    # exact total number of pruned weights, split over blocks in proportion to width
    total_prune = d_out * d_in - spec.kept(d_out, d_in)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if fixed_mask is not None:
            keep1 = fixed_mask[:, i1:i2].clone()
        elif spec.nm is None:
            n_prune = round(total_prune * i2 / d_in) - round(total_prune * i1 / d_in)
            tmp = W1**2 / (torch.diagonal(Hinv1)[None, :] ** 2)
            keep1 = torch.ones_like(W1, dtype=torch.bool)
            if n_prune > 0:
                idx = torch.topk(tmp.flatten(), n_prune, largest=False).indices
                keep1.view(-1)[idx] = False
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        n, m = spec.nm if spec.nm is not None else (0, 0)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if fixed_mask is None and spec.nm is not None and i % m == 0:
                tmp = W1[:, i : i + m] ** 2 / (torch.diagonal(Hinv1)[i : i + m][None, :] ** 2)
                drop = torch.topk(tmp, m - n, dim=1, largest=False).indices
                keep1[:, i : i + m] = True
                keep1[:, i : i + m].scatter_(1, drop, False)
            q = w.clone()
            q[~keep1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (W * mask).float(), mask


@register("sparsegpt", kind="sparse")
def sparsegpt(
    W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, blocksize: int = 128, percdamp: float = 0.01
) -> SolveResult:
    validate_inputs(W, H, spec)
    t = time.perf_counter()
    S, mask = sparsegpt_prune(W, H, spec, blocksize, percdamp)
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t})
