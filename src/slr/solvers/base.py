"""Solver interface shared by every layer solver.

A solver is a pure tensor function ``solve(W, H, spec, **opts) -> SolveResult``.
W is [d_out, d_in], H = X^T X is [d_in, d_in] (or None for data-free solvers).
It never sees a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import SLRError
from ..options import options_type
from ..quant import QuantSpec
from ..spec import LayerSpec


@dataclass
class SolveResult:
    """Output of a layer solver: W ~= S + U @ V.

    S:    [d_out, d_in] float32, zero outside ``mask`` (None when there is no sparse part).
    mask: [d_out, d_in] bool support of S (exact; kept values may themselves be 0.0).
    U:    [d_out, r] float32 or None.   V: [r, d_in] float32 or None.
    info: objective trace, iterations, seconds, ...
    qparams: for each of "S", "U", "V" that is quantized (the spec's ``quant`` / ``factor_quant``), its grid's
          (scale, zero) [rows, groups] float32; its values are exactly on that grid (``quant.quantize`` gives the
          codes back).
    qspec: the ``quant.QuantSpec`` of each part in ``qparams`` (the grid that storage packs the codes on); the
          pipeline fills it from the matrix's LayerSpec (``qlinear.grids``) when the solver leaves it empty.
    """

    S: torch.Tensor | None
    mask: torch.Tensor | None
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    qspec: dict[str, QuantSpec] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.U is None else int(self.U.shape[1])

    def dense(self) -> torch.Tensor:
        """The reconstructed weight S + U V (float32)."""
        out = None
        if self.S is not None:
            out = self.S.float().clone()
        if self.U is not None:
            lr = self.U.float() @ self.V.float()
            out = lr if out is None else out + lr
        if out is None:
            raise ValueError("empty SolveResult")
        return out


Solver = Callable[..., SolveResult]
KINDS = ("sparse", "slr", "rank")


@dataclass(frozen=True)
class Method:
    """A registered layer solver and what it can do; the pipeline, allocators, config and CLI all ask this record.

    kind:      "sparse" (S only: takes a sparsity or N:M pattern), "slr" (S + U V: both and a rank), "rank" (U V only).
    data_free: solves without calibration data (H may be None).
    group:     called once per input group with every matrix that reads it (``fn(Ws, H, specs, **opts) ->
               list[SolveResult]``; the results may share one V), instead of once per matrix (``fn(W, H, spec)``).
    bits:      quantizes the values of S (and the factors) inside the solve, on the spec's grids.
    needs_bits: a pure quantizer (gptq, rtn): a bit width is required.
    options:   the dataclass of its keyword options (``slr.options.options_type``).
    """

    name: str
    fn: Callable
    kind: str
    data_free: bool = False
    group: bool = False
    bits: bool = False
    needs_bits: bool = False
    options: type | None = None

    @property
    def takes_sparsity(self) -> bool:
        return self.kind != "rank"

    @property
    def takes_rank(self) -> bool:
        return self.kind != "sparse"


METHODS: dict[str, Method] = {}


def register(name: str, *, kind: str, data_free: bool = False, group: bool = False, bits: bool = False,
             needs_bits: bool = False):
    """Decorator: register a layer solver under its CLI name (see ``Method`` for the flags)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")

    def deco(fn: Callable) -> Callable:
        METHODS[name] = Method(name, fn, kind, data_free, group, bits, needs_bits, options=options_type(name, fn))
        return fn

    return deco


def method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a one-line error listing the valid ones."""
    if name not in METHODS:
        raise SLRError(f"unknown method {name!r}", f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_solver(name: str) -> Callable:
    return method(name).fn


def check_finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and not torch.isfinite(t).all():
        raise SLRError(f"{name} contains NaN or Inf values", "check the model weights / calibration data")


def layer_objective(W: torch.Tensor, H: torch.Tensor | None, What: torch.Tensor) -> float:
    """tr((W - What) H (W - What)^T) = ||X (W - What)^T||_F^2 (Frobenius when H is None)."""
    E = (W.double() - What.double())
    if H is None:
        return float((E * E).sum())
    return float(((E @ H.double()) * E).sum())


def relative_error(W: torch.Tensor, H: torch.Tensor | None, What: torch.Tensor) -> float:
    """||X (W - What)^T||^2 / ||X W^T||^2."""
    den = layer_objective(W, H, torch.zeros_like(W))
    return layer_objective(W, H, What) / max(den, 1e-30)


def damp_hessian(H: torch.Tensor, percdamp: float = 0.01, diag_frac: float = 0.0) -> torch.Tensor:
    """H + (percdamp * mean diag + diag_frac * diag) I, dead inputs get H_jj = 1. float64."""
    H = H.double().clone()
    d = torch.diagonal(H)
    dead = d == 0
    d[dead] = 1.0
    mean = d.mean()
    H.diagonal().add_(percdamp * mean + diag_frac * d)
    return H


class Timer:
    """Accumulates seconds per named step into a dict (for 'where the time goes')."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def __call__(self, key: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *a):
                timer.s[key] = timer.s.get(key, 0.0) + time.perf_counter() - self.t

        return _T()


def validate_inputs(W: torch.Tensor, H: torch.Tensor | None, spec: LayerSpec) -> None:
    check_finite("weight", W)
    check_finite("Hessian (X^T X)", H)
    spec.validate(*W.shape)
