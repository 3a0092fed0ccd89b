"""Layer solvers. Each module registers itself in ``METHODS``; ``method(name)`` says what one can do."""

from . import (  # noqa: F401  (registration side effects)
    admm,
    gptq,
    hassle,
    joint,
    lowrank,
    magnitude,
    oats,
    prune_lr,
    rpca,
    sparsegpt,
    wanda,
)
from .base import METHODS, Method, SolveResult, get_solver, layer_objective, method, register, relative_error

__all__ = ["METHODS", "Method", "SolveResult", "get_solver", "layer_objective", "method", "register",
           "relative_error"]
