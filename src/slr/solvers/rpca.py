"""CAP stage 1: robust PCA of each weight matrix, W = L + S, by the inexact augmented Lagrangian method.

min ||L||_* + lam ||S||_1  s.t.  W = L + S, lam = 1/sqrt(max(m, n)) (Lin, Chen & Ma 2010, as in methods.md §1.1).
Data-free. ``rpca_pools`` returns the candidate pools (singular triplets of L, nonzeros of S) for a global
allocator; the registered ``rpca`` solver cuts them to a LayerSpec so it can be used like any other solver.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .masks import select


@dataclass
class RPCAPools:
    """Candidate pools of one matrix (all float32 except indices), sorted by decreasing importance.

    U: [m, p] left singular vectors of L, sigma: [p] (descending, > 0), Vt: [p, n]; L = U diag(sigma) Vt.
    values: [nnz] nonzero entries of S (descending |value|); index: [nnz] int64 flat row-major indices into [m, n].
    """

    U: torch.Tensor
    sigma: torch.Tensor
    Vt: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    shape: tuple[int, int]
    info: dict

    def L(self, r: int | None = None) -> torch.Tensor:
        """L restricted to its top-r singular directions (all when r is None)."""
        r = self.sigma.numel() if r is None else r
        return (self.U[:, :r] * self.sigma[:r]) @ self.Vt[:r]

    def S(self) -> torch.Tensor:
        """The dense sparse part."""
        out = torch.zeros(self.shape[0] * self.shape[1])
        out[self.index] = self.values
        return out.view(self.shape)


def _svt(X: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular value thresholding: factors of U max(Σ - tau, 0) V^T, keeping only the surviving directions."""
    P, s, Rt = torch.linalg.svd(X, full_matrices=False)
    s = s - tau
    keep = s > 0
    return P[:, keep], s[keep], Rt[keep]


def rpca_pools(W: torch.Tensor, lam: float | None = None, iters: int = 5) -> RPCAPools:
    """Inexact ALM for RPCA with the textbook constants (methods.md §1.1), float64 internally.

    Y0 = W / max(||W||_2, ||W||_inf / lam), mu0 = 1.25 / ||W||_2, rho = 1.5, mu_max = 1e7 mu0. Each iteration:
    L = SVT_{1/mu}(W - S + Y/mu); S = soft_{lam/mu}(W - L + Y/mu); Y += mu (W - L - S); mu = min(rho mu, mu_max).
    CAP reports 3-10 iterations suffice (1 is catastrophic), hence ``iters`` = 5.
    """
    t0 = time.perf_counter()
    D = W.double()
    m, n = D.shape
    lam = 1.0 / math.sqrt(max(m, n)) if lam is None else lam
    norm2 = float(torch.linalg.matrix_norm(D, ord=2))
    norm_inf = float(D.abs().max())  # entrywise max, as in Lin et al.'s code
    if norm2 == 0.0:
        z = torch.zeros(0)
        return RPCAPools(
            torch.zeros(m, 0), z, torch.zeros(0, n), z, torch.zeros(0, dtype=torch.long), (m, n), {"residual": []}
        )
    Y = D / max(norm2, norm_inf / lam)
    S = torch.zeros_like(D)
    mu = 1.25 / norm2
    mu_max = 1e7 * mu
    rho = 1.5
    residual = []
    P = s = Rt = None
    for _ in range(iters):
        P, s, Rt = _svt(D - S + Y / mu, 1.0 / mu)
        L = (P * s) @ Rt
        T = D - L + Y / mu
        S = torch.sign(T) * (T.abs() - lam / mu).clamp_min(0)
        R = D - L - S
        Y += mu * R
        mu = min(rho * mu, mu_max)
        residual.append(float(R.norm() / norm2))  # relative constraint violation
    flat = S.flatten()
    index = torch.nonzero(flat).flatten()
    order = torch.argsort(flat[index].abs(), descending=True)
    index = index[order]
    info = {"residual": residual, "rank": int(s.numel()), "nnz": int(index.numel()), "lam": lam}
    info["seconds"] = time.perf_counter() - t0
    return RPCAPools(P.float(), s.float(), Rt.float(), flat[index].float(), index, (m, n), info)


@register("rpca", kind="slr", data_free=True)
def rpca(
    W: torch.Tensor,
    H: torch.Tensor | None,
    spec: LayerSpec,
    lam: float | None = None,
    iters: int = 5,
    refit: bool = True,
) -> SolveResult:
    """RPCA cut to ``spec``: the top spec.rank singular directions of L and exactly spec.kept() sparse entries.

    Support: the largest |S_rpca| entries (over the whole matrix for unstructured; N:M per group); when RPCA
    produced fewer nonzeros than the budget, the remaining slots go to the largest |W - L_r| entries.
    refit=True sets the kept values to W - L_r (the Frobenius-optimal values on that support given L_r; data-free),
    refit=False keeps the raw RPCA values.
    """
    validate_inputs(W, None, spec)
    t0 = time.perf_counter()
    pools = rpca_pools(W, lam, iters)
    r = min(spec.rank, pools.sigma.numel())
    U = pools.U[:, :r] * pools.sigma[:r]
    V = pools.Vt[:r]
    Lr = U @ V
    S_rpca = pools.S()
    R = (W.float() - Lr).abs()
    # nonzero RPCA entries rank above every zero one; zeros are ordered by the residual they would absorb
    score = torch.where(S_rpca != 0, S_rpca.abs() + R.max() + 1.0, R)
    mask = select(score, spec, rowwise=False)
    S = ((W.float() - Lr) if refit else S_rpca) * mask
    if spec.rank > r:  # L had lower rank than asked: pad with zero directions so rank() == spec.rank
        U = torch.cat([U, U.new_zeros(U.shape[0], spec.rank - r)], 1)
        V = torch.cat([V, V.new_zeros(spec.rank - r, V.shape[1])], 0)
    info = {**pools.info, "seconds": time.perf_counter() - t0}
    return SolveResult(S=S, mask=mask, U=U if spec.rank else None, V=V if spec.rank else None, info=info)
