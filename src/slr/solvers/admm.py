"""3BASiL 3-block ADMM for min_{S in pattern, rank(L) <= r} tr((W - S - L) H (W - S - L)^T), plus fixes.

Follows methods.md §3.2 (Makni, Meng, Mazumder 2025, ``threebasil()``):

* D = diag(sqrt(diag H)) and Ĥ = D^-1 H D^-1 (unit diagonal); everything is solved for the scaled variables
  W~ = W D, S~ = S D, L~ = L D, for which tr(E H E^T) = tr(E~ Ĥ E~^T).
* One float64 eigendecomposition Ĥ = Q diag(lam) Q^T serves both the B step, (Ĥ + rho I)^-1 = Q diag(1/(lam+rho)) Q^T
  for any rho (so a rho change costs nothing), and the closed-form whitened L step (the same Q, sqrt(lam)).
* B <- (Ĥ + rho I)^-1 [Ĥ (W~ - L~)^T - V + rho Z];  Z <- P(B + V/rho);  V <- V + rho (B - Z);  L <- whitened
  rank-r fit of W~ - B (unprojected B, as in the reference). P keeps the top-k |.| over the whole matrix
  (unstructured, exactly spec.kept entries) or the N largest of every M along the input dim.
* rho schedule every ``check_every`` iterations from the support change Δ (the fraction of kept entries that left the
  support since the last check): grow by rho_grow[0] / [1] / [2] while Δ > 10% / > 0.5% / > 0, shrink /5 with
  restart while rho has never grown, stop when Δ = 0 after growing, early stop when Δ < ``stop_delta`` after
  ``min_iters``. The default factors (1.07, 1.2, 1.5) spend the iterations where the support is still being chosen
  (Δ > 10%) and hurry through the tail, where the support only settles.

Fixes from methods.md §7.3: L is warm-started from the whitened SVD of W; the true objective of the *projected*
iterate (Z, L) is tracked at every check and the best iterate is kept; divergence (non-finite or exploding
objective) restores the best iterate and raises rho; after the loop L is refit exactly against the projected S
and S is backsolved on its fixed support given L (batched conjugate gradient), alternated up to ``polish_rounds``
times while a round lowers the objective by more than ``polish_tol`` (relative).

Quantized S (``spec.bits``): the projection keeps the same support (top-k / N:M of |.|) and rounds the kept values to
S's grid, each group's scale fitted on its kept entries (in unscaled coordinates: the grid is S's, not S~'s). The
polish keeps S on the grid: after the L refit, S is either kept as is or replaced by a GPTQ sweep on the fixed support
(of the CG backsolve, or of the target W - L itself), whichever has the lowest objective, and only if it lowers it.
With ``spec.factor_bits`` < 16 the factors are then quantized with their own compensation (``factors``).

Speed: one iteration costs a single [d_out, d_in] x [d_in, d_in] float32 product, B = R (Ĥ + rho I)^-1, where
R = W~ Ĥ - U (V~ Ĥ) - V + rho Z needs only thin products (W~ Ĥ is fixed, V~ Ĥ [r, d_in] comes out of the L step), plus
the projection plus a warm-started randomized SVD of (W~ - B) Ĥ^1/2 done with thin products. (Ĥ + rho I)^-1 is
rebuilt from the eigendecomposition only when rho changes (every ``check_every`` iterations at most). The earlier
eigen-coordinate form needed two such products per iteration; on SmolLM2 block 2 (2:4+r32, 2 CPU cores) the solve
went from 22.1 s to 18.7 s at the same objectives (within +-0.7% per matrix, either way).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..quant import dequantize, quantize
from ..quant import rtn as round_to_grid
from ..spec import LayerSpec
from .base import SolveResult, Timer, damp_hessian, layer_objective, register, validate_inputs
from .factors import quantize_factors
from .lowrank import cached, range_svd, sketch, truncated_svd
from .masks import select
from .obs import prune_quantize


@dataclass
class ScaledHessian:
    """Column-normalised damped Hessian and its eigendecomposition (all float64).

    d:   [d_in]  sqrt(diag Hd), the scaling D.      Hh: [d_in, d_in] D^-1 Hd D^-1 (unit diagonal).
    Q, lam: Hh = Q diag(lam) Q^T.                   c:  [d_in] 1 - diag(H)/diag(Hd): the damping share of each
    column, so that the undamped objective is tr(E~ Hh E~^T) - sum_j c_j ||E~_:j||^2.
    """

    d: torch.Tensor
    Hh: torch.Tensor
    Q: torch.Tensor
    lam: torch.Tensor
    c: torch.Tensor
    _roots: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, H: torch.Tensor, percdamp: float, diag_frac: float) -> ScaledHessian:
        Hd = damp_hessian(H, percdamp, diag_frac)  # float64, dead inputs -> 1
        hd = torch.diagonal(Hd).clone()
        d = hd.sqrt()
        Hh = Hd / d[:, None] / d[None, :]
        Hh = 0.5 * (Hh + Hh.T)
        lam, Q = torch.linalg.eigh(Hh)
        lam = lam.clamp_min(1e-12 * float(lam.max()))  # damping keeps lam > 0; this only guards round-off
        c = 1.0 - torch.diagonal(H).double().clamp_min(0) / hd
        return cls(d=d, Hh=Hh, Q=Q, lam=lam, c=c)

    def roots(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ĥ, Ĥ^1/2, Ĥ^-1/2, Q) [d_in, d_in] in ``dtype``, built once per (H, dtype) from the eigendecomposition."""
        if dtype not in self._roots:
            sq = self.lam.sqrt()
            self._roots[dtype] = (self.Hh.to(dtype), ((self.Q * sq) @ self.Q.T).to(dtype),
                                  ((self.Q / sq) @ self.Q.T).to(dtype), self.Q.to(dtype))
        return self._roots[dtype]

    def resolvent(self, rho: float, dtype: torch.dtype) -> torch.Tensor:
        """(Ĥ + rho I)^-1 = Q diag(1 / (lam + rho)) Q^T [d_in, d_in], computed in ``dtype``.

        Rebuilt at every rho change, so this d_in^3 product runs at the iteration's precision."""
        Q = self.roots(dtype)[3]
        return (Q / (self.lam + rho).to(dtype)) @ Q.T

    def objective(self, Et: torch.Tensor) -> float:
        """Undamped layer objective tr(E H E^T) of a scaled residual E~ = E D [d_out, d_in]."""
        Et = Et.double()
        return float(((Et @ self.Hh) * Et).sum() - (Et * Et).sum(0) @ self.c)


