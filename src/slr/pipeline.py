"""Layer-sequential calibration pipeline.

For each decoder block in order: collect H = X^T X for every compressed linear (one H per group of
linears that share an input), solve each matrix, optionally refine the block (transformer matching),
replace its linears, and propagate the calibration inputs through the *compressed* block so that the
next block sees compressed-path inputs (as in SparseGPT). Peak memory is one block's activations
plus its H's. With ``config.distill``, the whole compressed model is then fitted to a dense copy's next-token
distributions (``slr.distill``).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .allocate import make_plan
from .budget import matrix_params
from .calibration import (
    BlockInputs,
    DiskActivations,
    HessianCollector,
    block_forward,
    capture_inputs,
    capture_inputs_stubbed,
    map_hidden,
)
from .config import CompressConfig
from .distill import distill_
from .distributed import bin_pack
from .errors import SLRError
from .heap import trim_heap
from .models.adapters import ArchAdapter, get_adapter
from .nn import compress_block_
from .options import as_kwargs
from .plan import Plan, key
from .qlinear import grids
from .refine import make_refiner
from .solvers import SolveResult, method, relative_error
from .solvers.base import check_finite


def _fault_after() -> int | None:
    """Fault injection for the resume tests: SLR_FAULT_KILL_AFTER=N SIGKILLs the process after N solved matrices."""
    v = os.environ.get("SLR_FAULT_KILL_AFTER")
    return int(v) if v else None


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _rebuild(block, adapter, i: int, checkpoints, materialize: str):
    """Block i as a finished run left it: its saved solver results applied, then its saved state (after TM)."""
    results, recs, secs, state = checkpoints.load(i)
    _apply_results(block, adapter, results, materialize)
    if state is not None:
        block.load_state_dict(state)
    return results, recs, secs


@dataclass
class MatrixRecord:
    block: int
    name: str
    shape: tuple[int, int]
    spec: str
    kept: int
    rank: int
    params: int
    rel_error: float
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class CompressReport:
    records: list[MatrixRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, SolveResult] = field(default_factory=dict)  # kept only if keep_results
    plan: Plan | None = None  # the plan the blocks were solved for
    allocation: dict | None = None  # the allocator's info (None for the plain uniform spec)
    refine: list[dict] = field(default_factory=list)  # transformer matching's per-block stats
    distill: dict | None = None  # slr.distill's stats
    blocks: CompressedBlocks | None = None  # onloading without the final rebuild (compress_(rebuild=False))
    resumed: int = 0  # leading blocks rebuilt from an interrupted run's checkpoints (their seconds are that run's)

    def add_time(self, stage: str, s: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + s

    @property
    def retained_params(self) -> int:
        return sum(r.params for r in self.records)

    @property
    def dense_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.records)

    @property
    def retained_fraction(self) -> float:
        return self.retained_params / max(self.dense_params, 1)

    @property
    def mean_rel_error(self) -> float:
        errs = [r.rel_error for r in self.records if r.rel_error == r.rel_error]
        return sum(errs) / len(errs) if errs else None


def solve_group(name: str, Ws: dict[str, torch.Tensor], H: torch.Tensor | None, specs: dict[str, object],
                options=None) -> dict[str, SolveResult]:
    """Solve every matrix of one input group with method ``name``; group solvers (joint) see them together.

    ``options``: the method's typed options (None = its defaults).
    """
    m = method(name)
    opts = as_kwargs(options) if options is not None else {}
    if m.group:
        names = list(Ws)
        res = m.fn([Ws[n] for n in names], H, [specs[n] for n in names], **opts)
        return dict(zip(names, res))
    return {n: m.fn(W, H, specs[n], **opts) for n, W in Ws.items()}


def _apply_results(block, adapter, results: dict[str, SolveResult], materialize: str) -> None:
    if materialize == "slr":
        compress_block_(block, adapter, results)
    else:  # write S + UV back into the dense nn.Linear (for quick experiments)
        lin = adapter.linears(block)
        for n, r in results.items():
            lin[n].weight.data.copy_(r.dense().to(lin[n].weight.dtype))


@dataclass
class CompressedBlocks:
    """The compressed blocks of an onloaded run, rebuilt one at a time from its block checkpoints.

    ``load(i)`` returns block i as the run left it (the dense block read from the shards, its solver results applied,
    then its saved state after TM); ``release`` frees it again. ``io.save(..., blocks=...)`` streams them into the
    artifact, so the whole compressed model is never in memory.
    """

    adapter: ArchAdapter
    pristine: list[nn.Module]  # meta-device copies of the dense blocks
    source: object  # onload.BlockSource
    checkpoints: object  # checkpoint.BlockCheckpoints
    materialize: str = "slr"

    @property
    def prefix(self) -> str:
        return self.adapter.blocks_path

    def __len__(self) -> int:
        return len(self.pristine)

    def load(self, i: int) -> nn.Module:
        block = copy.deepcopy(self.pristine[i])
        self.source.load(i, block)
        _rebuild(block, self.adapter, i, self.checkpoints, self.materialize)
        return block

    def release(self, block: nn.Module) -> None:
        self.source.release(block)
        trim_heap()


def plan_for(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None,
             device="cpu") -> tuple[Plan, dict | None]:
    """The per-matrix plan that ``config.alloc`` describes: the uniform spec when there is nothing to allocate,
    else the allocator's plan and its info."""
    if config.alloc.is_uniform:
        return Plan.uniform(config.layer_spec()), None
    return make_plan(model, config, calib, device, compress=compress_)


