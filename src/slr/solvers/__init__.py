"""Layer solvers. Each module registers itself; ``get_solver(name)`` looks one up."""

from . import admm, hassle, joint, lowrank, magnitude, oats, prune_lr, rpca, sparsegpt, wanda  # noqa: F401  (registration side effects)
from .base import DATA_FREE, SOLVERS, SolveResult, get_solver, layer_objective, register, relative_error

__all__ = ["DATA_FREE", "SOLVERS", "SolveResult", "get_solver", "layer_objective", "register", "relative_error"]
