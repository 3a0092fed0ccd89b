"""Transformer matching (TM, 3BASiL; methods.md §3.3): fit a compressed block to its dense outputs.

After a block's linears are replaced, minimise Σ ||block_c(x) - target||^2 over the block's parameters, where x are
the compressed-path inputs of the block and target = dense_block(x) (the "memory-efficient" targets: no second
activation cache). Trained: SLRLinear ``values`` (the support is fixed by construction), ``U``, ``V`` / shared
``V``, biases, norm weights and any plain nn.Linear weight (quantized parts of a QSLRLinear are codes, not
Parameters: they keep their grid values and only the layer's float parts train). A plain nn.Linear pruned in place
(pure pruning with materialize="dense") keeps its zeros: its gradient is multiplied by (W != 0) and the weight is
re-masked after every step (the released code forgot this for non-LoRA layers).

Windows: of the block's n calibration windows (per process under torchrun), the last h are held out (h =
``cfg.heldout``; None = max(1, n // 8) when n >= 2, else 0) and TM trains on the first min(max_samples, n - h)
(max_samples None = n - h): held-out windows are never trained on, and when max_samples + h <= n they are windows
training would not have used anyway. h >= n (with n > 0) is an SLRError.

Schedule: epoch 0 only measures the loss (the reference), then epochs 1..E-1 take Adam steps with a cosine schedule
from lr to lr * final_lr_frac over all steps. A step sees ``batch_size`` windows: the pipeline's batches are split
into chunks of at most ``batch_size`` windows (kwargs depend on the batch size: the ones recorded for that size,
else the batch's kwargs sliced along the batch dimension) and gradients are accumulated over smaller batches.
Training runs in fp32 (a lower-precision block is cast to fp32 and back).

Judging (restore-if-worse), with held-out windows: their loss is measured exactly before training and after every
epoch's steps; the parameters with the lowest held-out loss are kept if it is below the original's, else the
original parameters are restored bit for bit. This catches overfitting as well as divergence. Without held-out
windows (h = 0) the training windows judge: the loss of epoch e (measured on the fly, before each step) is attributed
to the snapshot taken at its start, the final parameters are evaluated exactly, the best of them is kept and the
original restored when TM did not improve on the reference. Stats: ``windows`` (training), ``heldout_windows``,
``loss_before``/``loss_after`` (training windows, of the kept parameters), ``heldout_loss_before``/``_after`` (None
when h = 0), ``epoch_losses``, ``heldout_losses``, ``restored``, ``kept_epoch`` (E = the last parameters, e = those
at the start of epoch e, 0 = the original).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import BlockInputs
from .config import RefineConfig
from .errors import SLRError
from .nn import SharedProjection, SLRLinear


def _trainable(block: nn.Module,
               cfg: RefineConfig) -> tuple[list[nn.Parameter], list[tuple[nn.Parameter, torch.Tensor]]]:
    """(parameters to train, [(plain Linear weight, keep mask)] for in-place pruned linears)."""
    params: dict[int, nn.Parameter] = {}
    masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    handled: set[int] = set()
    for mod in block.modules():
        if isinstance(mod, SLRLinear):
            for p in (mod.values, mod.U, mod.V):
                if isinstance(p, nn.Parameter):  # quantized parts are codes (buffers): they stay on their grid
                    params[id(p)] = p
            if mod.bias is not None and cfg.train_biases:
                params[id(mod.bias)] = mod.bias
            handled.update(id(p) for p in mod.parameters(recurse=False))
        elif isinstance(mod, SharedProjection):
            if isinstance(mod.V, nn.Parameter):
                params[id(mod.V)] = mod.V
                handled.add(id(mod.V))
        elif isinstance(mod, nn.Linear):
            params[id(mod.weight)] = mod.weight
            keep = mod.weight.detach() != 0
            if not bool(keep.all()):
                masks.append((mod.weight, keep))
            if mod.bias is not None and cfg.train_biases:
                params[id(mod.bias)] = mod.bias
            handled.update(id(p) for p in mod.parameters(recurse=False))
    for name, p in block.named_parameters():
        if id(p) in handled or id(p) in params:
            continue
        is_bias = name.endswith("bias")
        if (is_bias and cfg.train_biases) or (not is_bias and cfg.train_norms):
            params[id(p)] = p  # norms (RMSNorm / LayerNorm weights and biases) and anything else in the block
    return list(params.values()), masks


def _cast(obj, dtype: torch.dtype):
    """Cast floating tensors inside (nested) tuples / lists / dicts to ``dtype``."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _slice_kw(obj, b: int, s: slice):
    """Slice the batch dimension of kwargs tensors (ndim >= 2 with leading size b); anything else is kept."""
    if torch.is_tensor(obj):
        return obj[s] if obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, tuple):
        return tuple(_slice_kw(o, b, s) for o in obj)
    if isinstance(obj, list):
        return [_slice_kw(o, b, s) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_kw(v, b, s) for k, v in obj.items()}
    return obj