def compress_(
    model: nn.Module,
    config: CompressConfig,
    calib: torch.Tensor | None,
    *,
    plan: Plan | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    materialize: str = "slr",
    keep_results: bool = False,
    checkpoints=None,
    onload=None,
    offload_activations: str | None = None,
    rebuild: bool = True,
    on_block=None,
) -> CompressReport:
    """Compress ``model`` in place as ``config`` describes: the plan (``config.alloc``), every block in order (collect
    H, solve each matrix, replace the linears, refine with ``config.refine``, propagate), ``config.distill`` on the
    whole model, and a per-matrix report.

    calib: LongTensor [n, seqlen] calibration windows (may be None or empty for data-free methods).
    plan: per-matrix specs; default ``plan_for(model, config, calib, device)`` (``report.plan``, ``report.allocation``).
    materialize: "slr" replaces linears by SLRLinear, "dense" writes S + UV into the nn.Linear.
    checkpoints: optional ``checkpoint.BlockCheckpoints``: every finished block is saved there, and blocks it already
        holds (an interrupted run's) are rebuilt from it instead of being solved again.
    onload: optional ``onload.BlockSource`` for a model whose blocks are on the meta device: each block is loaded
        from the shards when its turn comes and released once it is checkpointed (``checkpoints`` is required);
        after the last block every compressed block is rebuilt from the checkpoints.
    offload_activations: a directory for the calibration activations (one file per batch) instead of memory.
    rebuild: with ``onload``, put every compressed block back into ``model`` after the last block (needed to evaluate
        it). False leaves the blocks on the meta device and returns them as ``report.blocks`` (a
        ``CompressedBlocks``) for a streaming ``io.save``: the peak then stays at about one block.
    on_block: optional ``fn(i, Hs, results)`` called after block i is solved, with its H per input group and its
        SolveResults, before the block is replaced (``solvedlevels`` solves a matrix's other levels there).
    """
    adapter = get_adapter(model)
    data_free = method(config.method).data_free
    if (calib is None or len(calib) == 0) and not data_free:
        raise SLRError(f"method {config.method!r} needs calibration data", "pass --calib-samples N (N > 0)")
    if onload is not None and checkpoints is None:
        raise SLRError("onloading keeps the compressed blocks in the run's checkpoints", "pass --out DIR")
    if config.distill is not None and (onload is not None or distributed.current().active):
        raise SLRError("distillation needs the whole model in one process (it keeps a dense copy as the teacher)",
                       "drop --distill, or run without --onload and torchrun")
    report = CompressReport()
    t = time.perf_counter()
    if plan is None:
        plan, report.allocation = plan_for(model, config, calib, device)
        report.add_time("allocate", time.perf_counter() - t)
    report.plan = plan
    refiner = make_refiner(config.refine, device=device, progress=progress) if config.refine is not None else None
    teacher = copy.deepcopy(model) if config.distill is not None else None  # the dense model, frozen
    blocks = adapter.blocks(model)
    pristine = [copy.deepcopy(b) for b in blocks] if onload is not None else None  # meta: costs no memory
    t = time.perf_counter()
    inputs = _capture(model, adapter, calib, batch_size, device, onload, offload_activations,
                      use=calib is not None and len(calib) > 0 and (not data_free or refiner is not None))
    report.add_time("capture", time.perf_counter() - t)
    try:
        _BlockLoop(adapter, blocks, config, plan, inputs, report, materialize, refiner, keep_results, checkpoints,
                   onload, pristine, data_free, distributed.current(), on_block=on_block).run(progress)
    finally:
        if inputs is not None and isinstance(inputs.hidden, DiskActivations):
            inputs.hidden.cleanup()
    if refiner is not None:
        report.refine = refiner.stats
    if teacher is not None:
        t = time.perf_counter()
        report.distill = distill_(model, teacher, calib.to(device), list(blocks), config.distill, progress)
        report.add_time("distill", time.perf_counter() - t)
        del teacher
    if onload is not None:
        stream = CompressedBlocks(adapter, pristine, onload, checkpoints, materialize)
        if not rebuild:
            report.blocks = stream
            return report
        t = time.perf_counter()  # every block from its checkpoint (the saved results, then the saved state)
        for i in range(len(blocks)):
            blocks[i] = stream.load(i)
        report.add_time("onload.rebuild", time.perf_counter() - t)
    return report


