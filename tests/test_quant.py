"""Group-wise quantization (slr.quant): the grid, its error bound, masks, and the checks of a QuantSpec."""

from __future__ import annotations

import pytest
import torch

from slr.errors import SLRError
from slr.quant import QuantSpec, dequantize, fit_params, quantize, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_is_on_grid_and_within_half_a_step(bits, sym):
    q = QuantSpec(bits, group_size=16, sym=sym)
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits))
    What, scale, zero = rtn(W, q)
    assert scale.shape == zero.shape == (8, 4)
    assert torch.equal(scale, scale.half().float())  # fp16-exact scales
    codes = quantize(What, scale, zero, q)
    assert int(codes.max()) <= 2**bits - 1
    assert torch.equal(dequantize(codes, scale, zero, q), What)  # a grid point maps back to itself
    err = (W - What).abs().reshape(8, 4, 16)
    # half a step, plus the clamp of the top code and the fp16 rounding of the scale
    assert bool((err <= scale[..., None] * (0.5 + q.maxq * 2**-11)).all())
    assert len(torch.unique(codes[0, :16])) <= 2**bits


def test_mask_sets_the_range_and_zero_is_exact():
    q = QuantSpec(4, group_size=8, sym=False)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    W[0, 0] = 100.0  # an outlier outside the mask must not widen the grid
    mask = torch.ones_like(W, dtype=torch.bool)
    mask[0, 0] = False
    What, scale, zero = rtn(W, q, mask)
    assert What[0, 0] == 0 and float(scale[0, 0]) < 1.0
    assert torch.equal(dequantize(torch.zeros(1, 8, dtype=torch.uint8) + zero[:1, :1].to(torch.uint8),
                                  scale[:1, :1], zero[:1, :1], q), torch.zeros(1, 8))
    scale2, _ = fit_params(torch.zeros(2, 8), q)  # an all-zero group still has a usable scale
    assert bool((scale2 > 0).all())


def test_more_bits_less_error():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    errs = [float((W - rtn(W, QuantSpec(b, 32))[0]).pow(2).sum()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("spec,msg", [(QuantSpec(5), "bit width 5"), (QuantSpec(4, 0), "not positive"),
                                      (QuantSpec(4, 48), "does not divide the input width 64")])
def test_bad_spec(spec, msg):
    with pytest.raises(SLRError, match=msg):
        spec.validate(64)


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_rounds_worse(sym):
    """fit_params(clip=True) keeps each group's |w - ŵ|^2.4 at or below the full-range grid's, and lowers it on
    heavy-tailed weights (an outlier per group makes the full range too coarse for the rest)."""
    torch.manual_seed(0)
    q = QuantSpec(3, 32, sym)
    W = torch.randn(16, 128)
    W[:, ::32] *= 8  # one outlier per group
    def err(s, z):
        return (dequantize(quantize(W, s, z, q), s, z, q) - W).abs().pow(2.4).reshape(16, 4, 32).sum(-1)
    full, clipped = err(*fit_params(W, q)), err(*fit_params(W, q, clip=True))
    assert bool((clipped <= full * (1 + 1e-5)).all())
    assert float(clipped.sum()) < 0.9 * float(full.sum())
    mask = torch.rand(16, 128) < 0.5
    s, z = fit_params(W, q, mask, clip=True)
    assert s.shape == z.shape == (16, 4)
