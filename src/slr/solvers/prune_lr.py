"""Prune, then fit a low-rank correction to the pruning error (EoRA / SLiM style). One shot.

S = SparseGPT(W) (or Wanda), then L = argmin_{rank <= r} ||X (W - S - L)^T|| in closed form (whitened SVD).
"""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, Timer, damp_hessian, layer_objective, register, validate_inputs
from .lowrank import whitened_lowrank, whitener_for
from .masks import select
from .obs import prune_quantize
from .wanda import wanda_score


def prune(
    W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, pruner: str, Hd: torch.Tensor, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, mask) from SparseGPT on the damped Hd, or Wanda (row-wise / N:M, no weight update)."""
    if pruner == "sparsegpt":
        # Hd already carries the damping, so SparseGPT adds none of its own
        return prune_quantize(W, Hd, spec, blocksize=blocksize, percdamp=0.0)[:2]
    if pruner == "wanda":
        mask = select(wanda_score(W, H), spec)
        return W.float() * mask, mask
    raise ValueError(f"unknown pruner {pruner!r} (use 'sparsegpt' or 'wanda')")


@register("prune+lr", kind="slr")
def prune_lr(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    pruner: str = "sparsegpt",
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
    blocksize: int = 128,
) -> SolveResult:
    """S = prune(W) with SparseGPT (default) or Wanda; L = whitened rank-r fit of W - S.

    Damping percdamp=diag_frac=0.005 (3BASiL defaults) is shared by the pruner and the L fit, so this is exactly the
    first iterate of ``hassle``.
    """
    validate_inputs(W, H, spec)
    t0 = time.perf_counter()
    timer = Timer()
    with timer("prune"):
        Hd = damp_hessian(H, percdamp, diag_frac)
        S, mask = prune(W, H, spec, pruner, Hd, blocksize)
    U = V = None
    if spec.rank > 0:
        with timer("L-step"):
            U, V = whitened_lowrank(W.float() - S, None, spec.rank, whitener=whitener_for(H, percdamp, diag_frac))
    res = SolveResult(S=S, mask=mask, U=U, V=V)
    res.info = {"objective": [layer_objective(W, H, res.dense())], "seconds": time.perf_counter() - t0, "time": timer.s}
    return res