def scaled_hessian(H: torch.Tensor, percdamp: float = 0.005, diag_frac: float = 0.005) -> ScaledHessian:
    """ScaledHessian of H, cached per H object (q/k/v and gate/up share one H)."""
    return cached(H, ("scaled", percdamp, diag_frac), lambda: ScaledHessian.build(H, percdamp, diag_frac))


def masked_cg(S0: torch.Tensor, mask: torch.Tensor, T: torch.Tensor, A: torch.Tensor, iters: int) -> torch.Tensor:
    """Backsolve S on a fixed support: min_S tr((T - S) A (T - S)^T) s.t. S = 0 outside ``mask``.

    Rows decouple into A[J,J] s_J = (T A)_J (J = row's support); all rows run conjugate gradient at once with
    per-row step sizes, warm-started from S0. A is SPD with unit diagonal, so Jacobi preconditioning is the
    identity. Each iteration costs one [d_out, d_in] x [d_in, d_in] product; CG never increases the objective.
    """
    X = S0 * mask
    R = (T @ A - X @ A) * mask
    P = R.clone()
    rs = (R * R).sum(1)
    for _ in range(iters):
        AP = (P @ A) * mask
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rs / pap.clamp_min(1e-300), torch.zeros_like(pap))
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        rs_new = (R * R).sum(1)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        P = R + beta[:, None] * P
        rs = rs_new
    return X


