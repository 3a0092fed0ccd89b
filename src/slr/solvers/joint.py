"""Data-free joint rank-k approximation of matrices that read the same input (Peng et al. 2024, methods.md §2).

For W_i [d_i, d_in] sharing input x: stack M = [W_1; W_2; ...] [sum d_i, d_in], take one SVD M = P Σ R^T and keep
the top-k right singular vectors V_k [k, d_in] (orthonormal rows). Then W_i ~= (W_i V_k^T) V_k: at inference
z = x V_k^T is computed once and y_i = z U_i^T. Cost k d_in + k sum d_i instead of d_in sum d_i. V_k minimises
sum_i ||W_i - W_i V^T V||_F^2 over orthonormal V (it is the best rank-k row space of the stack).

Activation-aware variant (whiten=True, H given): with H = X^T X = G G^T (G = Q diag(sqrt lam)), minimise
sum_i ||X (W_i - U_i V)^T||_F^2 = sum_i ||W_i G - U_i V G||_F^2. Stack M = [W_i G], keep its top-k right singular
vectors Pk [k, d_in]; then V = Pk G^+ (shared; H-orthonormal rows: V H V^T = I) and U_i = W_i G Pk^T.
"""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .lowrank import Whitener, whitener_for


@register("joint", kind="rank", data_free=True, group=True)
def joint(
    Ws: list[torch.Tensor],
    H: torch.Tensor | None,
    specs: list[LayerSpec],
    whiten: bool = False,
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
    whitener: Whitener | None = None,
) -> list[SolveResult]:
    """Shared right factor for a group; k = specs[0].rank. Every result holds the SAME V tensor object.

    S=None, mask=None (rank-only). A group of one matrix is exactly its truncated SVD (or whitened SVD).
    whiten=True needs H (damped with percdamp/diag_frac like the other solvers); otherwise H is ignored.
    """
    if not Ws:
        return []
    if len(specs) != len(Ws):
        raise ValueError("joint: one spec per matrix is required")
    d_in = Ws[0].shape[1]
    if any(W.shape[1] != d_in for W in Ws):
        raise ValueError("joint: all matrices of a group must share the input width")
    k = specs[0].rank
    for W in Ws:
        validate_inputs(W, H if whiten else None, LayerSpec(sparsity=1.0, rank=min(k, min(W.shape))))
    if k > d_in:
        raise ValueError(f"joint: rank {k} exceeds the input width {d_in}")
    t0 = time.perf_counter()
    M = torch.cat([W.double() for W in Ws], 0)  # [sum d_i, d_in]
    if whiten:
        if H is None and whitener is None:
            raise ValueError("joint(whiten=True) needs H")
        wh = whitener if whitener is not None else whitener_for(H, percdamp, diag_frac)
        G = wh.Q * wh.sqrt_lam  # [d_in, d_in]
        _, _, Rt = torch.linalg.svd(M @ G, full_matrices=False)
        Pk = Rt[:k]  # [k, d_in]
        V = ((Pk * wh.inv_sqrt_lam) @ wh.Q.T).float()  # Pk G^+
        Us = [(W.double() @ G @ Pk.T).float() for W in Ws]
    else:
        _, _, Rt = torch.linalg.svd(M, full_matrices=False)
        Vk = Rt[:k]  # [k, d_in] orthonormal rows
        V = Vk.float().contiguous()
        Us = [(W.double() @ Vk.T).float() for W in Ws]
    seconds = time.perf_counter() - t0
    info = {"seconds": seconds / len(Ws), "group_size": len(Ws), "shared_rank": k}
    return [SolveResult(S=None, mask=None, U=U.contiguous(), V=V, info=dict(info)) for U in Us]
