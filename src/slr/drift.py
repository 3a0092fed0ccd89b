"""Drift correction (asymmetric calibration, as in GPTAQ): fit each linear to the dense model's outputs of it.

The usual layer problem fits W_hat to W on the compressed path's inputs X_c (rows = tokens): min ||X_c (W - W_hat)^T||.
The error the earlier blocks pass on (X_c != X_d, the dense path's inputs) is then never corrected. With drift
correction the target is the dense model's own output of the layer, min ||X_c W_hat^T - X_d W^T||, which equals
||X_c (W* - W_hat)^T|| + const for the least-squares target

    W* = W C H^-1,   C = X_d^T X_c / n,   H = X_c^T X_c / n   (both [d_in, d_in], one pair per input group),

so every solver keeps its ``fn(W, H, spec)`` form and gets W* in place of W. Both matrices get lam I added, lam =
``damp`` x mean(diag H): W* = W (C + lam I)(H + lam I)^-1, which is W exactly where the two paths agree (block 0)
and keeps dead input channels at W. ``a`` in [0, 1] mixes the targets: W + a (W* - W).

``CrossCollector`` accumulates C per input group from two forwards of the (still dense) block on the same batch:
the compressed path's first (its inputs to each group are kept), then the dense path's.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import BlockInputs, _Stop, block_forward


class CrossCollector:
    """Pre-hooks that accumulate C = X_d^T X_c / n_tokens per input group (fp32 batch products, fp64 sum)."""

    def __init__(self, linears: dict[str, nn.Linear], groups: list[tuple[str, ...]]):
        self.groups = list(groups)
        self.C: dict[tuple[str, ...], torch.Tensor] = {}
        self.n: dict[tuple[str, ...], int] = {}
        self._xc: dict[tuple[str, ...], torch.Tensor] = {}
        self._dense = False
        self.hooks = [linears[g[0]].register_forward_pre_hook(self._hook(g)) for g in groups]

    def _hook(self, g):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, d_in]
            if not self._dense:
                self._xc[g] = x
                done = len(self._xc) == len(self.groups)
            else:
                c = (x.T @ self._xc.pop(g)).double()  # X_d^T X_c of this batch [d_in, d_in]
                self.C[g] = self.C[g] + c if g in self.C else c
                self.n[g] = self.n.get(g, 0) + x.shape[0]
                done = not self._xc
            if done:
                raise _Stop  # every group's input of this forward is in: the rest of the block is not needed
        return hook

    def add(self, block: nn.Module, inputs: BlockInputs, index: int, compressed: torch.Tensor,
            dense: torch.Tensor) -> None:
        """One batch: the block on the compressed path's inputs, then on the dense path's (the same windows)."""
        for self._dense, hidden in ((False, compressed), (True, dense)):
            try:
                block_forward(block, inputs, index, hidden)
            except _Stop:
                pass

    def finish(self, group=None) -> dict[tuple[str, ...], torch.Tensor]:
        """C per group; under torch.distributed the sums and token counts are all-reduced over the ranks first."""
        for h in self.hooks:
            h.remove()
        if group is not None and group.active:
            for g in self.groups:
                group.all_reduce_(self.C[g])
                self.n[g] = int(group.sum_float(float(self.n[g])))
        return {g: C / self.n[g] for g, C in self.C.items()}


def drift_map(H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """M = (C + lam I)(H + lam I)^-1 [d_in, d_in] (float64), lam = damp x mean(diag H): W* = W M."""
    H, C = H.double(), C.double()
    lam = damp * float(torch.diagonal(H).mean().clamp_min(1e-12))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    # M^T = (H + lam I)^-1 (C + lam I)^T, H symmetric
    return torch.linalg.solve(H + lam * eye, (C + lam * eye).T).T


def corrected(W: torch.Tensor, M: torch.Tensor, a: float) -> torch.Tensor:
    """W + a (W M - W) [d_out, d_in], in W's dtype."""
    W64 = W.double()
    return (W64 + a * (W64 @ M - W64)).to(W.dtype)


__all__ = ["CrossCollector", "corrected", "drift_map"]
