"""SparseGPT (Frantar & Alistarh 2023): OBS column sweep with lazy block updates (``obs``).

Mask chosen adaptively per block of ``blocksize`` columns by w^2 / [H^-1]_jj^2; N:M chosen per group of M columns
as the sweep reaches it. Pruning error is propagated to the not-yet-visited columns. With ``spec.bits`` the kept
values are quantized in the same sweep (the paper's joint mode): each group's grid is fitted on its kept entries when
the sweep enters it (for N:M, on the entries the N:M rule would keep at that moment; the masks themselves are still
chosen M-group by M-group), and the rounding error is compensated like the pruning error.
"""

from __future__ import annotations

import time

import torch

from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .obs import prune_quantize


@register("sparsegpt", kind="sparse", bits=True)
def sparsegpt(
    W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, blocksize: int = 128, percdamp: float = 0.01
) -> SolveResult:
    validate_inputs(W, H, spec)
    t = time.perf_counter()
    S, mask, qp = prune_quantize(W, H, spec, spec.quant, blocksize, percdamp)
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t}, qparams={"S": qp} if qp else {})
