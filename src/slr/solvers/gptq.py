"""GPTQ (Frantar et al. 2023) and round-to-nearest: the quantization baselines, on S's group-wise grid.

``gptq`` is the OBS sweep of ``obs`` with the grid projection (as production GPTQ runs it, e.g. llm-compressor's
GPTQModifier: lazy blocks of 128, dampening 1% of the mean diagonal, dead inputs zeroed, symmetric by default). Each
group's scale is fitted on the current, error-updated weights when the sweep enters it (original GPTQ / AutoGPTQ);
``static_groups=True`` fits every group on the original W up front, as llm-compressor does (its sweep runs in float32,
this one in float64). A sparse spec prunes in the same sweep (SparseGPT's joint mode); ``sparsity 0`` is plain GPTQ.
``rtn`` rounds W (or its largest-|W| support) to the grid with no compensation (data-free).
"""

from __future__ import annotations

import time

import torch

from ..errors import SLRError
from ..quant import QuantSpec
from ..spec import LayerSpec
from .base import SolveResult, register, validate_inputs
from .magnitude import magnitude
from .obs import prune_quantize


def needs_grid(spec: LayerSpec, name: str) -> QuantSpec:
    """spec.quant, or a one-line error: a pure quantizer without a bit width."""
    if spec.quant is None:
        raise SLRError(f"{name} quantizes and needs a bit width", "pass --bits 4 (or 8, 3, 2)")
    return spec.quant


@register("gptq", kind="sparse", bits=True, needs_bits=True)
def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    clip: bool = False,
) -> SolveResult:
    """GPTQ of W [d_out, d_in] on spec's grid (pruned in the same sweep when spec is sparse).

    static_groups: fit every group's grid on W before the sweep (llm-compressor) rather than on entry.
    actorder: sweep the inputs by decreasing H_jj, with static groups; dense S only.
    clip: each group's grid range shrunk to minimise its rounding error (``quant.fit_params``, GPTQ's "mse" grid).
    """
    validate_inputs(W, H, spec)
    q = needs_grid(spec, "gptq")
    t = time.perf_counter()
    S, mask, qp = prune_quantize(W, H, spec, q, blocksize, percdamp, actorder=actorder,
                                 static_groups=static_groups, clip=clip)
    return SolveResult(S=S, mask=mask, info={"seconds": time.perf_counter() - t}, qparams={"S": qp})


@register("rtn", kind="sparse", data_free=True, bits=True, needs_bits=True)
def rtn(W: torch.Tensor, H: torch.Tensor | None, spec: LayerSpec) -> SolveResult:
    """Round to nearest: W's largest-|W| support (all of W when dense) rounded to spec's grid, fitted on it."""
    validate_inputs(W, H, spec)
    needs_grid(spec, "rtn")
    return magnitude(W, H, spec)
