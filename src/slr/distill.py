"""Logit distillation after compression (methods.md §7.4): fit the whole compressed model to the dense model's
next-token distributions on the calibration windows.

Loss: mean over predicted positions of KL(p_dense || p_compressed) of the next-token distributions, at temperature 1.
The teacher is a frozen copy of the model taken before compression (``compress_`` makes it). Trained: what
transformer matching trains in every block (``refine._trainable``: SLRLinear ``values`` / ``U`` / ``V`` on their
fixed support, shared ``V``, biases, norms and plain linears, whose zeros are kept by masking their gradients and
re-masking after every step), and with ``train_scales`` the fp16 group scales of every quantized part (codes fixed;
``qlinear.trainable_scales_``; rounded back to fp16 at the end); embeddings, the head and the final norm stay as
they are.

Windows: the last ``heldout`` of the n calibration windows (None = max(1, n // 8)) are never trained on; the first
min(max_samples, n - heldout) are. Schedule: Adam at ``lr``, cosine to lr * final_lr_frac over all steps,
``batch_size`` windows a step (gradients accumulated one window at a time), ``epochs`` passes. The held-out KL is
measured before training and after every epoch; the parameters with the lowest held-out KL are kept when it is below
the start's, else the original parameters are restored bit for bit. Stats: ``kl_before`` / ``kl_after`` (held-out),
``epoch_kl`` (training windows, as they were trained on), ``heldout_kl`` (start, then per epoch), ``kept_epoch``
(0 = the original), ``restored``, ``steps``, ``seconds``, ``windows``, ``heldout_windows``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import DistillConfig
from .errors import SLRError
from .kl import kl, next_logits
from .refine import _trainable, load_params, masked_step, split_windows


def _heldout_kl(model, teacher, windows: list[torch.Tensor]) -> float:
    if not windows:
        return math.nan
    with torch.no_grad():
        kls = [float(kl(next_logits(model, w), F.log_softmax(next_logits(teacher, w), -1))) for w in windows]
    return sum(kls) / len(kls)


def _blocks_params(blocks, cfg) -> tuple[list[nn.Parameter], list[tuple[nn.Parameter, torch.Tensor]], list]:
    """(parameters to train, [(plain Linear weight, keep mask)], the quantized modules whose scales train)."""
    params, masks, seen = [], [], set()
    for block in blocks:
        p, m = _trainable(block, cfg)
        params += [q for q in p if id(q) not in seen and not seen.add(id(q))]
        masks += m
    quantized = [m for b in blocks for m in b.modules() if getattr(m, "qspecs", None)] \
        if cfg.train_scales else []
    params += [p for m in quantized for p in m.trainable_scales_()]
    return params, masks, quantized


def distill_(model: nn.Module, teacher: nn.Module, calib: torch.Tensor, blocks, cfg: DistillConfig | None = None,
             progress: bool = True) -> dict:
    """Train ``blocks`` (the compressed model's decoder blocks, in place) so that ``model``'s next-token
    distributions match ``teacher``'s on ``calib`` ([n, seqlen] token windows); returns the stats above."""
    cfg = cfg or DistillConfig()
    t0 = time.perf_counter()
    n_train, n_held = split_windows(len(calib), cfg)
    if n_train < 1:
        raise SLRError(f"--kd-heldout {cfg.heldout} leaves none of the {len(calib)} calibration windows to distill "
                       "on", "pass a smaller --kd-heldout or more --calib-samples")
    train = [calib[i:i + 1] for i in range(n_train)]
    held = [calib[i:i + 1] for i in range(len(calib) - n_held, len(calib))]
    with torch.inference_mode(False), torch.enable_grad():
        params, masks, quantized = _blocks_params(blocks, cfg)
        try:
            if not params or cfg.epochs < 1:
                return {"steps": 0, "seconds": time.perf_counter() - t0, "windows": n_train,
                        "heldout_windows": n_held}
            if any(p.is_inference() for p in params):
                raise SLRError("distillation cannot train parameters created under torch.inference_mode()",
                               "run compress_ outside inference_mode (torch.no_grad() is fine)")
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            every = list(model.parameters())
            flags = [p.requires_grad for p in every]
            ids = {id(p) for p in params}
            try:
                for p in every:
                    p.requires_grad_(id(p) in ids)
                stats = _train(model, teacher, train, held, params, masks, cfg, progress)
            finally:
                for p, f in zip(every, flags):
                    p.requires_grad_(f)
                    p.grad = None
        finally:
            for m in quantized:  # the kept scales, rounded to fp16, back into the codes' scale buffers
                m.store_scales_()
    return stats | {"seconds": time.perf_counter() - t0, "windows": n_train, "heldout_windows": n_held,
                    "params": sum(p.numel() for p in params)}


def _train(model, teacher, train, held, params, masks, cfg, progress) -> dict:
    steps = [train[i:i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(steps)),
                                                       eta_min=cfg.lr * cfg.final_lr_frac)
    original = [p.detach().clone() for p in params]
    heldout = [_heldout_kl(model, teacher, held)]
    best = (heldout[0], None, 0)  # (held-out KL, parameters or None for the original, epoch)
    epoch_kl, done = [], 0
    bar = tqdm(total=cfg.epochs * len(steps), desc="distill", disable=not progress)
    for epoch in range(1, cfg.epochs + 1):
        tot = 0.0
        for step in steps:
            opt.zero_grad(set_to_none=True)
            for w in step:
                with torch.no_grad():
                    t_logp = F.log_softmax(next_logits(teacher, w), -1)
                loss = kl(next_logits(model, w), t_logp)
                (loss / len(step)).backward()
                tot += float(loss.detach())
            masked_step(opt, sched, masks)
            done += 1
            bar.update(1)
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}", heldout=f"{heldout[-1]:.4f}")
        epoch_kl.append(tot / len(train))
        heldout.append(_heldout_kl(model, teacher, held))
        if not held or heldout[-1] < best[0]:
            best = (heldout[-1], [p.detach().clone() for p in params], epoch)
    bar.close()
    restored = best[1] is None
    load_params(params, original if restored else best[1], masks)
    return {"steps": done, "epoch_kl": epoch_kl, "heldout_kl": heldout, "kl_before": heldout[0],
            "kl_after": best[0], "kept_epoch": best[2], "restored": restored}


__all__ = ["distill_"]