def _capture(model, adapter, calib, batch_size, device, onload, offload_activations, use: bool) -> BlockInputs | None:
    """Block 0's calibration inputs (data-free solvers need none unless a refinement trains on them)."""
    if not use:
        return None
    group = distributed.current()
    if group.active:  # data-parallel calibration: this rank's batches only (batch b -> rank b mod K)
        starts = list(range(0, len(calib), batch_size))
        if len(starts) < group.world:
            raise SLRError(f"{len(starts)} calibration batches cannot feed {group.world} ranks",
                           "pass more --calib-samples, a smaller --batch-size, or fewer processes")
        calib = torch.cat([calib[starts[b]:starts[b] + batch_size] for b in group.mine(len(starts))])
    store = None
    if offload_activations is not None:  # batches go to disk as they are captured
        Path(offload_activations).mkdir(parents=True, exist_ok=True)
        store = DiskActivations(offload_activations)
    capture = capture_inputs_stubbed if onload is not None else capture_inputs
    return capture(model, adapter, calib, batch_size, device, hidden=store)


@dataclass
class _BlockLoop:
    """The block loop of ``compress_``: what stays fixed over the blocks, and one method per kind of block."""

    adapter: ArchAdapter
    blocks: nn.ModuleList
    config: CompressConfig
    plan: Plan
    inputs: BlockInputs | None
    report: CompressReport
    materialize: str
    refiner: object | None
    keep_results: bool
    checkpoints: object | None
    onload: object | None
    pristine: list[nn.Module] | None
    data_free: bool
    group: object
    dense_hidden: list[torch.Tensor] | None = None  # dense-path activations, for TM's dense_targets
    on_block: object | None = None  # compress_'s hook

    def __post_init__(self):
        cfg = self.config.refine
        if self.refiner is not None and self.inputs is not None and cfg is not None and cfg.dense_targets > 0:
            if isinstance(self.inputs.hidden, DiskActivations):
                raise SLRError("--tm-dense-targets keeps the dense path's activations in memory",
                               "drop --offload-activations, or --tm-dense-targets")
            self.dense_hidden = [h.clone() for h in self.inputs.hidden]

    def run(self, progress: bool) -> None:
        done = self.checkpoints.completed() if self.checkpoints is not None else 0
        kill = _KillSwitch(_fault_after())
        bar = tqdm(range(len(self.blocks)), desc=f"compress [{self.config.method}]", unit="block",
                   disable=not progress or not self.group.is_main)
        for i in bar:
            if self.onload is not None:
                t = time.perf_counter()
                self.blocks[i] = copy.deepcopy(self.pristine[i])
                self.onload.load(i, self.blocks[i])
                self.report.add_time("onload.load", time.perf_counter() - t)
            dense_out = self._dense_step(i, self.blocks[i])  # while block i is still dense
            if i < done:  # finished by an interrupted run: rebuild it exactly, then propagate as that run did
                self._resume(i, self.blocks[i])
                bar.set_postfix(resumed=i + 1)
            else:
                err = self._solve(i, self.blocks[i], kill, dense_out)
                if err is not None:
                    bar.set_postfix(rel_err=f"{err:.4f}")
            if self.onload is not None:
                self.onload.release(self.blocks[i])
            trim_heap()

    def _dense_step(self, i: int, block: nn.Module) -> list[torch.Tensor] | None:
        """The dense block's outputs on the dense-path activations (which move on to them); None when unused."""
        if self.dense_hidden is None:
            return None
        with torch.no_grad():
            self.dense_hidden = [block_forward(block, self.inputs, i, h) for h in self.dense_hidden]
        return self.dense_hidden

    def _resume(self, i: int, block: nn.Module) -> None:
        report = self.report
        report.resumed += 1
        results, recs, secs = _rebuild(block, self.adapter, i, self.checkpoints, self.materialize)
        report.records += [MatrixRecord(**(r | {"shape": tuple(r["shape"])})) for r in recs]
        for k, v in secs.items():
            report.add_time(k, v)
        if self.keep_results:
            report.results.update({key(i, n): r for n, r in results.items()})
        stats = self.checkpoints.refine_stats(i) if self.refiner is not None else None
        if stats is not None:
            self.refiner.stats.append(stats)
        self._propagate(i, block, timed=False)

    def _solve(self, i: int, block: nn.Module, kill: _KillSwitch, dense_out=None) -> float | None:
        """Collect H, solve, replace the linears, refine, checkpoint, propagate; returns the mean layer error.

        dense_out: the dense path's outputs of block i, mixed into TM's targets (RefineConfig.dense_targets)."""
        report, inputs, refiner = self.report, self.inputs, self.refiner
        before = dict(report.seconds)
        linears = self.adapter.linears(block)
        groups = [g for g in self.adapter.groups if all(n in linears for n in g)]
        Hs, targets, stats = {}, None, None
        if inputs is not None:
            t = time.perf_counter()
            Hs, targets = _collect(block, i, inputs, linears, groups, refiner is not None, self.group)
            report.add_time("hessian", time.perf_counter() - t)
        t = time.perf_counter()
        results, records = _solve_block(i, linears, groups, Hs, self.config, self.plan, self.data_free, self.group,
                                        kill)
        report.records += records
        report.add_time("solve", time.perf_counter() - t)
        if self.on_block is not None:
            t = time.perf_counter()
            self.on_block(i, Hs, results)
            report.add_time("on_block", time.perf_counter() - t)
        _apply_results(block, self.adapter, results, self.materialize)
        if self.keep_results:
            report.results.update({key(i, n): r for n, r in results.items()})
        if refiner is not None and inputs is not None:
            t = time.perf_counter()
            if dense_out is not None:
                a = self.config.refine.dense_targets
                targets = [own.mul(1 - a).add_(y, alpha=a) for own, y in zip(targets, dense_out)]
            stats = refiner(block, i, inputs, targets)
            report.add_time("refine", time.perf_counter() - t)
        if self.checkpoints is not None and self.group.is_main:
            secs = {k: v - before.get(k, 0.0) for k, v in report.seconds.items()}
            recs = [json.loads(json.dumps(vars(r) | {"shape": list(r.shape)}, default=str)) for r in records]
            self.checkpoints.save(i, results, recs, secs, block.state_dict() if refiner is not None else None,
                                  refine=stats)
        self._propagate(i, block, timed=True)
        errs = [r.rel_error for r in records if r.rel_error == r.rel_error]
        return sum(errs) / len(errs) if errs else None

    def _propagate(self, i: int, block: nn.Module, timed: bool) -> None:
        """The calibration inputs through the compressed block: the next block sees compressed-path inputs."""
        inputs = self.inputs
        if inputs is None:
            return
        t = time.perf_counter()
        with torch.no_grad():
            inputs.hidden = map_hidden(inputs.hidden, lambda h: block_forward(block, inputs, i, h))
        if timed:
            self.report.add_time("propagate", time.perf_counter() - t)


