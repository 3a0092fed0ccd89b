"""Layer-sequential calibration pipeline.

For each decoder block in order: collect H = X^T X for every compressed linear (one H per group of
linears that share an input), solve each matrix, optionally refine the block (transformer matching),
replace its linears, and propagate the calibration inputs through the *compressed* block so that the
next block sees compressed-path inputs (as in SparseGPT). Peak memory is one block's activations
plus its H's.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .budget import matrix_params
from .config import CompressConfig
from .distributed import bin_pack
from .errors import SLRError
from .models.adapters import ArchAdapter, get_adapter
from .plan import Plan, key
from .solvers import DATA_FREE, SolveResult, get_solver, relative_error
from .solvers.base import GROUP_SOLVERS, check_finite


class _Stop(Exception):
    pass


_LIBC = None


def trim_heap() -> None:
    """Hand freed memory back to the OS after a block (glibc only; elsewhere a no-op).

    Each block frees hundreds of MB of activations, H's and solver buffers; glibc keeps much of that in its arenas,
    so without this the resident size creeps up block after block (SmolLM2 with --onload, 32 windows: 1.94 GiB at
    the last block without the trim, 1.45 GiB with it).
    """
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (raises AttributeError on a libc without it)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _fault_after() -> int | None:
    """Fault injection for the resume tests: SLR_FAULT_KILL_AFTER=N SIGKILLs the process after N solved matrices."""
    v = os.environ.get("SLR_FAULT_KILL_AFTER")
    return int(v) if v else None


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _strip_cache(kw: dict) -> dict:
    out = {}
    for k, v in kw.items():
        if k in ("past_key_value", "past_key_values"):
            out[k] = None
        elif k == "use_cache":
            out[k] = False
        else:
            out[k] = v
    return out


@dataclass
class BlockInputs:
    """Calibration activations entering a block, in batches, plus per-block, per-batch-size kwargs."""

    hidden: list[torch.Tensor]  # batches of [b, L, d]
    kwargs: dict[tuple[int, int], dict]  # (block index, batch size) -> kwargs (position embeddings, mask, ...)

    def kw(self, block: int, batch: torch.Tensor) -> dict:
        return self.kwargs[(block, batch.shape[0])]


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: ArchAdapter, calib: torch.Tensor, batch_size: int, device,
                   hidden=None) -> BlockInputs:
    """Run the embeddings on ``calib`` [n, L] and capture block 0's inputs and every block's kwargs.

    ``hidden``: where the batches go (a list by default; an ``onload.DiskActivations`` writes each to disk).
    """
    blocks = adapter.blocks(model)
    hidden = [] if hidden is None else hidden
    kwargs: dict[tuple[int, int], dict] = {}

    def stop_hook(_mod, args, kw):
        h = args[0] if args else kw["hidden_states"]
        hidden.append(h.detach())
        raise _Stop

    def kw_hook(i):
        def hook(_mod, args, kw):
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            kwargs[(i, args[0].shape[0] if args else 0)] = _strip_cache(kw)
        return hook

    sizes_done: set[int] = set()
    for s in range(0, len(calib), batch_size):
        ids = calib[s : s + batch_size].to(device)
        if ids.shape[0] not in sizes_done:  # one full forward per batch size records every block's kwargs
            sizes_done.add(ids.shape[0])
            hooks = [b.register_forward_pre_hook(kw_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
            try:
                model(input_ids=ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            # some models pass hidden_states by keyword: re-key the kwargs with this batch size
            for k in [k for k in kwargs if k[1] == 0]:
                kwargs[(k[0], ids.shape[0])] = kwargs.pop(k)
        h = blocks[0].register_forward_pre_hook(stop_hook, with_kwargs=True)
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def capture_inputs_stubbed(model: nn.Module, adapter: ArchAdapter, calib: torch.Tensor, batch_size: int,
                           device, hidden=None) -> BlockInputs:
    """``capture_inputs`` without running any block (for onloading, where the blocks are on the meta device).

    Every block's forward is swapped for a stub that records its kwargs (block 0 also its input) and passes the
    hidden states on; the last one stops the forward, so neither the blocks nor the head run.
    """
    blocks = adapter.blocks(model)
    hidden = [] if hidden is None else hidden
    kwargs: dict[tuple[int, int], dict] = {}

    def stub(i):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            kwargs.setdefault((i, h.shape[0]), _strip_cache({k: v for k, v in kw.items() if k != "hidden_states"}))
            if i == 0:
                hidden.append(h.detach())
            if i == len(blocks) - 1:
                raise _Stop
            return h
        return forward

    for i, b in enumerate(blocks):
        b.forward = stub(i)
    try:
        for s in range(0, len(calib), batch_size):
            try:
                model(input_ids=calib[s : s + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for b in blocks:
            del b.forward  # back to the class's forward
    return BlockInputs(hidden, kwargs)


def _map_hidden(hidden, fn):
    """fn over every activation batch; a DiskActivations stays on disk (one batch in memory at a time)."""
    if hasattr(hidden, "map"):
        return hidden.map(fn)
    return [fn(h) for h in hidden]


def _rebuild(block, adapter, i: int, checkpoints, materialize: str):
    """Block i as a finished run left it: its saved solver results applied, then its saved state (after TM)."""
    results, recs, secs, state = checkpoints.load(i)
    _apply_results(block, adapter, results, materialize)
    if state is not None:
        block.load_state_dict(state)
    return results, recs, secs


def block_forward(block: nn.Module, inputs: BlockInputs, index: int, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden, **inputs.kw(index, hidden))
    return out[0] if isinstance(out, tuple) else out


class HessianCollector:
    """Pre-hooks that accumulate H = X^T X / n_tokens per input group (fp32 batch products, fp64 sum).

    ``stop_early``: once every group's input of the current forward is recorded, the hook raises ``_Stop``, so the
    rest of the block (down_proj's product, the residual add) is not computed; ``forward`` catches it. For H alone
    the block's output is never needed, which saves about a fifth of the calibration forward.
    """

    def __init__(self, linears: dict[str, nn.Linear], groups: list[tuple[str, ...]], stop_early: bool = False):
        self.groups = list(groups)
        self.H: dict[tuple[str, ...], torch.Tensor] = {}
        self.n: dict[tuple[str, ...], int] = {}
        self.stop_early = stop_early
        self._seen: set = set()
        self.hooks = []
        for g in groups:
            self.hooks.append(linears[g[0]].register_forward_pre_hook(self._hook(g)))

    def _hook(self, g):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, d_in]
            xtx = (x.T @ x).double()
            if g in self.H:
                self.H[g] += xtx
                self.n[g] += x.shape[0]
            else:
                self.H[g] = xtx
                self.n[g] = x.shape[0]
            self._seen.add(g)
            if self.stop_early and len(self._seen) == len(self.groups):
                raise _Stop
        return hook

    def forward(self, block: nn.Module, inputs: BlockInputs, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The block on one batch with the hooks recording; None when the forward was cut short (``stop_early``)."""
        self._seen = set()
        try:
            return block_forward(block, inputs, index, hidden)
        except _Stop:
            return None

    def finish(self, group=None) -> dict[tuple[str, ...], torch.Tensor]:
        """H per group; under torch.distributed the sums and token counts are all-reduced over the ranks first."""
        for h in self.hooks:
            h.remove()
        if group is not None and group.active:
            for g in self.groups:  # the same order on every rank
                group.all_reduce_(self.H[g])
                self.n[g] = int(group.sum_float(float(self.n[g])))
        return {g: H / self.n[g] for g, H in self.H.items()}


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
    blocks: CompressedBlocks | None = None  # onloading without the final rebuild (compress_(rebuild=False))

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


def solve_group(
    method: str, Ws: dict[str, torch.Tensor], H: torch.Tensor | None, specs: dict[str, object], opts: dict
) -> dict[str, SolveResult]:
    """Solve every matrix of one input group; group solvers (joint) see them together."""
    if method in GROUP_SOLVERS:
        names = list(Ws)
        res = GROUP_SOLVERS[method]([Ws[n] for n in names], H, [specs[n] for n in names], **opts)
        return dict(zip(names, res))
    solver = get_solver(method)
    return {n: solver(W, H, specs[n], **opts) for n, W in Ws.items()}


def _apply_results(block, adapter, results: dict[str, SolveResult], materialize: str) -> None:
    if materialize == "slr":
        from .nn import compress_block_

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


def compress_(
    model: nn.Module,
    config: CompressConfig,
    calib: torch.Tensor | None,
    *,
    plan: Plan | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    materialize: str = "slr",
    refine: Callable | None = None,
    progress: bool = True,
    keep_results: bool = False,
    checkpoints=None,
    onload=None,
    offload_activations: str | None = None,
    rebuild: bool = True,
) -> CompressReport:
    """Compress ``model`` in place, block by block. Returns a per-matrix report.

    calib: LongTensor [n, seqlen] calibration windows (may be None or empty for data-free methods).
    plan: per-matrix specs; default is ``config.layer_spec()`` everywhere.
    materialize: "slr" replaces linears by SLRLinear, "dense" writes S + UV into the nn.Linear.
    refine: optional callable(block, index, inputs, hidden_batches, targets) for transformer matching.
    checkpoints: optional ``checkpoint.BlockCheckpoints``: every finished block is saved there, and blocks it already
        holds (an interrupted run's) are rebuilt from it instead of being solved again.
    onload: optional ``onload.BlockSource`` for a model whose blocks are on the meta device: each block is loaded
        from the shards when its turn comes and released once it is checkpointed (``checkpoints`` is required);
        after the last block every compressed block is rebuilt from the checkpoints.
    offload_activations: a directory for the calibration activations (one file per batch) instead of memory.
    rebuild: with ``onload``, put every compressed block back into ``model`` after the last block (needed to evaluate
        it). False leaves the blocks on the meta device and returns them as ``report.blocks`` (a
        ``CompressedBlocks``) for a streaming ``io.save``: the peak then stays at about one block.
    """
    adapter = get_adapter(model)
    plan = plan or Plan.uniform(config.layer_spec())
    data_free = config.method in DATA_FREE
    if (calib is None or len(calib) == 0) and not data_free:
        raise SLRError(f"method {config.method!r} needs calibration data", "pass --calib-samples N (N > 0)")
    report = CompressReport()
    blocks = adapter.blocks(model)
    if onload is not None and checkpoints is None:
        raise SLRError("onloading keeps the compressed blocks in the run's checkpoints", "pass --out DIR")
    pristine = [copy.deepcopy(b) for b in blocks] if onload is not None else None  # meta: costs no memory
    t = time.perf_counter()
    # data-free solvers need no activations unless a refinement stage trains on them
    use_calib = calib is not None and len(calib) > 0 and (not data_free or refine is not None)
    group = distributed.current()
    if use_calib and group.active:  # data-parallel calibration: this rank's batches only (batch b -> rank b mod K)
        starts = list(range(0, len(calib), batch_size))
        if len(starts) < group.world:
            raise SLRError(f"{len(starts)} calibration batches cannot feed {group.world} ranks",
                           "pass more --calib-samples, a smaller --batch-size, or fewer processes")
        calib = torch.cat([calib[starts[b]:starts[b] + batch_size] for b in group.mine(len(starts))])
    inputs = None
    if use_calib:
        store = None
        if offload_activations is not None:  # batches go to disk as they are captured
            from .onload import DiskActivations

            Path(offload_activations).mkdir(parents=True, exist_ok=True)
            store = DiskActivations(offload_activations)
        capture = capture_inputs_stubbed if onload is not None else capture_inputs
        inputs = capture(model, adapter, calib, batch_size, device, hidden=store)
    report.add_time("capture", time.perf_counter() - t)
    try:
        _compress_blocks(adapter, blocks, config, plan, inputs, report, materialize, refine, progress, keep_results,
                         checkpoints, onload, pristine, data_free, group)
    finally:
        if inputs is not None and hasattr(inputs.hidden, "cleanup"):
            inputs.hidden.cleanup()
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


def _compress_blocks(adapter, blocks, config, plan, inputs, report, materialize, refine, progress, keep_results,
                     checkpoints, onload, pristine, data_free, group) -> None:
    """The block loop of ``compress_``."""
    done = checkpoints.completed() if checkpoints is not None else 0
    fault = _fault_after()
    solved_count = 0
    bar = tqdm(range(len(blocks)), desc=f"compress [{config.method}]", unit="block",
               disable=not progress or not group.is_main)
    for i in bar:
        if onload is not None:
            t = time.perf_counter()
            blocks[i] = copy.deepcopy(pristine[i])
            onload.load(i, blocks[i])
            report.add_time("onload.load", time.perf_counter() - t)
        block = blocks[i]
        before = dict(report.seconds)
        if i < done:  # finished by an interrupted run: rebuild it exactly, then propagate as that run did
            results, recs, secs = _rebuild(block, adapter, i, checkpoints, materialize)
            report.records += [MatrixRecord(**(r | {"shape": tuple(r["shape"])})) for r in recs]
            for k, v in secs.items():
                report.add_time(k, v)
            if keep_results:
                report.results.update({key(i, n): r for n, r in results.items()})
            if inputs is not None:
                with torch.no_grad():
                    inputs.hidden = _map_hidden(inputs.hidden, lambda h, b=block, j=i: block_forward(b, inputs, j, h))
            if onload is not None:
                onload.release(block)
            bar.set_postfix(resumed=i + 1)
            continue
        linears = adapter.linears(block)
        groups = [g for g in adapter.groups if all(n in linears for n in g)]
        targets = None
        Hs: dict = {}
        if inputs is not None:
            t = time.perf_counter()
            coll = HessianCollector(linears, groups, stop_early=refine is None)
            targets = []
            with torch.no_grad():
                for h in inputs.hidden:
                    out = coll.forward(block, inputs, i, h)
                    if refine is not None:
                        targets.append(out)
            Hs = coll.finish(group)
            if refine is None:
                targets = None
            report.add_time("hessian", time.perf_counter() - t)
        results: dict[str, SolveResult] = {}
        t = time.perf_counter()
        jobs = []  # (group, weights, H, specs), validated on every rank
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
                (replace(sp, rank=min(sp.rank, min(W.shape))) if config.method in GROUP_SOLVERS else sp).validate(
                    *W.shape)
            jobs.append((g, Ws, None if data_free and H is None else H, specs))
        # solve tasks: a whole group for group solvers, else one per linear; bin-packed over the ranks by cost
        tasks = [(j, n) for j, job in enumerate(jobs)
                 for n in ((None,) if config.method in GROUP_SOLVERS else job[0])]
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
            out = solve_group(config.method, Ws if n is None else {n: Ws[n]}, H, specs, config.solver_opts)
            solved_tasks[k] = (out, time.perf_counter() - tg)
            solved_count += len(out)
            if fault is not None and solved_count >= fault:
                _kill_self()
        if group.active:  # every rank gets every result from its owner
            solved_tasks = {k: group.broadcast_object(solved_tasks.get(k), owner[k]) for k in range(len(tasks))}
        for k, (j, _) in enumerate(tasks):
            g, Ws, H, specs = jobs[j]
            solved, dt = solved_tasks[k]
            for n, res in solved.items():
                W = Ws[n]
                shared_counted = any(res.V is not None and res.V is r.V for r in results.values())
                rec = MatrixRecord(
                    block=i, name=n, shape=tuple(W.shape), spec=specs[n].label,
                    kept=int(res.mask.sum()) if res.mask is not None else 0, rank=res.rank,
                    params=matrix_params(res, count_v=not shared_counted),
                    # without H (data-free methods) this is the plain Frobenius relative error
                    rel_error=relative_error(W, H, res.dense()),
                    seconds=res.info.get("seconds", dt / len(solved)),
                    info={k: v for k, v in res.info.items() if k in ("iterations", "time", "best_iter")},
                )
                report.records.append(rec)
                results[n] = res
        report.add_time("solve", time.perf_counter() - t)
        _apply_results(block, adapter, results, materialize)
        if keep_results:
            report.results.update({key(i, n): r for n, r in results.items()})
        if refine is not None and inputs is not None:
            t = time.perf_counter()
            refine(block, i, inputs, targets)
            report.add_time("refine", time.perf_counter() - t)
        if checkpoints is not None and group.is_main:
            secs = {k: v - before.get(k, 0.0) for k, v in report.seconds.items()}
            recs = [json.loads(json.dumps(vars(r) | {"shape": list(r.shape)}, default=str))
                    for r in report.records if r.block == i]
            checkpoints.save(i, results, recs, secs, block.state_dict() if refine is not None else None)
        if inputs is not None:
            t = time.perf_counter()
            with torch.no_grad():
                inputs.hidden = _map_hidden(inputs.hidden, lambda h, b=block, j=i: block_forward(b, inputs, j, h))
            report.add_time("propagate", time.perf_counter() - t)
        if onload is not None:
            onload.release(block)
        trim_heap()
        errs = [r.rel_error for r in report.records if r.block == i and r.rel_error == r.rel_error]
        if errs:
            bar.set_postfix(rel_err=f"{sum(errs) / len(errs):.4f}")
