"""Pure pruning solvers (magnitude, Wanda, SparseGPT) on small random problems: exact budgets, exact N:M,
objective ordering, Wanda's group boundaries and scoring, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from slr.config import LayerSpec, keep_per_row
from slr.errors import SLRError
from slr.solvers.base import layer_objective
from slr.solvers.magnitude import magnitude
from slr.solvers.sparsegpt import sparsegpt
from slr.solvers.wanda import wanda, wanda_score

SOLVERS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
SHAPES = [(32, 64), (48, 128)]
UNSTRUCTURED = [0.3, 0.5, 0.7, 0.9]  # 0.3 / 0.7 / 0.9 of 64 are not integers: exercises the rounding rule
PATTERNS = [(2, 4), (1, 4), (4, 8)]


def make_problem(d_out: int, d_in: int, seed: int = 0, scale: float = 0.8):
    """W ~ N(0, 1); H = X^T X with blocks of 8 strongly correlated columns and log-normal column scales.

    ``scale`` = 0.8 spreads the column norms over ~1.5 decades: large enough that activation-aware scores (Wanda)
    beat |W|, small enough that SparseGPT's 1% damping does not swamp the weak columns (at scale >= 1.5 it does, and
    Wanda can then beat SparseGPT on unstructured masks).
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    n = 4 * d_in
    base = torch.randn(n, d_in // 8, generator=g)
    X = 0.8 * base.repeat_interleave(8, 1) + 0.6 * torch.randn(n, d_in, generator=g)  # correlated column blocks
    X = X * torch.exp(scale * torch.randn(d_in, generator=g))  # per-column scales
    H = X.T.double() @ X.double()
    return W, H


def solve(name: str, W, H, spec, **opts):
    return SOLVERS[name](W, None if name == "magnitude" else H, spec, **opts)


def check_support(res, W, spec: LayerSpec):
    d_out, d_in = W.shape
    assert res.S.shape == W.shape and res.mask.shape == W.shape and res.mask.dtype == torch.bool
    assert torch.isfinite(res.S).all()
    assert int(res.mask.sum()) == spec.kept(d_out, d_in)
    assert (res.S[~res.mask] == 0).all(), "S must be exactly zero off its mask"
    if spec.nm is not None:
        n, m = spec.nm
        counts = res.mask.reshape(d_out, d_in // m, m).sum(-1)
        assert (counts == n).all(), f"every group of {m} inputs must keep exactly {n}"


# ---- budgets and patterns -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", UNSTRUCTURED)
@pytest.mark.parametrize("name", list(SOLVERS))
def test_unstructured_exact_count(name, sparsity, shape):
    W, H = make_problem(*shape, seed=1)
    spec = LayerSpec(sparsity=sparsity)
    res = solve(name, W, H, spec)
    check_support(res, W, spec)
    assert int(res.mask.sum()) == shape[0] * keep_per_row(shape[1], sparsity)
    if name != "sparsegpt":  # magnitude and Wanda prune row-wise: every row keeps the same number
        assert (res.mask.sum(1) == keep_per_row(shape[1], sparsity)).all()
    if name != "sparsegpt":  # no weight update: kept entries are the original weights
        assert torch.equal(res.S[res.mask], W[res.mask])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nm", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("name", list(SOLVERS))
def test_nm_exact_per_group(name, nm, shape):
    W, H = make_problem(*shape, seed=2)
    spec = LayerSpec(nm=nm)
    res = solve(name, W, H, spec)
    check_support(res, W, spec)


@pytest.mark.parametrize("blocksize", [3, 6, 10, 32])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_sparsegpt_nm_any_blocksize(nm, blocksize):
    # N:M groups must not be cut by the lazy-update blocks, whatever --opt blocksize=... the user passes
    W, H = make_problem(32, 64, seed=3)
    spec = LayerSpec(nm=nm)
    check_support(sparsegpt(W, H, spec, blocksize=blocksize), W, spec)


@pytest.mark.parametrize("blocksize", [7, 16, 128])
def test_sparsegpt_unstructured_any_blocksize(blocksize):
    W, H = make_problem(48, 128, seed=4)
    spec = LayerSpec(sparsity=0.7)
    check_support(sparsegpt(W, H, spec, blocksize=blocksize), W, spec)


def test_sparsegpt_dead_inputs():
    # a column that never sees input (H_jj = 0) must not break the Cholesky or the budget
    W, H = make_problem(32, 64, seed=5)
    H[:, 3] = 0
    H[3, :] = 0
    spec = LayerSpec(nm=(2, 4))
    res = sparsegpt(W, H, spec)
    check_support(res, W, spec)
    assert (res.S[:, 3] == 0).all()


# ---- objective ordering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", [LayerSpec(sparsity=0.5), LayerSpec(sparsity=0.7), LayerSpec(nm=(2, 4)),
                                  LayerSpec(nm=(1, 4)), LayerSpec(nm=(4, 8))], ids=lambda s: s.label)
