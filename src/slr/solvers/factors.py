"""Low-rank factors on their grid, with their own error compensation (SLiM-LoRA^Q / LQER style, done with GPTQ).

Given E (the residual W - S the factors were fitted to), a fit L = U V and the (damped) metric Hd, the objective is
f(U, V) = tr((E - U V) Hd (E - U V)^T). Steps:

1. Keep U's column space, with orthonormal columns Qu (QR). For U = Qu, f(Qu, V) = f(Qu, V*) + tr((V - V*) Hd
   (V - V*)^T) with V* = Qu^T E the best V: the rows of V are independent GPTQ problems with Hessian Hd.
2. V on its grid (rows of d_in entries, groups along the row) by GPTQ of V* with Hessian Hd.
3. U refit in closed form against the quantized V: U = E Hd Vq^T (Vq Hd Vq^T)^+ (it absorbs V's rounding error).
4. U on its grid (rows of r entries) by GPTQ with the exact Hessian of f in U's rows, Hu = Vq Hd Vq^T [r, r].
"""

from __future__ import annotations

import torch

from ..spec import LayerSpec
from .obs import prune_quantize

DENSE = LayerSpec(sparsity=0.0)


def quantize_factors(
    E: torch.Tensor, U: torch.Tensor, Hd: torch.Tensor, spec: LayerSpec, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(U [d_out, r], V [r, d_in] float32 on spec's factor grids, {"U": (scale, zero), "V": (scale, zero)}).

    E: [d_out, d_in] the target of L; U: [d_out, r] the left factor of its float fit (only its column space is used);
    Hd: [d_in, d_in] the damped Hessian of the fit (no further damping is added to it).
    """
    r, d_in = U.shape[1], E.shape[1]
    qv, qu = spec.factor_quant(d_in), spec.factor_quant(r)
    E, Hd = E.double(), Hd.double()
    Qu = torch.linalg.qr(U.double()).Q  # [d_out, r] orthonormal, U's column space
    Vq, _, pv = prune_quantize(Qu.T @ E, Hd, DENSE, qv, blocksize, percdamp=0.0)  # GPTQ of V* = Qu^T E [r, d_in]
    Vq64 = Vq.double()
    Hu = Vq64 @ Hd @ Vq64.T  # [r, r]
    Hu = 0.5 * (Hu + Hu.T)
    U1 = (E @ Hd @ Vq64.T) @ torch.linalg.pinv(Hu, hermitian=True)  # [d_out, r] best U for Vq
    # a little damping: Hu is singular when E has rank < r (GPTQ needs its Cholesky)
    Uq, _, pu = prune_quantize(U1, Hu, DENSE, qu, blocksize, percdamp=1e-6)
    return Uq, Vq, {"U": pu, "V": pv}
