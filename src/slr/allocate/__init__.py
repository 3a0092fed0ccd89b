"""Global allocators: choose each matrix's (sparsity or N:M, rank) under one retained-parameter budget.

``make_plan(model, config, calib, device) -> (Plan, info)`` dispatches on ``config.alloc.method``:

  uniform   the same spec everywhere (scaled to config.alloc.budget when given)
  owl       OWL per-block sparsity from outlier ratios (pure pruning, or around a fixed rank for S+LR)
  knapsack  ours: proxy loss-vs-cost curves per matrix + a Lagrangian multiple-choice knapsack (fast)
  cap       CAP: categorical rank and density levels per matrix over candidate pools, REINFORCE on the KL to dense
  search    evolutionary search over the same levels (EvoPress-style mutation and multi-step selection)

Budget = config.alloc.budget, the global retained fraction (kept sparse values + Σ r (m + n)) / Σ m n over the
compressed linears (PROTOCOL §5); without it, the fraction of the uniform config.layer_spec(). Every plan lands on
the budget to within one row of the narrowest matrix (never above it). What the plan controls depends on the method
(``mode``): pruning methods get sparsities, rank-only methods ranks, S+LR methods both (with --pattern N:M only
the ranks).
info always holds {"allocator", "budget", "achieved_fraction", "seconds", "per_matrix": {key: {"sparsity", "rank"}}}
(and "bits" per matrix when S is quantized). A budget in bits instead (config.alloc.budget_bits, all
but owl): S's bit width and the rank per matrix under an average of bits per weight (``bits``; cap and search:
``bitlevels``); info then has "budget_bits" and "achieved_bpw", and "budget" is None.
Allocator options (``config.alloc.options``, typed from each module's ``allocate`` keywords) are documented there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import SLRError
from ..options import as_kwargs, make_options, options_type
from ..plan import Plan
from . import cap, knapsack, owl, search, uniform
from .base import check_span, plan_fraction

if TYPE_CHECKING:
    from ..config import CompressConfig


@dataclass(frozen=True)
class Allocator:
    """A registered allocator: ``fn(model, config, calib, device, **options) -> (Plan, info)``, the dataclass of its
    options (its keyword defaults; ``norms``, CAP's ``start``, knapsack's ``visit`` and ``solved`` are Python-only
    and not options), and a check of their values that runs before any heavy work."""

    name: str
    fn: Callable
    options: type
    check: Callable | None = None


def _allocator(name: str, fn: Callable, check: Callable | None = None) -> Allocator:
    skip = ("device", "norms", "start", "visit", "solved", "compress")  # Python-only arguments, not options
    return Allocator(name, fn, options_type(name, fn, skip=skip), check)


ALLOCATORS = {a.name: a for a in (
    _allocator("uniform", uniform.allocate),
    _allocator("owl", owl.allocate),
    _allocator("knapsack", knapsack.allocate, knapsack.check_opts),
    _allocator("cap", cap.allocate, lambda o: check_span(o.span, "CAP")),
    _allocator("search", search.allocate, lambda o: check_span(o.span, "search")),
)}


def allocator(name: str) -> Allocator:
    if name not in ALLOCATORS:
        raise SLRError(f"unknown allocator {name!r}", f"choose one of: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def make_plan(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu",
              norms: dict | None = None, compress: Callable | None = None, **options) -> tuple[Plan, dict]:
    """Per-matrix plan for ``model`` under ``config.alloc`` (allocator, budget, options); see the module doc.

    ``options`` override ``config.alloc.options`` (checked the same way); ``norms`` hands precomputed input norms to
    the allocators that take them; ``compress`` (``pipeline.compress_``, passed by ``plan_for``) lets CAP and search
    solve their levels in the pipeline (``level_solve="pipeline"``), and the plan then carries those solves
    (``Plan.solved``) for the compression to take as they are.
    """
    a = allocator(config.alloc.method)
    opts = config.alloc.options
    if options:
        opts = make_options(a.options, as_kwargs(opts) | options, flag="option", what=f"the {a.name} allocator")
        if a.check is not None:
            a.check(opts)
    kw = as_kwargs(opts) | ({"norms": norms} if norms is not None else {})
    if compress is not None and "compress" in inspect.signature(a.fn).parameters:
        kw["compress"] = compress
    return a.fn(model, config, calib, device, **kw)


__all__ = ["ALLOCATORS", "Allocator", "allocator", "make_plan", "plan_fraction"]