def test_objective_order(spec, shape, seed):
    """sparsegpt < wanda < magnitude on tr(E H E^T); on this family the margins are >= 1.3x and >= 1.5x over
    15 seeds, so a 10% margin is asserted."""
    W, H = make_problem(*shape, seed=seed)
    obj = {n: layer_objective(W, H, solve(n, W, H, spec).S) for n in SOLVERS}
    assert obj["sparsegpt"] * 1.1 < obj["wanda"] < obj["magnitude"] / 1.1, obj


def test_wanda_equals_magnitude_for_isotropic_inputs():
    W, _ = make_problem(32, 64, seed=6)
    H = 3.0 * torch.eye(64, dtype=torch.float64)
    for spec in (LayerSpec(sparsity=0.5), LayerSpec(nm=(2, 4))):
        assert torch.equal(wanda(W, H, spec).mask, magnitude(W, None, spec).mask)


# ---- Wanda scoring and group boundaries -----------------------------------------------------------------------


def reference_nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Independent loop implementation: keep the n best of columns [g*m, (g+1)*m) in every row."""
    d_out, d_in = score.shape
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    for r in range(d_out):
        for g0 in range(0, d_in, m):
            best = sorted(range(g0, g0 + m), key=lambda j: float(score[r, j]), reverse=True)[:n]
            mask[r, best] = True
    return mask


def test_wanda_nm_known_answer():
    """Row [8, 7, ..., 1] with sqrt(H_jj) chosen so the Wanda scores are exactly 1, 2, ..., 8.

    Groups {0..3} and {4..7} keep columns {2, 3} and {6, 7}. Magnitude would keep {0, 1} and {4, 5}; groups shifted
    by one column ({1..4}, {5..8}) would keep column 4 or 8; so this fails for a wrong score or a wrong boundary.
    """
    W = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1], [-1.0, -2, -3, -4, -5, -6, -7, -8]])
    target = torch.arange(1.0, 9.0)
    s = target / W[0]  # sqrt(H_jj)
    H = torch.diag(s.double() ** 2)
    assert torch.allclose(wanda_score(W, H)[0], target)
    res = wanda(W, H, LayerSpec(nm=(2, 4)))
    assert res.mask[0].nonzero().flatten().tolist() == [2, 3, 6, 7]
    # row 1: scores |W| * s = [1/8, 4/7, 1.5, 3.2, 6.25, 12, 24.5, 64] -> the same columns
    assert res.mask[1].nonzero().flatten().tolist() == [2, 3, 6, 7]
    assert magnitude(W, None, LayerSpec(nm=(2, 4))).mask[0].nonzero().flatten().tolist() == [0, 1, 4, 5]


def test_wanda_nm_boundaries_with_decoys():
    """Every group is [0.5, 0.1, 2, 3] except that groups 1.. start with a decoy 10. Right groups keep {2, 3} of
    group 0 and {first, last} of the others; a window shifted by one column ({1..4}) would take 3 and the decoy 4."""
    d_in, m = 16, 4
    W = torch.tensor([0.5, 0.1, 2.0, 3.0]).repeat(3, d_in // m)
    W[:, 4::4] = 10.0  # first column of groups 1.. is large: it must win inside its *own* group only
    H = torch.eye(d_in, dtype=torch.float64)
    res = wanda(W, H, LayerSpec(nm=(2, m)))
    expected = reference_nm_mask(wanda_score(W, H), 2, m)
    assert torch.equal(res.mask, expected)
    assert res.mask[0].nonzero().flatten().tolist() == [2, 3, 4, 7, 8, 11, 12, 15]


@pytest.mark.parametrize("nm", PATTERNS + [(3, 8), (1, 2)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_wanda_nm_matches_reference(nm):
    W, H = make_problem(8, 64, seed=7)
    res = wanda(W, H, LayerSpec(nm=nm))
    assert torch.equal(res.mask, reference_nm_mask(wanda_score(W, H), *nm))


def test_nm_ties_go_to_the_lower_index():
    """Tied scores (small integer weights) keep the lower column of a group, as the stable reference does."""
    W = torch.randint(-2, 3, (16, 64), generator=torch.Generator().manual_seed(9)).float()
    for nm in ((2, 4), (1, 4), (3, 8), (4, 16)):
        assert torch.equal(magnitude(W, None, LayerSpec(nm=nm)).mask, reference_nm_mask(W.abs(), *nm))


def test_wanda_uses_sqrt_of_diag():
    # 1:2 on [3, 1] with H = diag(1, 4): sqrt -> scores [3, 2] keep column 0; without sqrt [3, 4] would keep 1
    W = torch.tensor([[3.0, 1.0]])
    H = torch.tensor([[1.0, 0.9], [0.9, 4.0]], dtype=torch.float64)  # off-diagonals are ignored by Wanda
    assert wanda(W, H, LayerSpec(nm=(1, 2))).mask.tolist() == [[True, False]]
    assert wanda(W, H, LayerSpec(sparsity=0.5)).mask.tolist() == [[True, False]]


def test_wanda_unstructured_rowwise():
    W, H = make_problem(16, 64, seed=8)
    res = wanda(W, H, LayerSpec(sparsity=0.75))
    score = wanda_score(W, H)
    for r in range(16):
        top = set(torch.topk(score[r], 16).indices.tolist())
        assert set(res.mask[r].nonzero().flatten().tolist()) == top


# ---- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nm_must_divide_input_width(name):
    W, H = make_problem(32, 64, seed=0)
    with pytest.raises(SLRError, match="does not divide"):
        solve(name, W[:, :62], H[:62, :62], LayerSpec(nm=(2, 4)))
    with pytest.raises(SLRError, match="does not divide"):
        solve(name, W, H, LayerSpec(nm=(2, 5)))


@pytest.mark.parametrize("nm", [(4, 4), (5, 4), (-1, 4)])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_nm_invalid(name, nm):
    W, H = make_problem(32, 64, seed=0)
    with pytest.raises(SLRError, match="invalid"):
        solve(name, W, H, LayerSpec(nm=nm))


@pytest.mark.parametrize("sparsity", [1.5, -0.1, math.nan])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_sparsity_out_of_range(name, sparsity):
    W, H = make_problem(32, 64, seed=0)
    with pytest.raises(SLRError, match="outside"):
        solve(name, W, H, LayerSpec(sparsity=sparsity))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_non_finite_weight(name, bad):
    W, H = make_problem(32, 64, seed=0)
    W[3, 5] = bad
    with pytest.raises(SLRError, match="NaN or Inf"):
        solve(name, W, H, LayerSpec(sparsity=0.5))


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_non_finite_hessian(name):
    W, H = make_problem(32, 64, seed=0)
    H[7, 7] = math.nan
    with pytest.raises(SLRError, match="NaN or Inf"):
        solve(name, W, H, LayerSpec(nm=(2, 4)))
