"""Global allocators: choose each matrix's (sparsity or N:M, rank) under one retained-parameter budget.

``make_plan(model, config, calib, device) -> (Plan, info)`` dispatches on ``config.allocate``:

  uniform   the same spec everywhere (scaled to config.budget when given)
  owl       OWL per-block sparsity from outlier ratios (pure pruning, or around a fixed rank for S+LR)
  knapsack  ours: proxy loss-vs-cost curves per matrix + a Lagrangian multiple-choice knapsack (fast)
  cap       CAP: Bernoulli keep-probabilities over candidate pools, REINFORCE + budget projection

Budget = config.budget, the global retained fraction (kept sparse values + Σ r (m + n)) / Σ m n over the compressed
linears (PROTOCOL §5); without it, the fraction of the uniform config.layer_spec(). Every plan lands on the budget to
within one row of the narrowest matrix (never above it). What the plan controls depends on the method (``mode``):
pruning methods get sparsities, rank-only methods ranks, S+LR methods both (with --pattern N:M only the ranks).
info always holds {"allocator", "budget", "achieved_fraction", "seconds", "per_matrix": {key: {"sparsity", "rank"}}}.
Allocator options (keyword arguments of ``make_plan``) are documented in each module's ``allocate``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import SLRError
from ..plan import Plan
from . import cap, knapsack, owl, uniform
from .base import SPAN, check_span, plan_fraction
from .cap import project_budget

ALLOCATORS = {"uniform": uniform.allocate, "owl": owl.allocate, "knapsack": knapsack.allocate, "cap": cap.allocate}


def make_plan(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu",
              **opts) -> tuple[Plan, dict]:
    """Per-matrix plan for ``model`` under ``config.budget`` with allocator ``config.allocate``; see the module doc."""
    name = config.allocate
    if name not in ALLOCATORS:
        raise SLRError(f"unknown allocator {name!r}", f"choose one of: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name](model, config, calib, device, **opts)


def check_alloc_opts(name: str, opts: dict) -> None:
    """Refuse unknown or mistyped allocator options (``--alloc-opt KEY=VALUE``) before any heavy work."""
    from ..config import check_options

    if name not in ALLOCATORS:
        raise SLRError(f"unknown allocator {name!r}", f"choose one of: {', '.join(ALLOCATORS)}")
    # device comes from --device; norms is a Python-API shortcut; mode is read from **opts by alloc_mode
    check_options(ALLOCATORS[name], opts, flag="--alloc-opt", what=f"the {name} allocator", skip=("device", "norms"),
                  extra=("mode",))
    if name == "knapsack":
        knapsack.check_opts(opts)
    if name == "cap":
        check_span(opts.get("span", SPAN), "CAP")


__all__ = ["ALLOCATORS", "check_alloc_opts", "make_plan", "plan_fraction", "project_budget"]
