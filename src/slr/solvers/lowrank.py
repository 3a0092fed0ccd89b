"""Low-rank building blocks: whitened (activation-aware) truncated SVD, and the rank-only solvers.

The whitened problem  min_{rank(L) <= r} ||X (E - L)^T||_F^2 = tr((E - L) H (E - L)^T),  H = X^T X = Q diag(lam) Q^T,
is solved in closed form (SVD-LLM / EoRA / 3BASiL ``rank_regression``): with G = Q diag(sqrt(lam)) we have
tr(. H .^T) = ||(E - L) G||_F^2, so L G is the rank-r truncation of M = E G and L = M_r G^+.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch

from ..spec import LayerSpec
from .base import SolveResult, damp_hessian, layer_objective, register, validate_inputs


@dataclass
class Whitener:
    """Eigendecomposition H = Q diag(lam) Q^T (float64), computed once per H and reused.

    Q: [d, d] orthonormal eigenvectors.  lam: [d] eigenvalues clamped at 0.
    sqrt_lam: [d].  inv_sqrt_lam: [d] 1/sqrt(lam), set to 0 where lam <= rel_eps * max(lam) (pseudo-inverse:
    directions H cannot see cost nothing, so L gets no component along them).
    """

    Q: torch.Tensor
    lam: torch.Tensor
    sqrt_lam: torch.Tensor
    inv_sqrt_lam: torch.Tensor

    @classmethod
    def from_hessian(cls, H: torch.Tensor, rel_eps: float = 1e-12) -> Whitener:
        lam, Q = torch.linalg.eigh(H.double())
        lam = lam.clamp_min(0.0)
        small = lam <= rel_eps * float(lam.max().clamp_min(1e-300))
        sqrt_lam = lam.sqrt()
        inv = torch.where(small, torch.zeros_like(lam), 1.0 / sqrt_lam.clamp_min(1e-300))
        return cls(Q=Q, lam=lam, sqrt_lam=sqrt_lam, inv_sqrt_lam=inv)

    @property
    def dim(self) -> int:
        return int(self.lam.shape[0])


# Tiny cache: q/k/v (and gate/up) are solved one after another with the same H object, so the O(d^3)
# eigendecomposition is done once per H. Entries are keyed by id and validated with a weakref + version
# counter, so a freed or in-place-modified H never returns a stale decomposition.
_CACHE: list[tuple[weakref.ref, int, tuple, object]] = []
_CACHE_SIZE = 4


def cached(H: torch.Tensor, key: tuple, build):
    """Return ``build()`` memoised on (the H object, its version, key)."""
    for ref, version, k, value in _CACHE:
        if ref() is H and version == H._version and k == key:
            return value
    value = build()
    _CACHE.insert(0, (weakref.ref(H), H._version, key, value))
    del _CACHE[_CACHE_SIZE:]
    return value


def whitener_for(H: torch.Tensor, percdamp: float = 0.0, diag_frac: float = 0.0) -> Whitener:
    """Whitener of damp_hessian(H, percdamp, diag_frac) (no damping when both are 0), cached per H."""

    def build():
        Hd = damp_hessian(H, percdamp, diag_frac) if (percdamp or diag_frac) else H.double()
        return Whitener.from_hessian(Hd)

    return cached(H, ("whitener", percdamp, diag_frac), build)


def truncated_svd(
    M: torch.Tensor,
    r: int,
    method: str = "exact",
    oversample: int = 8,
    niter: int = 2,
    init: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of M [m, n]: (P [m, r], s [r], Rt [r, n]) with M ~= P diag(s) Rt.

    method="exact": LAPACK SVD.  method="randomized": block subspace iteration with q = r + oversample columns and
    ``niter`` power iterations (Halko et al.). ``init`` [n, q'] warm-starts the right subspace (e.g. the previous
    iterate's Rt.T inside an alternating solver), which makes a cheap niter=1 call nearly exact once iterates settle.
    """
    m, n = M.shape
    r = min(r, m, n)
    if r == 0:
        return M.new_zeros(m, 0), M.new_zeros(0), M.new_zeros(0, n)
    q = min(r + oversample, m, n)
    if method == "exact" or q >= min(m, n) // 2:
        # dense SVD is as cheap as the randomized one when q is a large fraction of the width
        P, s, Rt = torch.linalg.svd(M, full_matrices=False)
        return P[:, :r], s[:r], Rt[:r]
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}")
    omega = sketch(n, q, init, M.dtype, seed)
    Y = M @ omega  # [m, q] spans (approximately) the top range of M
    for _ in range(niter):
        Z = torch.linalg.qr(M.T @ torch.linalg.qr(Y).Q).Q  # [n, q]
        Y = M @ Z
    return range_svd(Y, Y.T @ M, r)


