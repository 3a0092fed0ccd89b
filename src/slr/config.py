"""Typed configuration of a run: what to compress (``CompressConfig`` with its ``AllocConfig`` and ``RefineConfig``)
and how the run goes (``RunOptions``). A TOML file maps 1:1 onto them (``load_toml``), as does results.json's
``config`` (``CompressConfig.from_dict``).

A TOML run file::

    model = "smollm2-135m"
    method = "admm"
    pattern = "2:4"
    rank = 32
    [solver]            # the method's options (slr.solvers.method(name).options)
    max_iters = 130
    [alloc]
    method = "knapsack"
    budget = 0.5
    [alloc.options]     # the allocator's options
    span = 0.1
    [refine]            # transformer matching
    epochs = 3
    max_samples = 16
    heldout = 2         # windows TM only judges on (preset = "paper": 3BASiL-TM's schedule)
    [distill]           # logit distillation of the whole model after compression
    epochs = 2
    [run]               # RunOptions
    out = "runs/smollm2-admm"
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .allocate import allocator
from .allocate.bits import BITS_ALLOCATORS
from .embeddings import check_embed_bits
from .errors import SLRError
from .options import fits, jsonable, make_options
from .solvers import METHODS
from .solvers import method as solver_method
from .spec import LayerSpec, keep_per_row, parse_nm

DTYPES = ("float32", "float16", "bfloat16")
NESTED = ("solver", "alloc", "refine", "distill", "options")  # tables that build (and check) themselves


@dataclass
class AllocConfig:
    """How one global budget is split over the matrices.

    method:  uniform | owl | knapsack | cap (``slr.allocate.ALLOCATORS``).
    budget:  global retained fraction in (0, 1) (PROTOCOL §5); None = that of the uniform layer spec.
    options: the allocator's typed options (a dict is converted; unknown keys are an error naming the valid ones).
    budget_bits: instead of ``budget``, an average of bits per weight over the compressed linears (their bytes as
             ``slr.formats.theoretical_bytes`` counts them x 8 / their weights); the allocator then picks each
             matrix's bit width of S (and rank). Not owl; needs a run with --bits (``slr.allocate.bits``;
             ``slr.allocate.bitlevels`` for cap and search).
    """

    method: str = "uniform"
    budget: float | None = None
    options: Any = None
    budget_bits: float | None = None

    def __post_init__(self):
        a = allocator(self.method)
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, int | float) or math.isnan(b) or not 0.0 < b < 1.0:
                raise SLRError(f"budget {b} is outside (0, 1)", "pass a retained fraction such as --budget 0.5")
            self.budget = float(b)
        if self.budget_bits is not None:
            b = self.budget_bits
            if self.budget is not None:
                raise SLRError("--budget and --budget-bits are two budgets for one run",
                               "pass one of them: a retained fraction (--budget) or bits per weight (--budget-bits)")
            if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b <= 0:
                raise SLRError(f"--budget-bits {b} is not a positive number of bits per weight",
                               "pass e.g. --budget-bits 3.25")
            if self.method not in BITS_ALLOCATORS:
                raise SLRError(f"{self.method} does not take --budget-bits yet",
                               f"use --allocate {', '.join(BITS_ALLOCATORS)}")
            self.budget_bits = float(b)
        self.options = make_options(a.options, self.options, flag="--alloc-opt", what=f"the {self.method} allocator")
        if a.check is not None:
            a.check(self.options)

    @property
    def is_uniform(self) -> bool:
        """The uniform spec everywhere, with no budget to fit: no allocation runs."""
        return self.method == "uniform" and self.budget is None and self.budget_bits is None


# 3BASiL-TM's schedule (Adam is TM's only optimizer): 20 epochs on 128 windows, lr 2e-5 cosine to lr / 5, 8 a step
TM_PRESETS = {"paper": {"lr": 2e-5, "final_lr_frac": 0.2, "epochs": 20, "batch_size": 8, "max_samples": 128}}


@dataclass
class RefineConfig:
    """Transformer matching (3BASiL-TM) of each compressed block to the dense block's outputs.

    Adam at ``lr``, cosine to ``lr * final_lr_frac`` over ``epochs`` (epoch 0 measures only), ``batch_size`` windows
    a step, on the first ``max_samples`` calibration windows (None = all but the held-out ones). The defaults (8
    epochs, 32 windows, lr 3e-4) are a CPU budget; the paper's schedule is the preset "paper".
    heldout: windows TM never trains on, used only to judge it (keep the best parameters or restore the original);
             the last ``heldout`` windows of the block's calibration windows (of each process under torchrun). None =
             max(1, n // 8) of n windows when n >= 2, else 0; 0 = judge on the training windows. When max_samples
             plus heldout exceed n, TM trains on the n - heldout windows before the held-out ones.
    dense_targets: the weight a of the dense model's own block outputs (on dense-path inputs) in the targets:
             target = (1 - a) * dense_block(compressed-path inputs) + a * dense-path output. 0 is 3BASiL's
             memory-efficient target (each block matches only its own error); with a > 0 TM also corrects part of
             the error the earlier compressed blocks pass on, for a second copy of the calibration activations.
    ``RefineConfig.preset("paper", **overrides)`` (``[refine] preset = "paper"``, ``--tm-preset paper``) starts
    from ``TM_PRESETS["paper"]``; keys given explicitly win.
    """

    method: str = "tm"
    lr: float = 3e-4
    final_lr_frac: float = 0.2
    epochs: int = 8
    batch_size: int = 8
    train_norms: bool = True
    train_biases: bool = True
    max_samples: int | None = 32
    heldout: int | None = None
    dense_targets: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.dense_targets <= 1.0:
            raise SLRError(f"--tm-dense-targets {self.dense_targets} is outside [0, 1]",
                           "pass a weight between 0 (the dense block on the compressed inputs) and 1 (the dense "
                           "model's own outputs)")
        if self.method != "tm":
            raise SLRError(f"unknown refinement {self.method!r}", "use tm (transformer matching)")
        if self.epochs < 0 or self.batch_size < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise SLRError("transformer matching needs epochs >= 0, batch_size >= 1 and max_samples >= 1",
                           "fix --tm-epochs / --tm-samples")
        if self.heldout is not None and self.heldout < 0:
            raise SLRError(f"--tm-heldout {self.heldout} is negative",
                           "pass --tm-heldout N with N >= 0 (0 = judge on the training windows)")

    @classmethod
    def preset(cls, name: str, **overrides) -> RefineConfig:
        """The preset ``name`` of ``TM_PRESETS`` with ``overrides`` on top."""
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def paper(cls, **overrides) -> RefineConfig:
        """3BASiL-TM's settings (``TM_PRESETS["paper"]``) with ``overrides`` on top."""
        return cls.preset("paper", **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> RefineConfig:
        """A [refine] table; ``preset = NAME`` supplies the values of the keys the table does not set."""
        if isinstance(d, dict) and "preset" in d:
            d = dict(d)
            name = d.pop("preset")
            if not isinstance(name, str) or name not in TM_PRESETS:
                raise SLRError(f"unknown transformer-matching preset {name!r}",
                               f"use one of: {', '.join(TM_PRESETS)}")
            d = TM_PRESETS[name] | d
        return _build(cls, d, "refine")


@dataclass
class DistillConfig:
    """Logit distillation (``slr.distill``) of the compressed model to the dense one, after every block is compressed.

    KL(dense || compressed) of the next-token distributions on the first ``max_samples`` calibration windows (None =
    all but the held-out ones); Adam at ``lr``, cosine to ``lr * final_lr_frac``, ``batch_size`` windows a step,
    ``epochs`` passes; the last ``heldout`` windows (None = max(1, n // 8)) only judge: the epoch with the lowest
    held-out KL is kept, the original parameters restored if none beats them.
    """

    lr: float = 1e-4
    final_lr_frac: float = 0.2
    epochs: int = 2
    batch_size: int = 4
    train_scales: bool = True  # the fp16 group scales of quantized parts (their codes stay fixed)
    train_norms: bool = True
    train_biases: bool = True
    max_samples: int | None = None
    heldout: int | None = None

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise SLRError("distillation needs epochs >= 0, batch_size >= 1 and max_samples >= 1",
                           "fix --kd-epochs / --kd-samples")
        if not self.lr > 0:
            raise SLRError(f"--kd-lr {self.lr} is not positive", "pass e.g. --kd-lr 1e-4")
        if self.heldout is not None and self.heldout < 0:
            raise SLRError(f"--kd-heldout {self.heldout} is negative", "pass --kd-heldout N with N >= 0")


@dataclass
class CompressConfig:
    """What one compression run does (recorded in results.json as ``config``).

    method:   layer solver (``slr.solvers.METHODS``); its kind decides which of sparsity / pattern / rank apply.
    sparsity: unstructured sparsity of S (None = 0.5 for methods with a sparse part); ``pattern`` "N:M" instead.
    rank:     rank of U V (rank-only methods need one, or a budget that sets them).
    bits, group_size, sym: S's values on a b-bit grid in groups of group_size inputs (methods that quantize
              inside the solve: ``Method.bits``); with bits and no sparsity or pattern, S is dense (sparsity 0).
    factor_bits: U and V at 16 (fp16), 8 or 4 bits.
    solver:   the method's typed options (a dict is converted).
    alloc:    ``AllocConfig``; refine: ``RefineConfig`` or None (per block); distill: ``DistillConfig`` or None
              (the whole model, after the blocks).
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    rank: int = 0
    bits: int | None = None
    group_size: int = 64
    sym: bool = True
    factor_bits: int = 16
    calib_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    solver: Any = None
    alloc: AllocConfig = field(default_factory=AllocConfig)
    refine: RefineConfig | None = None
    distill: DistillConfig | None = None

    def __post_init__(self):
        m = solver_method(self.method)
        self.solver = make_options(m.options, self.solver, flag="--opt", what=f"the {self.method} solver")
        if isinstance(self.alloc, dict):
            self.alloc = _build(AllocConfig, self.alloc, "alloc")
        if isinstance(self.refine, dict):
            self.refine = RefineConfig.from_dict(self.refine)
        if isinstance(self.distill, dict):
            self.distill = _build(DistillConfig, self.distill, "distill")
        if self.calib_samples < 0:
            raise SLRError(f"--calib-samples {self.calib_samples} is negative", "pass --calib-samples N with N >= 0")
        if self.rank < 0:
            raise SLRError(f"rank {self.rank} is negative", "pass --rank 0 or a positive integer")
        h = self.refine.heldout if self.refine is not None else None
        if h and self.calib_samples and h >= self.calib_samples:
            raise SLRError(f"--tm-heldout {h} leaves none of the {self.calib_samples} calibration windows for "
                           "transformer matching to train on", "pass --tm-heldout below --calib-samples (0 = judge "
                           "on the training windows)")
        h = self.distill.heldout if self.distill is not None else None
        if self.distill is not None and (self.calib_samples == 0 or (h and h >= self.calib_samples)):
            raise SLRError(f"distillation needs calibration windows to train on ({self.calib_samples} windows, "
                           f"{h or 0} held out)", "pass --calib-samples above --kd-heldout")
        if self.alloc.budget_bits is not None and self.bits is None:
            raise SLRError("--budget-bits needs --bits and a method that quantizes, e.g. gptq or prune+lr",
                           "add --bits 4 (S's grid; the allocator then picks each matrix's width), or pass --budget")
        self.layer_spec()  # every other check, before any heavy work

    def layer_spec(self) -> LayerSpec:
        """The uniform spec. Rank-only methods keep no sparse part (sparsity 1); with a budget and no rank, rank 1
        stands in for the ranks the allocator sets."""
        m = solver_method(self.method)
        nm = parse_nm(self.pattern)
        q = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "factor_bits": self.factor_bits}
        if (self.bits is not None or self.factor_bits != 16) and not m.bits:
            quantizers = ", ".join(sorted(n for n, x in METHODS.items() if x.bits)) or "none yet"
            raise SLRError(f"{self.method} does not quantize inside the solve", f"use one of: {quantizers}, or drop "
                           "--bits/--factor-bits")
        if m.needs_bits and self.bits is None:
            raise SLRError(f"{self.method} quantizes and needs a bit width", "pass --bits 4 (or 8, 3, 2)")
        if not m.takes_sparsity:
            if nm is not None or self.sparsity not in (None, 1.0):
                raise SLRError(f"{self.method} keeps no sparse part", "drop --sparsity/--pattern, or pick an S+LR "
                               "method such as admm")
            rank = self.rank or (1 if self.alloc.budget is not None else 0)
            if rank == 0:
                raise SLRError(f"{self.method} is rank-only and needs a rank or a budget",
                               "pass --rank R or --budget 0.5")
            return _checked(LayerSpec(sparsity=1.0, rank=rank, **q))
        if not m.takes_rank and self.rank:
            raise SLRError(f"{self.method} has no low-rank part", "drop --rank, or pick an S+LR method such as admm")
        sp = (0.0 if self.bits is not None else 0.5) if self.sparsity is None else self.sparsity
        lowest = 0.0 if self.bits is not None else None  # a quantized S may be dense
        if nm is None and self.rank == 0 and not (sp == lowest or 0.0 < sp < 1.0):
            raise SLRError(f"sparsity {sp} is outside (0, 1)", "pass e.g. --sparsity 0.5")
        return _checked(LayerSpec(sparsity=sp, nm=nm, rank=self.rank, **q))

    def to_dict(self) -> dict:
        """Plain JSON values (the shape of a TOML run file's tables)."""
        return jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        """The inverse of ``to_dict`` (also what a TOML file's top level holds); unknown keys are an error."""
        return _build(cls, d, "config")


def _checked(spec: LayerSpec) -> LayerSpec:
    spec.validate()
    return spec


@dataclass
class RunOptions:
    """How a run goes (not recorded as part of the method): output, resume, onloading, storage, evaluation."""

    out: str | None = None  # artifact directory, written atomically (None: nothing is written)
    overwrite: bool = False
    save: bool = True  # False: results.json only
    resume: bool = False
    onload: bool = False
    offload_activations: bool = False
    values_dtype: str = "float16"
    factor_dtype: str = "float16"
    embed_bits: int = 16  # the embeddings (and an untied head) in the artifact: 16 = float16, 8 = int8 per row
    evaluate: bool = True
    eval_dense: bool = True
    windows: str | int = "64"
    eval_text: str | None = None
    calib_text: str | None = None
    tasks: list[str] | None = None
    limit: int | None = None
    device: str = "auto"
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        for what, v in (("--values-dtype", self.values_dtype), ("--factor-dtype", self.factor_dtype)):
            if v not in DTYPES:
                raise SLRError(f"{what} {v} is not a storage dtype", f"use one of: {', '.join(DTYPES)}")
        check_embed_bits(self.embed_bits)
        if self.batch_size < 1:
            raise SLRError(f"--batch-size {self.batch_size} is invalid", "pass --batch-size N with N >= 1")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]

    @classmethod
    def from_dict(cls, d: dict) -> RunOptions:
        """From a TOML file's [run] table; unknown keys are an error."""
        return _build(cls, d, "run")


def _build(cls, d, where: str):
    """``cls(**d)`` with an error naming the valid keys (nested tables become their dataclasses in __post_init__)."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise SLRError(f"[{where}] must be a table, not {type(d).__name__}", f"write it as [{where}] KEY = VALUE")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            raise SLRError(f"{k!r} is not a key of [{where}]", f"use one of: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # types of plain fields (the nested tables check their own)
        if f.name in d and f.name not in NESTED and not fits(d[f.name], hints[f.name]):
            raise SLRError(f"[{where}] {f.name} = {d[f.name]!r} has the wrong type ({f.type})",
                           f"write e.g. {f.name} = {f.default!r}" if f.default is not None else "see --help")
    return cls(**d)


def load_toml(path: str | Path) -> tuple[str | None, dict, dict]:
    """(model, config table, run table) of a TOML run file; see the module docstring for its layout."""
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SLRError(f"config file {p} does not exist", "pass the path of a TOML run file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SLRError(f"cannot read config file {p}: {e}", "fix the TOML (see `slr compress --help`)") from None
    model = d.pop("model", None)
    run = d.pop("run", {})
    if model is not None and not isinstance(model, str):
        raise SLRError(f"model = {model!r} in {p} is not a string", 'write e.g. model = "smollm2-135m"')
    return model, d, run


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, table by table."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["TM_PRESETS", "AllocConfig", "CompressConfig", "DistillConfig", "LayerSpec", "RefineConfig", "RunOptions",
           "keep_per_row", "load_toml", "merge", "parse_nm"]
