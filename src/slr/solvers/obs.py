"""The OBS column sweep shared by SparseGPT and GPTQ, and its projection: prune and/or quantize one column at a time.

Sweep (GPTQ §3.4, SparseGPT §3): with C = chol(H^-1) (upper), visit the input columns left to right in blocks of
``blocksize``. Column j is replaced by its projection q_j; its error e = (w_j - q_j) / C_jj is subtracted as
e C_{j, j:} from the rest of the block at once and from the later blocks lazily (one matmul per block).

Projection (``Projector``): the support is SparseGPT's (w^2 / [H^-1]_jj^2, smallest pruned: per block for an
unstructured budget, per group of M for N:M), the values GPTQ's (each kept value rounded to its group's grid; the
group's scale is fitted on the *current, updated* kept entries when the sweep enters the group; for N:M, whose masks
are chosen later, M-group by M-group, on the entries the N:M rule would keep at that moment). Pruning and quantizing
in one sweep is SparseGPT's joint mode; with no pruning it is plain GPTQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import SLRError
from ..quant import QuantSpec, fit_params, quantize_column
from ..spec import LayerSpec
from .base import damp_hessian

# project(i1, i, W1, Hinv1) -> q [d_out]: column i1 + i of the block W1 = W[:, i1:i2] (current values) projected
Project = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def hinv_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float64), with damping and dead-input handling."""
    Hd = damp_hessian(H, percdamp)
    for extra in (0.0, 0.1, 1.0, 10.0):  # escalate damping if Cholesky fails
        try:
            Hx = Hd + extra * torch.diagonal(Hd).mean() * torch.eye(Hd.shape[0], dtype=Hd.dtype)
            L = torch.linalg.cholesky(Hx)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping")


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, project: Project, blocksize: int) -> torch.Tensor:
    """W [d_out, d_in] float64 with every column replaced by ``project``'s value, errors compensated (a new tensor).

    Hinv: [d_in, d_in] upper Cholesky factor of H^-1 (``hinv_upper``). The caller aligns ``blocksize`` with the
    projection's groups (a group must not straddle two blocks).
    """
    W = W.clone()
    d_in = W.shape[1]
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].clone()  # [d_out, B]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = project(i1, i, W1, Hinv1)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


