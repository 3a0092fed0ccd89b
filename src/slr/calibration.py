"""Calibration capture: the activations entering each decoder block, and the statistics taken from them.

``capture_inputs`` runs the embeddings on the calibration windows and records block 0's inputs plus every block's
keyword arguments (position embeddings, masks); ``block_forward`` runs one block on one batch; ``HessianCollector``
hooks a block's linears and accumulates H = X^T X per input group (or only its diagonal); ``DiskActivations`` keeps
the batches in files instead of memory. ``dense_block_hessians`` and ``input_sq_norms`` take the same statistics of
the dense model for the allocators.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .models.adapters import ArchAdapter, get_adapter
from .plan import key


class _Stop(Exception):
    pass


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


def map_hidden(hidden, fn):
    """fn over every activation batch; a DiskActivations stays on disk (one batch in memory at a time)."""
    if hasattr(hidden, "map"):
        return hidden.map(fn)
    return [fn(h) for h in hidden]


def block_forward(block: nn.Module, inputs: BlockInputs, index: int, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden, **inputs.kw(index, hidden))
    return out[0] if isinstance(out, tuple) else out


class HessianCollector:
    """Pre-hooks that accumulate H = X^T X / n_tokens per input group (fp32 batch products, fp64 sum).

    ``diag``: only diag(X^T X) / n_tokens [d_in] (float64), the mean squared input per column.

    ``stop_early``: once every group's input of the current forward is recorded, the hook raises ``_Stop``, so the
    rest of the block (down_proj's product, the residual add) is not computed; ``forward`` catches it. For H alone
    the block's output is never needed, which saves about a fifth of the calibration forward.
    """

    def __init__(self, linears: dict[str, nn.Linear], groups: list[tuple[str, ...]], stop_early: bool = False,
                 diag: bool = False):
        self.groups = list(groups)
        self.diag = diag
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
            xtx = (x.double() ** 2).sum(0) if self.diag else (x.T @ x).double()
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
        """H (or its diagonal) per group; under torch.distributed the sums and token counts are all-reduced over the
        ranks first."""
        for h in self.hooks:
            h.remove()
        if group is not None and group.active:
            for g in self.groups:  # the same order on every rank
                group.all_reduce_(self.H[g])
                self.n[g] = int(group.sum_float(float(self.n[g])))
        return {g: H / self.n[g] for g, H in self.H.items()}


class DiskActivations:
    """A list of activation batches kept in files (one .pt per batch); iterating loads one batch at a time."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="slr-act-", dir=root))
        self.paths: list[Path] = []
        self.gen = 0

    @classmethod
    def of(cls, batches, root=None) -> DiskActivations:
        out = cls(root)
        out.extend(batches)
        return out

    def extend(self, batches) -> None:
        for b in batches:
            p = self.root / f"g{self.gen}_{len(self.paths):05d}.pt"
            torch.save(b.detach().cpu().clone(), p)  # a view would save its whole storage
            self.paths.append(p)

    def append(self, batch: torch.Tensor) -> None:
        self.extend([batch])

    def map(self, fn) -> DiskActivations:
        """A new generation: fn applied to every batch, written as it goes (then the old files are removed)."""
        old = self.paths
        self.paths = []
        self.gen += 1
        for p in old:
            self.extend([fn(torch.load(p))])
            p.unlink()
        return self

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.load(self.paths[i])

    def __iter__(self):
        for p in self.paths:
            yield torch.load(p)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@torch.no_grad()
def input_sq_norms(model: nn.Module, calib: torch.Tensor | None, device="cpu", max_samples: int | None = 16,
                   batch_size: int = 4) -> dict[str, torch.Tensor] | None:
    """Per-linear mean squared input activation, diag(X^T X) / n_tokens [d_in] (float64, cpu), dense model.

    One forward pass of the dense model over (up to ``max_samples`` of) ``calib`` with a diagonal
    ``HessianCollector`` on every block; None when there is no calibration data.
    """
    if calib is None or len(calib) == 0:
        return None
    ad = get_adapter(model)
    calib = calib[:max_samples] if max_samples else calib
    collectors = []
    for block in ad.blocks(model):
        lin = ad.linears(block)
        collectors.append(HessianCollector(lin, [g for g in ad.groups if all(n in lin for n in g)], diag=True))
    try:
        for s in range(0, len(calib), batch_size):
            model(input_ids=calib[s:s + batch_size].to(device), use_cache=False)
    finally:
        diags = [c.finish() for c in collectors]
    return {key(i, n): d.cpu() for i, per in enumerate(diags) for g, d in per.items() for n in g}


@torch.no_grad()
def dense_block_hessians(model: nn.Module, calib: torch.Tensor, device="cpu", max_samples: int | None = 8,
                         batch_size: int = 4):
    """Yield (block index, {linear name: H [d_in, d_in] float64 cpu}) for every block of the *dense* model.

    Streams like the pipeline: the embeddings run once, then each block runs on the previous block's dense outputs
    with hooks on its input groups, so only one block's Hessians are alive at a time (memory: the block's H plus
    the [n, L, d] activations of ``max_samples`` windows).
    """
    ad = get_adapter(model)
    calib = calib[:max_samples] if max_samples else calib
    inputs = capture_inputs(model, ad, calib, batch_size, device)
    hidden = inputs.hidden
    for i, block in enumerate(ad.blocks(model)):
        lin = ad.linears(block)
        groups = [g for g in ad.groups if all(n in lin for n in g)]
        col = HessianCollector(lin, groups)
        try:
            hidden = [block_forward(block, inputs, i, h) for h in hidden]
        finally:
            Hs = col.finish()
        yield i, {n: Hs[g].cpu() for g in groups for n in g}