def sketch(n: int, q: int, init: torch.Tensor | None, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Test matrix [n, q] of a randomized SVD: ``init``'s columns first (a warm start), seeded Gaussians after."""
    if init is not None and init.shape[1] >= q:
        return init[:, :q].to(dtype)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=dtype)
    if init is not None:
        omega[:, : init.shape[1]] = init.to(dtype)
    return omega


def range_svd(Y: torch.Tensor, C: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of the projection of M onto the range of Y [m, q], given only Y and C = Y^T M [q, n].

    Small SVD of P_Y M = Y G^-1 Y^T M (G = Y^T Y) through q x q eigenproblems in float64 instead of QR + LAPACK
    SVD of a [q, n] matrix: with Qy = Y G^-1/2 orthonormal, P_Y M = Qy T, T = G^-1/2 C. Callers that hold M as a
    product (M = A S) pass C = (Y^T A) S and never form M. Returns (P [m, r], s [r], Rt [r, n]) in Y's dtype.
    """
    C = C.double()  # [q, n]
    g, E = torch.linalg.eigh((Y.T @ Y).double())
    ok = g > 1e-12 * float(g.max().clamp_min(1e-300))  # pseudo-inverse: drop degenerate directions of Y
    Gih = (E[:, ok] / g[ok].sqrt()) @ E[:, ok].T  # G^-1/2 [q, q]
    T = Gih @ C
    s2, Wv = torch.linalg.eigh(T @ T.T)  # T = Wv diag(s) Rt, ascending order
    Wv, s = Wv[:, -r:].flip(1), s2[-r:].flip(0).clamp_min(0).sqrt()
    inv_s = torch.where(s > 1e-30 * float(s.max().clamp_min(1e-300)), 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    Rt = (Wv.T @ T) * inv_s[:, None]  # [r, n]
    P = Y @ (Gih @ Wv).to(Y.dtype)  # [m, r]
    return P, s.to(Y.dtype), Rt.to(Y.dtype)


def whitened_lowrank(
    E: torch.Tensor,
    H: torch.Tensor | None,
    r: int,
    whitener: Whitener | None = None,
    method: str = "exact",
    **svd_opts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{rank(L) <= r} ||X (E - L)^T||_F with H = X^T X, returned as L = U @ V.

    E: [d_out, d_in].  Returns U [d_out, r], V [r, d_in] (float32); U = P diag(s) and V has H-orthonormal rows
    (V H V^T = I on the visible subspace). Pass ``whitener`` (from ``Whitener.from_hessian`` / ``whitener_for``) to
    reuse one eigendecomposition across calls; H may then be None. With H=None and no whitener this is the plain
    truncated SVD of E.
    """
    if whitener is None and H is not None:
        whitener = Whitener.from_hessian(H)
    E = E.double()
    if whitener is None:  # Frobenius metric
        P, s, Rt = truncated_svd(E, r, method, **svd_opts)
        return (P * s).float(), Rt.float()
    M = (E @ whitener.Q) * whitener.sqrt_lam  # [d_out, d_in] = E G
    P, s, Rt = truncated_svd(M, r, method, **svd_opts)
    V = (Rt * whitener.inv_sqrt_lam) @ whitener.Q.T  # [r, d_in] = Rt G^+
    return (P * s).float(), V.float()


def _rank_only(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, info: dict) -> SolveResult:
    return SolveResult(S=None, mask=None, U=U.contiguous(), V=V.contiguous(), info=info)


@register("lowrank", kind="rank")
def lowrank(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
    whitener: Whitener | None = None,
) -> SolveResult:
    """Rank-only activation-aware SVD (SVD-LLM closed form): L = argmin_{rank <= spec.rank} ||X (W - L)^T||.

    spec.sparsity / nm are ignored (no sparse part). H is damped like the other S+LR solvers (3BASiL defaults)
    so that near-singular directions do not produce huge V entries.
    """
    validate_inputs(W, H, LayerSpec(sparsity=1.0, rank=spec.rank))
    t = time.perf_counter()
    wh = whitener if whitener is not None else whitener_for(H, percdamp, diag_frac)
    U, V = whitened_lowrank(W, None, spec.rank, whitener=wh)
    info = {"seconds": time.perf_counter() - t}
    info["objective"] = [layer_objective(W, H, U @ V)]
    return _rank_only(W, U, V, info)


@register("svd", kind="rank", data_free=True)
def svd(W: torch.Tensor, H: torch.Tensor | None, spec: LayerSpec) -> SolveResult:
    """Plain truncated SVD of W (data-free; H is ignored). U = P diag(s), V = Rt (orthonormal rows)."""
    validate_inputs(W, None, LayerSpec(sparsity=1.0, rank=spec.rank))
    t = time.perf_counter()
    U, V = whitened_lowrank(W, None, spec.rank)
    return _rank_only(W, U, V, {"seconds": time.perf_counter() - t})