def _collect(block, i: int, inputs: BlockInputs, linears, groups, keep_targets: bool, group):
    """H per input group of block ``i`` (all-reduced over the ranks), and the block's outputs when a refinement
    needs them as targets (else the forward stops once every H is recorded)."""
    coll = HessianCollector(linears, groups, stop_early=not keep_targets)
    targets = []
    with torch.no_grad():
        for h in inputs.hidden:
            out = coll.forward(block, inputs, i, h)
            if keep_targets:
                targets.append(out)
    return coll.finish(group), (targets if keep_targets else None)


class _KillSwitch:
    """Fault injection for the resume tests: SIGKILL after ``after`` solved matrices (None: never)."""

    def __init__(self, after: int | None):
        self.after, self.solved = after, 0

    def count(self, n: int) -> None:
        self.solved += n
        if self.after is not None and self.solved >= self.after:
            _kill_self()


def _solve_block(i: int, linears, groups, Hs: dict, config: CompressConfig, plan: Plan, data_free: bool, group,
                 kill: _KillSwitch) -> tuple[dict[str, SolveResult], list[MatrixRecord]]:
    """Solve every matrix of block ``i``: whole groups for group solvers, else one task per linear, bin-packed over
    the ranks by cost; every rank gets every result. Inputs are validated on every rank first."""
    is_group = method(config.method).group
    jobs = []  # (group, weights, H, specs)
    for g in groups:
        H = Hs.get(g)
        check_finite(f"calibration statistics (H) of block {i} {g[0]}", H)
        Ws = {n: linears[n].weight.detach().float() for n in g}
        for n, W in Ws.items():
            check_finite(f"weight {key(i, n)}", W)
        specs = {n: plan.get(i, n) for n in g}
        for n, W in Ws.items():
            # a shared group rank may exceed a member's own min(m, n); the group solver checks it against n
            sp = specs[n]
            (replace(sp, rank=min(sp.rank, min(W.shape))) if is_group else sp).validate(*W.shape)
        jobs.append((g, Ws, None if data_free and H is None else H, specs))
    tasks = [(j, n) for j, job in enumerate(jobs) for n in ((None,) if is_group else job[0])]
    owner = [0] * len(tasks)
    if group.active:
        costs = [sum(w.shape[0] * w.shape[1] ** 2 for m, w in jobs[j][1].items() if n in (None, m))
                 for j, n in tasks]
        owner = bin_pack(costs, group.world)
    solved_tasks: dict[int, tuple[dict[str, SolveResult], float]] = {}
    for k, (j, n) in enumerate(tasks):
        if owner[k] != group.rank:
            continue
        g, Ws, H, specs = jobs[j]
        tg = time.perf_counter()
        reused = plan.presolved(i, n, specs[n], Ws[n], H) if n is not None else None  # the allocator solved it
        out = {n: reused} if reused is not None else solve_group(config.method, Ws if n is None else {n: Ws[n]}, H,
                                                                 specs, config.solver)
        solved_tasks[k] = (out, time.perf_counter() - tg)
        kill.count(len(out))
    if group.active:  # every rank gets every result from its owner
        solved_tasks = {k: group.broadcast_object(solved_tasks.get(k), owner[k]) for k in range(len(tasks))}
    results: dict[str, SolveResult] = {}
    records = []
    for k, (j, _) in enumerate(tasks):
        g, Ws, H, specs = jobs[j]
        solved, dt = solved_tasks[k]
        for n, res in solved.items():
            W = Ws[n]
            if res.qparams and not res.qspec:  # the grids of the quantized parts, for storage
                res.qspec = grids(specs[n], res)
            shared_counted = any(res.V is not None and res.V is r.V for r in results.values())
            records.append(MatrixRecord(
                block=i, name=n, shape=tuple(W.shape), spec=specs[n].label,
                kept=int(res.mask.sum()) if res.mask is not None else 0, rank=res.rank,
                params=matrix_params(res, count_v=not shared_counted),
                # without H (data-free methods) this is the plain Frobenius relative error
                rel_error=relative_error(W, H, res.dense()),
                seconds=res.info.get("seconds", dt / len(solved)),
                info={k: v for k, v in res.info.items() if k in ("iterations", "time", "best_iter", "reused")},
            ))
            results[n] = res
    return results, records
