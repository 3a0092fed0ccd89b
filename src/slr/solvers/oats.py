"""OATS (Zhang & Papyan, ICLR 2025): alternating thresholding on the Wanda-scaled weights W~ = W D.

D = sqrt(diag H) (input-channel norms). Repeat: L = rank-r truncated SVD of (W~ - S);  S = hard-threshold(W~ - L)
keeping the largest |.| per output row (or N:M). Return S D^-1 and L D^-1. This is the diagonal-H relaxation of the
layer objective (HASSLE-free's observation), so it is data-aware only through D.
"""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, Timer, damp_hessian, layer_objective, register, validate_inputs
from .lowrank import truncated_svd
from .masks import select


@register("oats", kind="slr")
def oats(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    iters: int = 80,
    svd_method: str = "randomized",
    oversample: int = 8,
    niter: int = 1,
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
) -> SolveResult:
    """OATS with the paper's 80 alternations (``iters``).

    The L step uses a randomized SVD (q = r + oversample, ``niter`` power iterations) warm-started from the previous
    iteration's right singular vectors: consecutive W~ - S differ little, so this block power method tracks the exact
    truncated SVD at a fraction of LAPACK's cost (pass svd_method="exact" for LAPACK SVDs). D comes from the damped H
    (same damping as the other S+LR solvers) so dead inputs get a finite scale.
    """
    validate_inputs(W, H, spec)
    t0 = time.perf_counter()
    timer = Timer()
    r = spec.rank
    d = torch.diagonal(damp_hessian(H, percdamp, diag_frac)).sqrt().float()  # [d_in]
    Wt = W.float() * d
    S = torch.zeros_like(Wt)
    L = torch.zeros_like(Wt)
    mask = None
    U = Rt = basis = None
    for _ in range(iters):
        if r > 0:
            with timer("L-step"):
                P, s, Rt = truncated_svd(Wt - S, r, svd_method, oversample=oversample, niter=niter, init=basis)
                basis = Rt.T
                U = P * s
                L = U @ Rt
        with timer("S-step"):
            mask = select((Wt - L).abs(), spec, rowwise=True)
            S = (Wt - L) * mask
        if r == 0:
            break
    S = S / d
    V = Rt / d if r > 0 else None
    res = SolveResult(S=S, mask=mask, U=U, V=V)
    res.info = {"objective": [layer_objective(W, H, res.dense())], "iterations": iters, "seconds": 0.0}
    res.info["seconds"] = time.perf_counter() - t0
    res.info["time"] = timer.s
    return res
