"""Typed configuration: per-matrix layer specs and the run config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import SLRError


@dataclass(frozen=True)
class LayerSpec:
    """What one matrix may keep.

    sparsity: fraction of entries of S that are zero (unstructured). Ignored when ``nm`` is set.
    nm:       (N, M) -- keep N of every M consecutive weights along the input dimension.
    rank:     rank of the low-rank part L = U @ V (0 = pure pruning).
    dense_sparse: if True the sparse part is kept dense (sparsity 0) -- used by rank-only methods
              that set ``sparsity=1`` instead; see ``keeps_sparse``.
    """

    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    rank: int = 0

    def validate(self, d_out: int | None = None, d_in: int | None = None) -> None:
        if self.nm is not None:
            n, m = self.nm
            if not (0 <= n < m):
                raise SLRError(f"N:M pattern {n}:{m} is invalid (need 0 <= N < M)", "use e.g. --pattern 2:4")
            if d_in is not None and d_in % m != 0:
                raise SLRError(
                    f"N:M pattern {n}:{m} does not divide the input width {d_in}",
                    f"choose M that divides {d_in}",
                )
        elif not (0.0 <= self.sparsity <= 1.0):
            raise SLRError(f"sparsity {self.sparsity} is outside [0, 1]", "pass a fraction such as --sparsity 0.5")
        if self.rank < 0:
            raise SLRError(f"rank {self.rank} is negative", "pass --rank 0 or a positive integer")
        if d_out is not None and d_in is not None and self.rank > min(d_out, d_in):
            raise SLRError(
                f"rank {self.rank} exceeds min(d_out, d_in) = {min(d_out, d_in)}",
                f"pass --rank <= {min(d_out, d_in)}",
            )

    def kept(self, d_out: int, d_in: int) -> int:
        """Number of sparse values kept for a [d_out, d_in] matrix (row-wise rounding)."""
        if self.nm is not None:
            n, m = self.nm
            return d_out * (d_in // m) * n
        return d_out * keep_per_row(d_in, self.sparsity)

    @property
    def label(self) -> str:
        s = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"u{round(self.sparsity * 100)}"
        return s + (f"+r{self.rank}" if self.rank else "")


def keep_per_row(d_in: int, sparsity: float) -> int:
    """Entries kept per row for unstructured sparsity (the single rounding rule used everywhere)."""
    return int(round(d_in * (1.0 - sparsity)))


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """Parse '2:4' into (2, 4)."""
    if text is None:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise SLRError(f"cannot parse N:M pattern {text!r}", "write it as N:M, e.g. --pattern 2:4") from None
    LayerSpec(nm=(n, m)).validate()
    return n, m


@dataclass
class CompressConfig:
    """Everything that defines one compression run (recorded in results.json)."""

    method: str = "sparsegpt"
    sparsity: float | None = 0.5
    pattern: str | None = None  # "N:M"
    rank: int = 0
    calib_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    allocate: str = "uniform"
    budget: float | None = None
    refine: str | None = None
    tm_epochs: int = 20
    tm_samples: int | None = None  # calibration windows TM trains on (None = all)
    solver_opts: dict = field(default_factory=dict)
    alloc_opts: dict = field(default_factory=dict)

    def layer_spec(self) -> LayerSpec:
        # the budget is checked here too, so that run_compress rejects it before loading the model
        if self.budget is not None and not (0.0 < float(self.budget) < 1.0):  # NaN fails the comparison as well
            raise SLRError(f"budget {self.budget} is outside (0, 1)", "pass a retained fraction such as --budget 0.5")
        nm = parse_nm(self.pattern)
        sp = 0.0 if self.sparsity is None else self.sparsity
        if nm is None and self.sparsity is not None and not (0.0 < self.sparsity < 1.0) and self.rank == 0:
            raise SLRError(f"sparsity {self.sparsity} is outside (0, 1)", "pass e.g. --sparsity 0.5")
        spec = LayerSpec(sparsity=sp, nm=nm, rank=self.rank)
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(fn, opts: dict, *, flag: str, what: str, skip: tuple[str, ...] = (),
                  extra: tuple[str, ...] = ()) -> None:
    """Reject KEY=VALUE options that ``fn`` does not take, or whose value does not fit the default's type.

    Solvers and allocators swallow unknown keywords (``**_``), so a typo would otherwise be ignored silently, and a
    wrong type would surface as a traceback deep inside the solver. Options are the parameters with defaults.
    """
    import inspect
    import json

    params = {n: p.default for n, p in inspect.signature(fn).parameters.items()
              if p.default is not inspect.Parameter.empty and n not in skip}
    for k, v in opts.items():
        if k not in params and k not in extra:
            known = ", ".join(sorted(set(params) | set(extra))) or "none"
            raise SLRError(f"{flag} {k}={v} is not an option of {what}", f"use one of: {known}")
        if k not in params:
            continue
        d = params[k]
        if d is None:  # optional value: its type is not known from the default
            continue
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        elif isinstance(d, str):
            ok = isinstance(v, str)
        elif isinstance(d, tuple):
            ok = isinstance(v, list | tuple)
        else:  # e.g. a torch.dtype: not expressible as KEY=VALUE
            ok = False
        if not ok:
            example = d if isinstance(d, str) else json.dumps(d, separators=(",", ":")) \
                if isinstance(d, int | float | tuple) else None
            raise SLRError(f"{flag} {k}={v} does not fit {what}'s option {k} (type {type(d).__name__}, default {d})",
                           f"write e.g. {flag} {k}={example}" if example is not None else "leave it at its default")
