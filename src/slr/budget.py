"""Budget accounting (PROTOCOL section 5), from what is actually kept."""

from __future__ import annotations

from .solvers.base import SolveResult


def matrix_params(res: SolveResult, count_v: bool = True) -> int:
    """Kept sparse values + r*d_out (+ r*d_in unless V is shared and counted elsewhere)."""
    n = int(res.mask.sum()) if res.mask is not None else 0
    if res.U is not None:
        n += res.U.numel() + (res.V.numel() if count_v else 0)
    return n


def retained_params(results: dict[str, SolveResult]) -> int:
    """Sum over matrices; a V tensor shared by several matrices is counted once."""
    seen: set[int] = set()
    total = 0
    for res in results.values():
        shared_seen = res.V is not None and id(res.V) in seen
        total += matrix_params(res, count_v=not shared_seen)
        if res.V is not None:
            seen.add(id(res.V))
    return total