def _normal(obj):
    """Clone inference-mode tensors (they cannot be saved for backward) inside nested containers."""
    if torch.is_tensor(obj):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_normal(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items()}
    return obj


def _kw(inputs: BlockInputs, index: int, x: torch.Tensor, s: slice) -> dict:
    """kwargs for rows ``s`` of batch ``x``: recorded ones for that batch size, else the batch's kwargs sliced."""
    n = len(range(*s.indices(x.shape[0])))
    if (index, n) in inputs.kwargs:
        return inputs.kwargs[(index, n)]
    return _slice_kw(inputs.kw(index, x), x.shape[0], s)


def split_windows(n: int, cfg) -> tuple[int, int]:
    """(training windows, held-out windows) of ``n`` calibration windows (a block's on this process for TM, the run's
    for slr.distill): ``cfg.heldout`` (None = max(1, n // 8) when n >= 2, else 0) held out, then at most
    ``cfg.max_samples`` (None = all the rest) to train on."""
    h = cfg.heldout if cfg.heldout is not None else (max(1, n // 8) if n >= 2 else 0)
    h = min(h, n)
    train = n - h if cfg.max_samples is None else min(cfg.max_samples, n - h)
    return train, h


def _batches(inputs: BlockInputs, index: int, targets: list[torch.Tensor], ranges, batch_size: int):
    """Per (lo, hi) window range (calibration order): [(x, target, kwargs)] chunks of at most ``batch_size`` windows
    within one of the pipeline's batches; a batch outside every range is not read (it may be on disk)."""
    out: list[list] = [[] for _ in ranges]
    start = 0
    for b, y in enumerate(targets):
        n, x = y.shape[0], None
        for chunks, (lo, hi) in zip(out, ranges):
            a, z = max(lo - start, 0), min(hi - start, n)
            if a >= z:
                continue
            x = inputs.hidden[b] if x is None else x
            for s in range(a, z, batch_size):
                sl = slice(s, min(z, s + batch_size))
                chunks.append((x[sl], y[sl], _kw(inputs, index, x, sl)))
        start += n
    return out


def _steps(chunks, batch_size: int) -> list[list[int]]:
    """Group chunk indices into optimizer steps of at least ``batch_size`` windows (the last may be smaller)."""
    steps, cur, n = [], [], 0
    for i, (x, _, _) in enumerate(chunks):
        cur.append(i)
        n += x.shape[0]
        if n >= batch_size:
            steps.append(cur)
            cur, n = [], 0
    if cur:
        steps.append(cur)
    return steps


def _forward(block, x, kw, dtype):
    if dtype is not None:
        kw = _cast(kw, dtype)
        x = x.to(dtype)
    out = block(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def _eval_loss(block, chunks, dtype) -> float:
    """Mean squared error over the chunks (over every rank's chunks under torch.distributed)."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y, kw in chunks:
            tot += float(((_forward(block, x, kw, dtype).float() - y.float()) ** 2).sum())
            n += y.numel()
    g = distributed.current()
    return g.sum_float(tot) / max(g.sum_float(float(n)), 1.0)


def transformer_match_(block: nn.Module, index: int, inputs: BlockInputs, targets: list[torch.Tensor],
                       cfg: RefineConfig | None = None, device=None, progress: bool = True) -> dict:
    """Fit ``block`` (in place) to ``targets`` on ``inputs.hidden``; returns loss_before/after (MSE), steps, seconds.

    Runs with gradients enabled even when called under torch.no_grad().
    """
    cfg = cfg or RefineConfig()
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        return _match(block, index, inputs, targets, cfg, device, t0, progress)


def _match(block, index, inputs, targets, cfg, device, t0, progress) -> dict:
    params, masks = _trainable(block, cfg)
    dev = next(iter(params)).device if params else torch.device(device or "cpu")
    n = sum(int(y.shape[0]) for y in targets)
    n_train, n_held = split_windows(n, cfg)
    if distributed.current().max_int(int(n > 0 and n_train == 0)):  # every process refuses alike
        raise SLRError(f"--tm-heldout {cfg.heldout} leaves no window for transformer matching to train on (block "
                       f"{index} has {n} calibration windows{' on a process' if distributed.current().active else ''})",
                       "pass a smaller --tm-heldout, more --calib-samples, or --tm-heldout 0")
    parts = _batches(inputs, index, targets, [(0, n_train), (n - n_held, n)], cfg.batch_size)
    chunks, held = [[(_normal(x.to(dev)), _normal(y.to(dev)), _normal(kw)) for x, y, kw in p] for p in parts]
    stats = {"block": index, "loss_before": float("nan"), "loss_after": float("nan"), "steps": 0, "seconds": 0.0,
             "restored": False, "params": sum(p.numel() for p in params), "windows": n_train,
             "heldout_windows": n_held, "heldout_loss_before": None, "heldout_loss_after": None}
    if not params or not chunks or cfg.epochs < 1:
        stats["seconds"] = time.perf_counter() - t0
        return stats
    if any(p.is_inference() for p in block.parameters()):
        raise SLRError("transformer matching cannot train parameters created under torch.inference_mode()",
                       "run compress_ outside inference_mode (torch.no_grad() is fine)")
    orig_dtype = params[0].dtype
    cast = None
    if orig_dtype != torch.float32:
        block.float()
        cast = torch.float32
    every = list(block.parameters())
    flags = [p.requires_grad for p in every]
    train_ids = {id(p) for p in params}
    original = [p.detach().clone() for p in params]
    try:
        for p in every:  # frozen parameters get no gradients at all
            p.requires_grad_(id(p) in train_ids)
        stats.update(_train(block, index, chunks, held, params, masks, cfg, cast, original, progress))
    finally:
        for p, f in zip(every, flags):
            p.requires_grad_(f)
            p.grad = None
        if cast is not None:
            block.to(orig_dtype)
        for mod in block.modules():
            if isinstance(mod, SLRLinear | SharedProjection):
                mod.clear_cache()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _train(block, index, chunks, held, params, masks, cfg, cast, original, progress) -> dict:
    group = distributed.current()
    judge = group.max_int(len(held)) > 0  # held-out windows judge (on every process alike); else the training ones
    steps = _steps(chunks, cfg.batch_size)
    if group.active:  # data-parallel: every rank takes the same number of steps (a rank out of data adds zeros)
        steps += [[] for _ in range(group.max_int(len(steps)) - len(steps))]
    total_steps = max(1, (cfg.epochs - 1) * len(steps))
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.lr * cfg.final_lr_frac)
    n_elem = group.sum_float(float(sum(c[1].numel() for c in chunks)))
    best = (math.inf, None, -1)  # (judged loss, snapshot or None for the live parameters, kept epoch)
    loss_before = math.nan
    history, heldout = [], ([_eval_loss(block, held, cast)] if judge else [])
    done = 0
    bar = tqdm(range(cfg.epochs), desc=f"TM block {index}", leave=False, position=1, disable=not progress)
    for epoch in bar:
        snapshot = [p.detach().clone() for p in params] if epoch > 0 and not judge else None
        tot = 0.0
        for step in steps:
            windows = sum(chunks[i][0].shape[0] for i in step)
            if epoch == 0:
                with torch.no_grad():
                    for i in step:
                        x, y, kw = chunks[i]
                        tot += float(((_forward(block, x, kw, cast).float() - y.float()) ** 2).sum())
                continue
            opt.zero_grad(set_to_none=True)
            for i in step:
                x, y, kw = chunks[i]
                err = (_forward(block, x, kw, cast).float() - y.float()) ** 2
                tot += float(err.detach().sum())
                (err.mean() * (x.shape[0] / windows)).backward()
            if group.active:  # average the gradients over the ranks (zeros from a rank that had no data)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    group.all_reduce_(p.grad).div_(group.world)
            masked_step(opt, sched, masks)
            done += 1
        loss = group.sum_float(tot) / n_elem
        history.append(loss)
        if epoch == 0:
            loss_before = loss
        elif judge:  # the parameters after this epoch's steps, on the held-out windows (exact)
            heldout.append(_eval_loss(block, held, cast))
            if heldout[-1] < best[0]:
                live = epoch == cfg.epochs - 1
                best = (heldout[-1], None if live else [p.detach().clone() for p in params], epoch + 1)
        elif loss < best[0]:
            best = (loss, snapshot, epoch)
        bar.set_postfix(loss=f"{loss:.3e}", ref=f"{loss_before:.3e}", **({"heldout": f"{heldout[-1]:.3e}"}
                                                                           if judge else {}))
    bar.close()
    out = {"steps": done, "epoch_losses": history, "heldout_losses": heldout}
    if judge:
        return out | _judge_heldout(block, chunks, params, masks, cast, original, best, heldout[0], loss_before)
    final = _eval_loss(block, chunks, cast)
    restored, kept_epoch = False, cfg.epochs
    if best[1] is not None and best[0] < final:  # an earlier snapshot looks better (by its epoch-loss estimate)
        last = [p.detach().clone() for p in params]
        load_params(params, best[1], masks)
        alt = _eval_loss(block, chunks, cast)
        if alt < final:
            final, kept_epoch = alt, best[2]
        else:
            load_params(params, last, masks)
    if not final < loss_before:  # TM did not help: restore the original parameters
        load_params(params, original, masks)
        final, restored, kept_epoch = loss_before, True, 0
    return out | {"loss_before": loss_before, "loss_after": final, "restored": restored, "kept_epoch": kept_epoch}


def masked_step(opt, sched, masks: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """One optimizer and scheduler step in which the zeros of in-place pruned weights stay zero: their gradients are
    masked before the step (Adam then never moves them) and the weights re-masked after it."""
    for w, keep in masks:
        if w.grad is not None:
            w.grad.mul_(keep)
    opt.step()
    sched.step()
    with torch.no_grad():
        for w, keep in masks:
            w.mul_(keep)


def _judge_heldout(block, chunks, params, masks, cast, original, best, heldout_before, loss_before) -> dict:
    """Keep the parameters with the lowest held-out loss if it is below the original's, else restore the original."""
    if not best[0] < heldout_before:
        load_params(params, original, masks)
        return {"loss_before": loss_before, "loss_after": loss_before, "restored": True, "kept_epoch": 0,
                "heldout_loss_before": heldout_before, "heldout_loss_after": heldout_before}
    if best[1] is not None:
        load_params(params, best[1], masks)
    return {"loss_before": loss_before, "loss_after": _eval_loss(block, chunks, cast), "restored": False,
            "kept_epoch": best[2], "heldout_loss_before": heldout_before, "heldout_loss_after": best[0]}


def load_params(params, values, masks) -> None:
    """Copy ``values`` into ``params``, then re-mask in-place pruned weights."""
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
        for w, keep in masks:
            w.mul_(keep)


class Refiner:
    """callable(block, index, inputs, targets) that ``compress_`` calls after each block; per-block stats in
    ``.stats``."""

    def __init__(self, cfg: RefineConfig, device=None, progress: bool = True):
        self.cfg = cfg
        self.device = device
        self.progress = progress
        self.stats: list[dict] = []

    def __call__(self, block: nn.Module, index: int, inputs: BlockInputs, targets: list[torch.Tensor]) -> dict:
        s = transformer_match_(block, index, inputs, targets, self.cfg, self.device, self.progress)
        self.stats.append(s)
        return s


def make_refiner(cfg: RefineConfig | None = None, device=None, progress: bool = True) -> Refiner:
    return Refiner(cfg or RefineConfig(), device, progress)


__all__ = ["Refiner", "load_params", "make_refiner", "masked_step", "split_windows", "transformer_match_"]