class _Scaled:
    """One solve's problem in scaled coordinates (W~ = W D, module docstring) and the steps that work on it.

    L~ = U Rt Ĥ^-1/2 is kept as (U [d_out, r], Rt [r, d_in]: right singular vectors of the whitened fit) plus
    VH = Rt Ĥ^1/2 = V~ Ĥ [r, d_in], the only right factor the B step needs.
    """

    def __init__(self, W, sh: ScaledHessian, spec: LayerSpec, dtype, lr_oversample: int, lr_niter: int):
        self.sh, self.spec, self.dtype, self.r, self.quant = sh, spec, dtype, spec.rank, spec.quant
        self.lr_niter = lr_niter
        self.Hh, self.Sq, self.Sqi, _ = sh.roots(dtype)  # Ĥ, Ĥ^1/2, Ĥ^-1/2 [d_in, d_in]
        self.Wt64 = W.double() * sh.d  # [d_out, d_in] scaled weights
        self.Wt = self.Wt64.to(dtype)
        self.WH = self.Wt @ self.Hh  # W~ Ĥ, the fixed part of every B step's right-hand side
        self.d_it = sh.d.to(dtype)
        d_out, d_in = W.shape
        q = min(self.r + lr_oversample, d_out, d_in)
        self.exact_lr = q >= min(d_out, d_in) // 2  # a dense SVD is as cheap as the randomized one here
        # Ĥ^1/2 Ω for the seeded Gaussian Ω
        self.SqO = None if self.r == 0 or self.exact_lr else self.Sq @ sketch(d_in, q, None, dtype)

    def objective(self, Z: torch.Tensor, U: torch.Tensor, Rt: torch.Tensor) -> float:
        """Exact float64 undamped objective of (S~ = Z, L~ = U Rt Ĥ^-1/2)."""
        return self.sh.objective(self.Wt64 - Z.double() - U.double() @ (Rt @ self.Sqi).double())

    def loop_objective(self, Z: torch.Tensor, U: torch.Tensor, Rt: torch.Tensor) -> float:
        """Same value in the iteration's dtype (one [d_out, d_in] x [d_in, d_in] product), summed in float64."""
        Et = self.Wt - Z - U @ (Rt @ self.Sqi)
        return float(((Et @ self.Hh) * Et).sum(0).double().sum() - (Et * Et).sum(0).double() @ self.sh.c)

    def on_grid(self, Zt: torch.Tensor, m: torch.Tensor):
        """(Z~ with its kept values rounded to S's grid, fitted on the kept entries of each group; (scale, zero))."""
        Sq, scale, zero = round_to_grid(Zt / self.d_it, self.quant, m)
        return Sq.to(self.dtype) * self.d_it, (scale, zero)

    def project(self, B: torch.Tensor):
        """(support mask, B on it (in place; on S's grid when quantized), the grid or None)."""
        mask = select(B.abs(), self.spec, rowwise=False)
        Z = B.mul_(mask)
        return (mask, *self.on_grid(Z, mask)) if self.quant is not None else (mask, Z, None)

    def lowrank_step(self, A: torch.Tensor, VH: torch.Tensor | None):
        """Whitened rank-r fit of A: L~ = argmin ||(A - L~) Ĥ^1/2||, by a randomized SVD of M = A Ĥ^1/2.

        M is never formed: Y = A (Ĥ^1/2 Ω) and Y^T M = (Y^T A) Ĥ^1/2 are thin products. The test matrix Ω is warm-
        started with the previous right singular vectors Rt^T, whose image Ĥ^1/2 Rt^T = VH^T is already known, so the
        subspace iteration converges together with the ADMM. Returns (U [d_out, r], Rt [r, d_in], VH = Rt Ĥ^1/2).
        """
        r, Sq = self.r, self.Sq
        if self.exact_lr:
            P, s, Rt = truncated_svd(A @ Sq, r, "exact")
        else:
            SO = self.SqO if VH is None else torch.cat([VH.T, self.SqO[:, r:]], 1)  # [d_in, q]
            Y = A @ SO  # [d_out, q]
            for _ in range(self.lr_niter):
                Y = A @ (Sq @ torch.linalg.qr(Sq @ (A.T @ torch.linalg.qr(Y).Q)).Q)
            P, s, Rt = range_svd(Y, (Y.T @ A) @ Sq, r)
        return P * s, Rt, Rt @ Sq

    def refit(self, St: torch.Tensor):
        """Exact whitened rank-r fit (U [d_out, r], V~ [r, d_in]) of W~ - S~, in float64."""
        sh = self.sh
        P, s, Rt = truncated_svd(((self.Wt64 - St) @ sh.Q) * sh.lam.sqrt(), self.r, "exact")
        return P * s, (Rt / sh.lam.sqrt()) @ sh.Q.T


