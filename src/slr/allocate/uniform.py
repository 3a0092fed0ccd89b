"""Uniform allocation: the same spec for every matrix, scaled to the budget when one is given.

Without config.budget this is config.layer_spec() everywhere. With a budget:
  sparse: every matrix keeps the same fraction (1 - budget) of zeros;
  slr:    rank config.rank everywhere, and one common sparse density that spends the rest of the budget;
  rank:   every matrix gets the rank whose r (m + n) is the budget fraction of its m n.
Row rounding residuals are then spread by ``fit_budget``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..config import CompressConfig, keep_per_row
from ..errors import SLRError
from ..plan import Plan
from .base import Choice, alloc_mode, finish, fit_budget, fixed_params, matrices, nm_of, resolve_budget, uniform_choice


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu",
             **opts) -> tuple[Plan, dict]:
    t0 = time.perf_counter()
    mode = alloc_mode(config, opts)
    mats = matrices(model)
    nm = nm_of(config)
    spec = config.layer_spec()
    budget = resolve_budget(config, mats, mode)
    choices = [uniform_choice(m, spec, mode) for m in mats]
    if config.budget is not None:
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
                raise SLRError(f"rank {config.rank} alone exceeds the budget {budget}",
                               "raise --budget or lower --rank")
            choices = [Choice(keep_per_row(m.d_in, 1.0 - density), c.rank) for m, c in zip(mats, choices)]
        choices = fit_budget(mats, choices, target, mode, nm)
    return finish("uniform", mats, choices, mode, nm, budget, t0)
