"""A forward that resumes at the first decoder block a plan changes (the search's fitness; ``levels.Fitness``).

A search offspring differs from its parent in a few matrices, so every block before the first of them sees the inputs
it saw when the parent was scored. ``Prefixes`` keeps the block inputs of a few scored plans (the pinned anchor, which
is the search's parent, and the most recent ones) and runs a new plan from the latest block where it still agrees with
one of them: the blocks before it are passed through, and that block is fed the recorded input. The result equals a
full forward bit for bit (the same kernels on the same inputs), and costs the blocks after the first change plus the
head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kl import next_logits
from ..models.adapters import get_adapter


def _hidden(args: tuple, kw: dict) -> torch.Tensor:
    return args[0] if args else kw["hidden_states"]


def _passthrough(*args, **kw):
    return _hidden(args, kw)


@torch.no_grad()
def logits_from(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, start: int,
                inputs: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``next_logits`` of ``ids`` [b, T] with blocks ``start``.. run on ``inputs[start]`` (the recorded input of
    block ``start``; the blocks before it are skipped), and every block's input [b, T, d] as this forward saw it."""
    seen: list[torch.Tensor] = list(inputs[:start]) if start else []

    def feed(_mod, args, kw):  # block ``start`` gets its recorded input instead of the skipped blocks' output
        h = inputs[start]
        return ((h, *args[1:]), kw) if args else (args, {**kw, "hidden_states": h})

    def record(_mod, args, kw):
        seen.append(_hidden(args, kw).detach())

    hooks = [blocks[start].register_forward_pre_hook(feed, with_kwargs=True)] if start else []  # before ``record``
    hooks += [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks[start:]]
    for b in blocks[:start]:
        b.forward = _passthrough
    try:
        out = next_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
        for b in blocks[:start]:
            del b.forward  # back to the class's forward
    return out, seen


class Prefixes:
    """Block inputs of scored plans, per batch: the ``anchor`` (pinned) and the ``keep`` most recent plans.

    A plan is described by its signature: per block, the levels of that block's matrices."""

    def __init__(self, model: nn.Module, block_of: list[int], keep: int):
        self.model, self.blocks, self.keep = model, get_adapter(model).blocks(model), keep
        self.block_of = block_of  # [n_mats] block index of each matrix
        self.records: dict[tuple, list[list[torch.Tensor]]] = {}  # signature -> [batch][block] inputs
        self.anchor: tuple | None = None
        self.skipped = self.run = 0  # blocks skipped / run, over all forwards

    def signature(self, plan: list[tuple]) -> tuple:
        sig: list[list] = [[] for _ in self.blocks]
        for b, t in zip(self.block_of, plan):
            sig[b].append(tuple(t))
        return tuple(tuple(s) for s in sig)

    def nearest(self, sig: tuple) -> tuple[int, tuple | None]:
        """(first block where ``sig`` differs from the closest record, that record's signature)."""
        best, ref = 0, None
        for r in self.records:
            first = next((i for i, (a, b) in enumerate(zip(sig, r)) if a != b), len(sig))
            if first > best:
                best, ref = first, r
        return min(best, len(self.blocks) - 1), ref  # a plan already recorded still runs its last block

    def forward(self, plan: list[tuple], batches: list[torch.Tensor], score, pin: bool = False) -> list[float]:
        """``score(b, logits)`` of each batch b of ids under ``plan`` (already in the model's weights; one batch's
        logits alive at a time); the plan is recorded (and pinned as the anchor with ``pin``)."""
        sig = self.signature(plan)
        start, ref = self.nearest(sig)
        outs, rec = [], []
        for b, ids in enumerate(batches):
            out, seen = logits_from(self.model, self.blocks, ids, start, self.records[ref][b] if ref else None)
            outs.append(score(b, out))
            rec.append(seen)
            del out
        self.skipped += start * len(batches)
        self.run += (len(self.blocks) - start) * len(batches)
        self.records.pop(sig, None)
        self.records[sig] = rec  # the newest last
        if pin:
            self.anchor = sig
        recent = [r for r in self.records if r != self.anchor]
        for r in recent[:max(len(recent) - self.keep, 0)]:
            del self.records[r]
        return outs

    def pin(self, plan: list[tuple]) -> bool:
        """Keep ``plan``'s record from now on (the previous anchor becomes an ordinary record). False when it has
        none: score it first."""
        sig = self.signature(plan)
        if sig not in self.records:
            return False
        self.anchor = sig
        return True