def _iterate(p: _Scaled, B0, U, Rt, VH, timer: Timer, *, max_iters, min_iters, check_every, rho0, rho_grow,
             stop_delta, rho_max, diverge_factor) -> dict:
    """The ADMM loop from B0 and L~ = (U, Rt, VH) with the rho schedule and the divergence guard (module docstring).

    Returns best (objective, mask, Z, U, Rt, VH, grid) of the checked projected iterates, the objective trace, the
    iterations, restarts, divergences and the last rho."""

    def start():
        with timer("projection"):
            m, Z, g = p.project(B0.clone())
        return m, Z, torch.zeros_like(B0), g

    mask, Z, Vd, grid = start()  # Vd: dual variable (scaled coordinates); grid: S's (scale, zero) or None
    kept = max(int(mask.sum()), 1)
    with timer("objective"):
        obj = p.objective(Z, U, Rt)
    trace = [obj]
    best = (obj, mask, Z, U, Rt, VH, grid)
    prev_mask = mask
    rho, grown = rho0, False
    restarts = diverged = 0
    G, G_rho = None, None
    it = 0
    for it in range(1, max_iters + 1):
        with timer("B-update"):
            if G_rho != rho:  # (Ĥ + rho I)^-1 from the eigendecomposition, rebuilt only when rho changes
                G, G_rho = p.sh.resolvent(rho, p.dtype), rho
            # B = [(W~ - L~) Ĥ - V + rho Z] (Ĥ + rho I)^-1: one [d_out, d_in] x [d_in, d_in] product
            R = p.WH - Vd if VH is None else torch.addmm(p.WH, U, VH, alpha=-1.0).sub_(Vd)
            B = R.add_(Z, alpha=rho) @ G
        with timer("projection"):
            mask, Z, grid = p.project(torch.add(B, Vd, alpha=1.0 / rho))
        with timer("B-update"):
            Vd.add_(B, alpha=rho).sub_(Z, alpha=rho)  # V += rho (B - Z)
        if p.r > 0:
            with timer("L-step"):
                U, Rt, VH = p.lowrank_step(B.neg_().add_(p.Wt), VH)  # fit of W~ - B (B is not needed again)
        if it % check_every:
            continue
        with timer("objective"):
            obj = p.loop_objective(Z, U, Rt)
        trace.append(obj)
        if not math.isfinite(obj) or obj > diverge_factor * best[0]:
            # divergence guard: back to the best iterate with a clean dual and a much larger rho
            diverged += 1
            _, mask, Z, U, Rt, VH, grid = best
            Vd = torch.zeros_like(Vd)
            rho, grown, prev_mask = min(rho * 10, rho_max), True, mask
            if diverged > 5:
                break
            continue
        if obj < best[0]:
            best = (obj, mask, Z, U, Rt, VH, grid)
        delta = float((mask ^ prev_mask).sum()) / kept
        prev_mask = mask
        if delta > 0.1:
            rho, grown = rho * rho_grow[0], True
        elif delta > 0.005:
            rho, grown = rho * rho_grow[1], True
        elif delta > 0:
            if grown:
                rho *= rho_grow[2]
            else:  # rho0 froze the support too early: shrink and restart B, Z, V
                rho /= 5
                restarts += 1
                mask, Z, Vd, grid = start()
                prev_mask = mask
        elif grown:
            break
        else:
            rho /= 5
        rho = min(rho, rho_max)
        if it >= min_iters and delta < stop_delta:
            break
    return {"best": best, "trace": trace, "iterations": it, "restarts": restarts, "diverged": diverged, "rho": rho}


