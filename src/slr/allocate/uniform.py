"""Uniform allocation: the same spec for every matrix, scaled to the budget when one is given.

Without config.alloc.budget this is config.layer_spec() everywhere. With a budget:
  sparse: every matrix keeps the same fraction (1 - budget) of zeros;
  slr:    rank config.rank everywhere, and one common sparse density that spends the rest of the budget;
  rank:   every matrix gets the rank whose r (m + n) is the budget fraction of its m n.
  joint:  every input group (q,k,v; gate,up; ...) gets the shared rank k whose k (n + sum m_i) is the budget
          fraction of its sum m_i n (the shared V is paid once), rounded down, so the plan never exceeds the budget.
Row rounding residuals are then spread by ``fit_budget``. With config.alloc.budget_bits: ``bits.uniform_plan``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import SLRError
from ..models.adapters import get_adapter
from ..plan import Plan, key
from ..solvers.base import method
from ..spec import LayerSpec, keep_per_row
from . import bits
from .base import (
    Choice,
    alloc_mode,
    finish,
    fit_budget,
    fixed_params,
    matrices,
    nm_of,
    resolve_budget,
    uniform_choice,
)

if TYPE_CHECKING:
    from ..config import CompressConfig


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *,
             mode: str | None = None) -> tuple[Plan, dict]:
    if config.alloc.budget_bits is not None:
        return bits.uniform_plan(model, config, mode)
    t0 = time.perf_counter()
    if method(config.method).group:
        return _joint_ranks(model, config, t0)
    mode = alloc_mode(config, mode)
    mats = matrices(model)
    nm = nm_of(config)
    spec = config.layer_spec()
    budget = resolve_budget(config, mats, mode)
    choices = [uniform_choice(m, spec, mode) for m in mats]
    if config.alloc.budget is not None:
        total = sum(m.numel for m in mats)
        target = int(budget * total)
        if mode == "rank" or nm is not None:
            free = budget * total - fixed_params(mats, mode, nm)
            if free < 0:
                raise SLRError(f"the fixed {config.pattern} sparse part alone exceeds the budget {budget}",
                               "raise --budget or drop --pattern")
            scale = free / sum(m.numel for m in mats)
            choices = [Choice(None, min(int(scale * m.numel / m.lr_unit), m.d_out, m.d_in)) for m in mats]
        else:
            lr = sum(c.rank * m.lr_unit for m, c in zip(mats, choices))
            density = (budget * total - lr) / total
            if density <= 0:
                raise SLRError(f"rank {config.layer_spec().rank} alone exceeds the budget {budget}",
                               "raise --budget or lower --rank")
            choices = [Choice(keep_per_row(m.d_in, 1.0 - density), c.rank) for m, c in zip(mats, choices)]
        choices = fit_budget(mats, choices, target, mode, nm)
    return finish("uniform", mats, choices, mode, nm, budget, t0, base=config.layer_spec())


def _joint_ranks(model: nn.Module, config: CompressConfig, t0: float) -> tuple[Plan, dict]:
    """Shared-V group methods: one rank k per input group, priced k (n + sum m_i) since V is stored once.

    A group's k may exceed a member's own min(m, n) (k_proj is 192 x 576 but shares V with q_proj), so the specs
    here are not validated per matrix; the group solver checks k <= n.
    """
    mats = {m.key: m for m in matrices(model)}
    total = sum(m.numel for m in mats.values())
    budget = None if config.alloc.budget is None else resolve_budget(config, list(mats.values()), "rank")
    ad = get_adapter(model)
    plan, per, kept = Plan(), {}, 0
    for i, block in enumerate(ad.blocks(model)):
        names = ad.linears(block)
        for g in ad.groups:
            ms = [mats[key(i, n)] for n in g if n in names]
            if not ms:
                continue
            d_in, d_out = ms[0].d_in, sum(m.d_out for m in ms)
            k = config.layer_spec().rank if budget is None else int(budget * d_out * d_in / (d_in + d_out))
            k = max(1, min(k, d_in, d_out))
            for m in ms:
                plan.specs[m.key] = LayerSpec(sparsity=1.0, rank=k)
                per[m.key] = {"sparsity": None, "rank": k, "group": list(g)}
            kept += k * (d_in + d_out)
    info = {"allocator": "uniform", "budget": budget if budget is not None else kept / total,
            "achieved_fraction": kept / total, "retained_params": kept, "dense_params": total, "mode": "joint",
            "seconds": time.perf_counter() - t0, "per_matrix": per}
    return plan, info