class Projector:
    """SparseGPT's support and GPTQ's grid, chosen lazily as the sweep reaches them (the ``Project`` callback).

    mask: [d_out, d_in] the support chosen so far (or ``fixed_mask``). scale, zero: [d_out, d_in / g] the grid
    (fitted per group on entry, or given up front: ``static``). ``order``: the original column index of each swept
    position (act-order sweeps), which decides a column's group.
    """

    def __init__(self, spec: LayerSpec, shape: tuple[int, int], quant: QuantSpec | None = None,
                 fixed_mask: torch.Tensor | None = None, static: tuple[torch.Tensor, torch.Tensor] | None = None,
                 order: torch.Tensor | None = None, clip: bool = False):
        d_out, d_in = shape
        self.clip = clip
        self.spec, self.quant, self.order = spec, quant, order
        self.fixed = fixed_mask is not None
        self.mask = fixed_mask.clone() if self.fixed else torch.zeros(d_out, d_in, dtype=torch.bool)
        self.d_in = d_in
        self.total_prune = d_out * d_in - spec.kept(d_out, d_in)  # split over blocks in proportion to width
        m = spec.nm[1] if spec.nm is not None else 1
        self.unit = m if quant is None else math.lcm(m, quant.group_size)  # no M-group or quant group straddles blocks
        if quant is not None:
            groups = d_in // quant.group_size
            self.static = static is not None
            self.scale, self.zero = static if static is not None else (torch.ones(d_out, groups),
                                                                       torch.zeros(d_out, groups))

    def align(self, blocksize: int) -> int:
        """The smallest multiple of M (and of the quant group) >= blocksize: no group straddles two blocks."""
        unit = 1 if (self.fixed and self.quant is None) else self.unit  # a fixed support has no N:M step
        return -(-blocksize // unit) * unit

    def __call__(self, i1: int, i: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor:
        j = i1 + i
        if not self.fixed:
            self._choose_support(i1, i, W1, Hinv1)
        keep = self.mask[:, j]
        q = W1[:, i].clone()
        q[~keep] = 0
        if self.quant is None:
            return q
        g = self.quant.group_size
        if not self.static and j % g == 0:  # entering a group: its grid from the current kept values
            keep_g = self.mask[:, j:j + g]
            if self.spec.nm is not None and not self.fixed:  # N:M not chosen yet: what the rule keeps now
                keep_g = self._nm_keep(W1[:, i:i + g], torch.diagonal(Hinv1)[i:i + g])
            s, z = fit_params(W1[:, i:i + g], self.quant, keep_g, clip=self.clip)
            self.scale[:, j // g], self.zero[:, j // g] = s[:, 0], z[:, 0]
        k = (j if self.order is None else int(self.order[j])) // g
        return quantize_column(q, self.scale[:, k], self.zero[:, k], self.quant).to(q.dtype) * keep

    def _choose_support(self, i1: int, i: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> None:
        spec = self.spec
        if spec.nm is None:
            if i == 0:  # unstructured: this block's share of the pruned count, smallest w^2 / [H^-1]_jj^2
                i2 = i1 + W1.shape[1]
                n_prune = round(self.total_prune * i2 / self.d_in) - round(self.total_prune * i1 / self.d_in)
                tmp = W1**2 / (torch.diagonal(Hinv1)[None, :] ** 2)
                keep1 = torch.ones_like(W1, dtype=torch.bool)
                if n_prune > 0:
                    idx = torch.topk(tmp.flatten(), n_prune, largest=False).indices
                    keep1.view(-1)[idx] = False
                self.mask[:, i1:i2] = keep1
            return
        m = spec.nm[1]
        if i % m == 0:
            self.mask[:, i1 + i:i1 + i + m] = self._nm_keep(W1[:, i:i + m], torch.diagonal(Hinv1)[i:i + m])

    def _nm_keep(self, Wc: torch.Tensor, hdiag: torch.Tensor) -> torch.Tensor:
        """N:M support [d_out, c] of the columns Wc [d_out, c] (c a multiple of M), hdiag [c] their [H^-1]_jj."""
        n, m = self.spec.nm
        tmp = (Wc**2 / hdiag[None, :] ** 2).reshape(Wc.shape[0], -1, m)  # [d_out, c / M, M]
        drop = torch.topk(tmp, m - n, dim=2, largest=False).indices
        return torch.ones_like(tmp, dtype=torch.bool).scatter_(2, drop, False).reshape(Wc.shape)


def prune_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    quant: QuantSpec | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    fixed_mask: torch.Tensor | None = None,
    actorder: bool = False,
    static_groups: bool = False,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One OBS sweep: (S [d_out, d_in] float32 on the support and, with ``quant``, on the grid; mask; (scale, zero)
    [d_out, d_in / g] or None).

    spec: the support (sparsity / N:M; sparsity 0 keeps everything), or ``fixed_mask`` [d_out, d_in] (only the OBS
    update on that support). static_groups: every group's grid is fitted on the (dead-zeroed) W before the sweep, as
    llm-compressor's GPTQ does, instead of on the updated weights when the sweep enters the group. actorder: sweep the
    inputs by decreasing H_jj (GPTQ's act-order) with static groups (groups stay the original consecutive inputs); a
    dense S only. clip: each group's grid range is searched (``quant.fit_params``). Dead inputs (H_jj = 0) are zeroed.
    """
    W = W.double().clone()  # [d_out, d_in]
    d_out, d_in = W.shape
    if quant is not None:
        quant.validate(d_in)
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    order = static = None
    if actorder:
        if quant is None or fixed_mask is not None or spec.nm is not None or spec.kept(d_out, d_in) < d_out * d_in:
            raise SLRError("actorder quantizes a dense S only", "drop actorder, or pass sparsity 0 and no pattern")
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    if quant is not None and (actorder or static_groups):
        static = fit_params(W, quant, clip=clip)  # the original consecutive inputs' groups, fitted before the sweep
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    proj = Projector(spec, (d_out, d_in), quant, fixed_mask, static, order, clip)
    Q = obs_sweep(W, hinv_upper(H, percdamp), proj, proj.align(blocksize))
    mask = proj.mask
    if order is not None:
        inv = torch.argsort(order)
        Q, mask = Q[:, inv], mask[:, inv]
    qparams = (proj.scale, proj.zero) if quant is not None else None
    return (Q * mask).float(), mask, qparams