def _polish(p: _Scaled, Hd, mask, St, U, Vt, grid, obj, trace, timer: Timer, *, polish_rounds, polish_tol, backsolve,
            cg_iters):
    """Alternate the exact L refit and the S backsolve on the fixed support (on S's grid when quantized) while a round
    lowers the objective by more than ``polish_tol``; float64 throughout. Appends accepted objectives to ``trace``;
    returns (S~, U, V~, grid, objective). Hd: the damped H (GPTQ's metric when S is quantized)."""
    sh, r, quant, Wt64 = p.sh, p.r, p.quant, p.Wt64

    def requantize(X: torch.Tensor):
        """GPTQ of the scaled X [d_out, d_in] on S's support and grid (the damped metric), back in scaled coords."""
        Sq, _, g = prune_quantize(X / sh.d, Hd, p.spec, quant, percdamp=0.0, fixed_mask=mask)
        return Sq.double() * sh.d, g

    for _ in range(polish_rounds):
        if r > 0:
            with timer("refit"):  # exact whitened fit of L against the PROJECTED S
                U2, Vt2 = p.refit(St)
        else:
            U2, Vt2 = U, Vt
        cands = [(St, grid)]  # (S~, its grid): candidates for S given the refit L
        if backsolve:
            with timer("backsolve"):
                T = Wt64 - U2 @ Vt2
                S2 = masked_cg(St, mask, T, sh.Hh, cg_iters)
            cands = [(S2, None)]
            if quant is not None:  # back onto the grid: GPTQ of the backsolve, or S as it was
                with timer("requantize"):
                    cands = [(St, grid), requantize(S2)]
        with timer("objective"):
            obj2, S2, grid2 = min(((sh.objective(Wt64 - c - U2 @ Vt2), c, g) for c, g in cands), key=lambda x: x[0])
        if not obj2 < obj:
            break
        trace.append(obj2)
        gain = (obj - obj2) / obj if obj > 0 else 0.0
        obj, St, U, Vt, grid = obj2, S2, U2, Vt2, grid2
        if gain <= polish_tol:
            break
    if quant is not None and r > 0:  # S moved on its grid after the last L refit: refit L once more
        with timer("refit"):
            U2, Vt2 = p.refit(St)
            obj2 = sh.objective(Wt64 - St - U2 @ Vt2)
        if obj2 < obj:
            trace.append(obj2)
            obj, U, Vt = obj2, U2, Vt2
    return St, U, Vt, grid, obj


