"""HASSLE-free (Makni et al. 2025): alternate S <- SparseGPT(W - L) and L <- whitened rank-r fit of W - S.

The L step is the closed form used by 3BASiL's reimplementation (not the original 50 Adam steps).
"""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, Timer, damp_hessian, layer_objective, register, validate_inputs
from .lowrank import whitened_lowrank, whitener_for
from .prune_lr import prune


@register("hassle", kind="slr")
def hassle(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    iters: int = 12,
    pruner: str = "sparsegpt",
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
    blocksize: int = 128,
    tol: float = 1e-4,
    patience: int = 3,
) -> SolveResult:
    """HASSLE-free alternating minimisation; returns the best iterate by the true (undamped) objective.

    iters=12 (the paper uses 80, 3BASiL's README 40; BENCHMARKS.md, "Tuning notes"): each iteration is one
    SparseGPT sweep plus one exact whitened SVD.
    Stops early once the best objective has not improved by a relative ``tol`` for ``patience`` iterations (the
    alternation is not monotone: SparseGPT is greedy). Iteration 1 equals ``prune+lr`` (same damping), so the
    result is never worse than it. percdamp=diag_frac=0.005 as in 3BASiL/HASSLE-free's defaults.
    """
    validate_inputs(W, H, spec)
    t0 = time.perf_counter()
    timer = Timer()
    Hd = damp_hessian(H, percdamp, diag_frac)
    wh = whitener_for(H, percdamp, diag_frac) if spec.rank > 0 else None
    W32 = W.float()
    L = torch.zeros_like(W32)
    U = V = None
    trace: list[float] = []
    best = None
    stall = 0
    for _ in range(iters):
        with timer("S-step"):
            S, mask, _ = prune(W32 - L, H, spec, pruner, Hd, blocksize)
        if spec.rank > 0:
            with timer("L-step"):
                U, V = whitened_lowrank(W32 - S, None, spec.rank, whitener=wh)
                L = U @ V
        with timer("objective"):
            obj = layer_objective(W, H, S + L)
        trace.append(obj)
        if best is None or obj < best[0] * (1 - tol):
            stall = 0
        else:
            stall += 1
        if best is None or obj < best[0]:
            best = (obj, S, mask, U, V)
        if spec.rank == 0 or stall >= patience:  # rank 0: one SparseGPT call is the whole method
            break
    obj, S, mask, U, V = best
    info = {"objective": trace, "best_objective": obj, "iterations": len(trace), "seconds": time.perf_counter() - t0}
    info["time"] = timer.s
    return SolveResult(S=S, mask=mask, U=U, V=V, info=info)