@register("admm", kind="slr", bits=True)
def admm(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    max_iters: int = 400,
    min_iters: int = 20,
    check_every: int = 10,
    rho0: float = 0.1,
    rho_grow: tuple[float, float, float] = (1.07, 1.2, 1.5),
    stop_delta: float = 5e-3,
    rho_max: float = 1e6,
    init: str = "weights",
    lr_oversample: int = 8,
    lr_niter: int = 0,
    polish_rounds: int = 1,
    polish_tol: float = 1e-3,
    backsolve: bool = True,
    cg_iters: int = 10,
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
    diverge_factor: float = 10.0,
    dtype: torch.dtype = torch.float32,
) -> SolveResult:
    """3BASiL ADMM for S (pattern of ``spec``) + L (rank spec.rank), with the methods.md §7.3 fixes.

    W: [d_out, d_in], H = X^T X [d_in, d_in]. Options (the tuning behind the defaults: BENCHMARKS.md, "Tuning notes"):
      max_iters, min_iters, check_every, stop_delta: at most ``max_iters`` iterations; the objective and the support
        change Δ are checked every ``check_every``, and the loop stops at a check where Δ < ``stop_delta`` once
        ``min_iters`` are done (or Δ = 0 after rho has grown). rho0, rho_grow: the penalty starts at rho0 and grows by
        rho_grow[0] / [1] / [2] while Δ > 10% / > 0.5% / > 0 (module docstring). ``rho_grow=(1.1, 1.05, 1.02),
        max_iters=2000`` is the reference schedule of the 3BASiL code.
      init="weights": B0 = W~, L0 = 0 as in 3BASiL; "residual" (L0 = whitened rank-r SVD of W, B0 = W~ - L~0) and
        "hybrid" (that L0, B0 = W~) are the §7.3 warm starts.
      lr_niter, lr_oversample: each L step is ``lr_niter`` + 1 block-power steps of a randomized SVD with
        ``lr_oversample`` extra columns, warm-started from the previous right subspace; the final refit uses an exact
        SVD.
      polish_rounds, polish_tol, cg_iters: each polish round is an exact L refit against the projected S, then a CG
        backsolve (``cg_iters`` steps) of S on its support; a round is kept only if it lowers the objective, and the
        next round runs only if this one lowered it by more than ``polish_tol`` (relative).
      percdamp, diag_frac: 3BASiL's damping (percdamp of the mean diagonal + diag_frac of each diagonal entry).
      dtype: of the iteration (the eigendecomposition, objectives and polish are float64).
      diverge_factor: a check whose objective is non-finite or diverge_factor x the best restores the best iterate,
        clears the dual and multiplies rho by 10 (``info["restarts"]``).
    spec.bits / factor_bits: S (and U, V) on their grids (module docstring); ``qparams`` holds their (scale, zero).
    info: objective (true undamped objective of the projected iterate (Z, L) at start and every check, then of each
    accepted polish round, then of the result with quantized factors; the result is the best iterate, so without
    factor quantization its objective is min(objective)), best_objective (the result's), iterations, restarts,
    diverged, rho, seconds, time (seconds per step).
    """
    validate_inputs(W, H, spec)
    t_start = time.perf_counter()
    timer = Timer()
    d_out, d_in = W.shape
    r = spec.rank
    if init not in ("weights", "residual", "hybrid"):
        raise ValueError(f"unknown init {init!r}")

    with timer("eig"):
        sh = scaled_hessian(H, percdamp, diag_frac)
        sh.roots(dtype)  # built once per (H, dtype); _Scaled reads them from the cache
    p = _Scaled(W, sh, spec, dtype, lr_oversample, lr_niter)
    U = torch.zeros(d_out, r, dtype=dtype)
    Rt = torch.zeros(r, d_in, dtype=dtype)
    VH = None  # None until the first L step (L~ = 0)
    if r > 0 and init != "weights":
        with timer("L-step"):
            P, s, Rt = truncated_svd(p.Wt @ p.Sq, r, "exact")
            U, VH = P * s, Rt @ p.Sq
    B0 = p.Wt - U @ (Rt @ p.Sqi) if init == "residual" else p.Wt  # W~ - L~0, or W~ as in 3BASiL
    run = _iterate(p, B0, U, Rt, VH, timer, max_iters=max_iters, min_iters=min_iters, check_every=check_every,
                   rho0=rho0, rho_grow=rho_grow, stop_delta=stop_delta, rho_max=rho_max,
                   diverge_factor=diverge_factor)
    trace = run["trace"]

    _, mask, Z, U, Rt, _, grid = run["best"]
    St = Z.double()
    U, Vt = U.double(), (Rt @ p.Sqi).double()
    with timer("objective"):
        obj = sh.objective(p.Wt64 - St - U @ Vt)  # exact float64 value of the best iterate
    Hd = damp_hessian(H, percdamp, diag_frac) if spec.quant is not None or spec.factor_bits != 16 else None
    St, U, Vt, grid, obj = _polish(p, Hd, mask, St, U, Vt, grid, obj, trace, timer, polish_rounds=polish_rounds,
                                   polish_tol=polish_tol, backsolve=backsolve, cg_iters=cg_iters)

    S = (St / sh.d).float() * mask
    V = (Vt / sh.d).float()
    U = U.float().contiguous() if r > 0 else None
    V = V if r > 0 else None
    qparams = {}
    if spec.quant is not None:  # exactly on the grid (S~ / d is, up to the rounding of the scaling)
        S = dequantize(quantize(S, *grid, spec.quant), *grid, spec.quant) * mask
        qparams["S"] = grid
    if r > 0 and spec.factor_bits != 16:
        with timer("factor-quant"):
            U, V, qf = quantize_factors(W.float() - S, U, Hd, spec)
        qparams |= qf
    if qparams:
        with timer("objective"):
            obj = layer_objective(W, H, S + U @ V if r > 0 else S)
        trace.append(obj)
    info = {"objective": trace, "best_objective": obj, "iterations": run["iterations"], "restarts": run["restarts"],
            "diverged": run["diverged"], "rho": run["rho"], "seconds": time.perf_counter() - t_start,
            "time": timer.s}
    return SolveResult(S=S, mask=mask, U=U, V=V, info=info, qparams=qparams)
