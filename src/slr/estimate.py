"""Memory estimate of a compression run, printed before it starts; a run that will not fit is refused.

The estimate is the largest of the run's phases, each = a fixed runtime overhead (Python, torch, transformers: ~600
MiB; 410-420 MiB measured after loading SmolLM2) + the weights resident then + that phase's working set:

* capture (in memory, with calibration data): the first calibration batch runs through the whole model, LM head
  included (its kwargs are recorded on a full forward), so the batch's fp32 logits (batch * seqlen * vocab * 4) and
  one forward's workspace are alive. On SmolLM2 at batch 8 that is +990 MiB over the loaded model (logits 768 MiB).
* blocks (the block loop): the compressed blocks (at most the dense size of the linears again) + one block in
  flight: its weights as fp32 copies, one fp64 H per input group (d_in^2 * 8), the calibration activations
  entering and leaving the block (2 * windows * seqlen * d_model * 4), the solver workspace (admm's, the largest:
  ``block_memory_bytes``; it does not depend on the iteration count) and the forward
  workspace of one calibration batch (attention scores and probabilities, batch * heads * seqlen^2 * 4 each, and
  three [batch, seqlen, d_ff] fp32 MLP intermediates).
  With transformer matching (``refine="tm"``) the block also holds its dense targets for every calibration window
  (windows * seqlen * d_model * 4, in memory even with offloaded activations), the autograd graph of one training
  chunk (min(8, batch, tm_samples) windows; ``backward_bytes``) and eight fp32 copies of the block's linears (Adam's
  two moments, the original and snapshot parameters, gradients, the dense weights SLRLinear builds for autograd);
  with ``dense_targets`` > 0, one more copy of the activations (the dense path).
* allocate (``allocate="knapsack"``, ``"cap"`` or ``"search"``, with calibration data): the dense model's Fisher
  pass, a forward and backward of the whole model on 2 windows at a time (``fisher_bytes``: five fp32 copies of the
  logits-sized head tensors plus every block's autograd graph; +2357 MiB on SmolLM2 at seqlen 512), which also
  bounds the whitened statistics' forward on 4 windows. CAP (and search) holds every matrix's candidate pools meanwhile
  (``CAP_POOL_BYTES_PER_PARAM`` per linear parameter: W itself, which also restores the model, and each entry's int16
  rank in its row, plus the directions; counted on SmolLM2 at budget 0.5: 6 bytes for pruning, 8 for S+LR) while its
  loss runs the model on 4 windows (eval-like head) next to the dense log-probabilities of those windows. S solved
  per bit width (knapsack proxy=solved, cap/search pools=solved) adds one uint8 code per weight and width
  (``SOLVED_BYTES_PER_PARAM``). The search on solved levels also keeps the block inputs of a few scored plans
  (``allocate.prefix``): every block's input for each recorded token (``prefix_tokens``).
* distill (``distill=True``, in memory): a frozen dense copy of the model (the teacher) next to the compressed one,
  six fp32 copies of the linears (Adam's two moments, the original and the best parameters, gradients, the dense
  weights SLRLinear builds for autograd), and a forward and backward of the whole model on one window
  (``fisher_bytes``) with the teacher's log-probabilities.
* evaluate (``rebuild``: an in-memory perplexity follows the compression; slr.api passes evaluate or tasks): the
  forward of 4 windows of 512 tokens with three logits-sized fp32 tensors alive (logits, their shifted fp32 copy,
  log-softmax: +1207 MiB on SmolLM2) on top of what the block loop leaves: the source weights are memory-mapped
  from the safetensors file and its pages stay resident while any of its tensors lives (the embeddings), so the
  replaced dense linears still count next to the compressed ones, plus the solvers' cached eigen-decompositions of
  the last block and about one copy of the activations left in the allocator's arenas. Measured: 2797 MiB at 32
  windows (admm 2:4+r32), the run's peak.

With onloading the resident weights are only the non-block ones; there is no full-model capture (the blocks are
stubbed), the compressed blocks are never all resident during the loop, and the final phase either rebuilds every
block for the evaluation (``rebuild``) or streams them from the checkpoints into the save (one rebuilt block + the
packed shard: at most the linears at fp16, or the shard size). Allocators other than uniform need the whole model.
benchmarks/scaling.py uses the same block model to extrapolate to bigger models.
"""

from __future__ import annotations

import os

from torch import nn

from .errors import SLRError
from .models.adapters import get_adapter

RUNTIME_MIB = 600
CAP_POOL_BYTES_PER_PARAM = 8  # CAP's candidate pools per linear parameter (see the module docstring)
SOLVED_BYTES_PER_PARAM = 4  # S solved at each of the 4 bit widths, uint8 codes
EVAL_BATCH, EVAL_SEQLEN = 4, 512  # slr.api's perplexity
FISHER_BATCH = 2  # allocate.base.output_grad_sq: windows per forward + backward
ALLOC_BATCH = 4  # allocate.base.dense_block_hessians / CAP's loss: windows per forward
TM_BATCH = 8  # refine.TMConfig.batch_size
TM_STATE_COPIES = 8  # fp32 copies of the block's linears while TM trains it
DISTILL_STATE_COPIES = 6  # fp32 copies of the linears while slr.distill trains the model


def block_memory_bytes(linears: list[tuple[int, int]], group_din: list[int], d_model: int, tokens: int) -> dict:
    """Bytes of one block in flight; ``linears`` = [(d_out, d_in)], ``group_din`` = d_in of each input group."""
    big = max(m * n for m, n in linears)
    n_max = max(n for _, n in linears)
    return {
        "block weights (fp32)": sum(m * n for m, n in linears) * 4,
        "H per group (fp64)": sum(8 * n * n for n in group_din),
        "calibration activations in + out (fp32)": 2 * tokens * d_model * 4,
        # admm, the largest: its eigen-caches (fp64 Ĥ, Q and four fp32 roots per group, 32 d_in^2), the eigh of the
        # widest group (~5 fp64 [d_in, d_in]), the block's results (fp32 S + bool mask) and ~10 fp64 [m, n]
        # temporaries of the largest linear; 290 MiB on a SmolLM2 block (measured rise of the solve: 269-289 MiB,
        # the same at 5 and 130 iterations)
        "solver workspace (admm)": 32 * sum(n * n for n in group_din) + 5 * 8 * n_max * n_max
        + 5 * sum(m * n for m, n in linears) + 10 * 8 * big,
    }


def forward_workspace_bytes(batch: int, seqlen: int, heads: int, d_ff: int) -> int:
    """Transient memory of one block forward on a calibration batch (attention scores, gated MLP), fp32."""
    return 2 * batch * heads * seqlen * seqlen * 4 + 3 * batch * seqlen * d_ff * 4


def backward_bytes(tokens: int, d_model: int, d_ff: int) -> int:
    """Autograd graph of one block's forward + backward over ``tokens`` tokens, fp32.

    (12 d_model + 4 d_ff) * 4 bytes a token: 52 KB on SmolLM2, where the Fisher pass measured 44.6-47.7 KiB a token
    and block (the difference between 1, 15 and 30 blocks)."""
    return tokens * (12 * d_model + 4 * d_ff) * 4


def head_bytes(tokens: int, vocab: int, copies: float) -> int:
    """``copies`` fp32 [tokens, vocab] tensors of the LM head (logits, their fp32 copy, log-softmax, gradients)."""
    return int(copies * tokens * vocab * 4)


def fisher_bytes(seqlen: int, vocab: int, d_model: int, d_ff: int, n_blocks: int, windows: int = FISHER_BATCH) -> int:
    """Forward + backward of the whole model on ``windows`` windows (allocate.base.output_grad_sq).

    Measured on SmolLM2 (2 windows of 512, vocab 49152): +1016 MiB with 1 block, +1641 with 15, +2357 with 30, i.e.
    ~5.2 logits-sized fp32 tensors for the head plus every block's graph (``backward_bytes``); modelled with 5.5."""
    tokens = windows * seqlen
    return head_bytes(tokens, vocab, 5.5) + n_blocks * backward_bytes(tokens, d_model, d_ff)


def estimate_run(model: nn.Module, windows: int, seqlen: int, *, onload: bool = False,
                 offload_activations: bool = False, batch_size: int = 8, rebuild: bool = True,
                 max_shard_bytes: int = 4 << 30, allocate: str = "uniform", refine: str | None = None,
                 tm_samples: int | None = None, tm_dense_targets: bool = False, distill: bool = False,
                 solved: bool = False, prefix_tokens: int = 0) -> dict:
    """{"model", "block", "compressed", "runtime", "phases", "total", ...} in bytes for compressing ``model``.

    ``total`` is the largest of ``phases`` (capture, blocks, allocate, evaluate / final; see the module docstring).
    ``onload``: only the non-block parameters and one block's fp32 weights are resident (slr.onload).
    ``rebuild``: an in-memory evaluation follows (with onloading: every compressed block is rebuilt for it; without
    it the save streams them). ``offload_activations``: two batches of activations in memory instead of all windows.
    ``allocate``: "knapsack", "cap" and "search" add their allocation phase (with calibration data; CAP and search
    also without).
    ``refine="tm"``: transformer matching's targets, autograd graph and optimizer state join the block loop;
    ``tm_samples``: the windows it trains on (None = all; only the chunk size depends on it, the targets are kept
    for every window); ``tm_dense_targets``: TM's dense path, a second copy of every window's activations.
    ``distill``: slr.distill's phase (the teacher, optimizer state, one window's backward).
    ``solved``: the allocator keeps S solved at every bit width (allocator option proxy=solved or pools=solved).
    ``prefix_tokens``: the search's recorded block inputs (``allocate.search.recorded_tokens``), every block's input
    [d_model] fp32 for each of those tokens, held through the allocation.
    """
    ad = get_adapter(model)
    blocks = ad.blocks(model)
    block = blocks[0]
    lin = ad.linears(block)
    shapes = [(int(m.weight.shape[0]), int(m.weight.shape[1])) for m in lin.values()]
    gdin = [int(lin[g[0]].weight.shape[1]) for g in ad.groups if all(n in lin for n in g)]
    d_model = int(model.get_input_embeddings().weight.shape[1])
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int((out_emb if out_emb is not None else model.get_input_embeddings()).weight.shape[0])
    d_ff = max(max(m, n) for m, n in shapes)
    data = windows > 0
    batch = max(min(windows, batch_size), 1)
    tokens = batch * seqlen if offload_activations else windows * seqlen
    parts = block_memory_bytes(shapes, gdin, d_model, tokens)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(getattr(cfg, "num_attention_heads", 0) or max(d_model // 64, 1))
    parts["forward workspace (one batch)"] = forward_workspace_bytes(batch, seqlen, heads, d_ff)
    block_lin_b = sum(m * n for m, n in shapes) * 4
    if refine == "tm" and data:
        chunk = max(min(TM_BATCH, batch, tm_samples or windows, windows), 1)
        parts["TM targets (every window, fp32)"] = windows * seqlen * d_model * 4
        if tm_dense_targets:
            parts["TM dense path (every window, fp32)"] = windows * seqlen * d_model * 4
        parts["TM autograd graph (one chunk)"] = backward_bytes(chunk * seqlen, d_model, d_ff)
        parts["TM optimizer state and copies"] = TM_STATE_COPIES * block_lin_b
    model_b = sum(p.numel() * p.element_size() for p in model.parameters())
    linear_n = sum(m.weight.numel() for b in blocks for m in ad.linears(b).values())
    linear_b = sum(m.weight.numel() * m.weight.element_size() for b in blocks for m in ad.linears(b).values())
    runtime = RUNTIME_MIB * 2**20
    eval_ws = head_bytes(EVAL_BATCH * EVAL_SEQLEN, vocab, 3) + forward_workspace_bytes(EVAL_BATCH, EVAL_SEQLEN,
                                                                                    heads, d_ff)
    # what the block loop leaves behind: the solvers' eigen-caches of the last block (slr.solvers.lowrank.cached)
    # and about one copy of the activations in the allocator's arenas
    leftover = 32 * sum(n * n for n in gdin) + tokens * d_model * 4
    phases: dict[str, int] = {}
    if onload:
        blocks_b = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
        rest = model_b - blocks_b  # embeddings, final norm, untied head
        # solving: the rest + one block in flight (its weights are in parts); then either every compressed block
        # rebuilt in memory (bounded by the dense linears) and evaluated, or the streamed save (one block + the
        # packed shard)
        block_b = linear_b // len(blocks)
        final = linear_b if rebuild else block_b + min(max_shard_bytes, linear_b // 2)
        out = {"model": rest, "block": sum(parts.values()), "compressed": 0, "runtime": runtime}
        phases["blocks"] = rest + runtime + out["block"]
        phases["final"] = rest + runtime + final + (leftover + eval_ws if rebuild else 0)
        out["rebuilt"] = final
        out["streamed"] = not rebuild
    else:
        out = {"model": model_b, "block": sum(parts.values()), "compressed": linear_b, "runtime": runtime}
        phases["blocks"] = model_b + runtime + linear_b + out["block"]
        if data:  # the first batch's full forward, LM head included
            phases["capture"] = model_b + runtime + head_bytes(batch * seqlen, vocab, 1) + parts[
                "forward workspace (one batch)"]
        if rebuild:  # the source file's pages stay mapped (see the module docstring): dense + compressed linears
            phases["evaluate"] = model_b + runtime + linear_b + leftover + eval_ws
    n_blocks = len(blocks)
    fisher = 0
    if allocate in ("knapsack", "cap", "search") and data:
        a_batch = min(ALLOC_BATCH, windows)
        stats = head_bytes(a_batch * seqlen, vocab, 1) + forward_workspace_bytes(a_batch, seqlen, heads, d_ff)
        fisher = max(fisher_bytes(seqlen, vocab, d_model, d_ff, n_blocks, min(FISHER_BATCH, windows)), stats)
        out["allocate"] = fisher
    if allocate in ("cap", "search"):
        pools = (CAP_POOL_BYTES_PER_PARAM + (SOLVED_BYTES_PER_PARAM if solved else 0)) * linear_n
        # a forward on 4 windows and the cached dense log-probabilities of CAP's KL
        loss = head_bytes(min(ALLOC_BATCH, windows) * seqlen, vocab, 4) if data else 0
        out["pools"] = pools
        out["allocate"] = pools + max(fisher, loss)
        if allocate == "search" and data and prefix_tokens:
            out["prefix records"] = prefix_tokens * d_model * n_blocks * 4
            out["allocate"] += out["prefix records"]
    if "allocate" in out:
        phases["allocate"] = model_b + runtime + out["allocate"]
    if distill and data and not onload:
        phases["distill"] = (2 * model_b + runtime + DISTILL_STATE_COPIES * linear_b
                             + fisher_bytes(seqlen, vocab, d_model, d_ff, n_blocks, 1) + head_bytes(seqlen, vocab, 2))
    out["phases"] = phases
    out["total"] = max(phases.values())
    out["block_parts"] = parts
    return out


def available_bytes() -> int | None:
    """MemAvailable (Linux), or $SLR_MEMORY_LIMIT_MIB when set (lets tests and shared hosts set a ceiling)."""
    env = os.environ.get("SLR_MEMORY_LIMIT_MIB")
    if env:
        return int(float(env) * 2**20)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(est: dict) -> None:
    avail = available_bytes()
    if avail is not None and est["total"] > avail:
        raise SLRError(f"this run needs about {est['total'] / 2**30:.1f} GiB of memory but only "
                       f"{avail / 2**30:.1f} GiB is available",
                       "use fewer --calib-samples, a machine with more memory, or torchrun on more hosts")


_PHASE_NAMES = {"capture": "the first calibration forward", "blocks": "the block loop",
                "allocate": "the allocation", "distill": "the distillation", "evaluate": "the evaluation",
                "final": "the final phase"}


def describe(est: dict) -> str:
    g = 2**20
    phase = max(est["phases"], key=est["phases"].get)
    others = ", ".join(f"{k} {v / g:,.0f}" for k, v in est["phases"].items() if k != phase)
    tail = f"; peak in {_PHASE_NAMES[phase]}" + (f"; other phases: {others}" if others else "") + ")"
    if "rebuilt" in est:
        final = "streamed save <=" if est.get("streamed") else "rebuilt compressed layers <="
        return (f"estimated peak memory {est['total'] / g:,.0f} MiB with onloading (non-block weights "
                f"{est['model'] / g:,.0f} + max(one block in flight {est['block'] / g:,.0f}, {final} "
                f"{est['rebuilt'] / g:,.0f}) + runtime {est['runtime'] / g:,.0f}" + tail)
    if "pools" in est:
        rec = est.get("prefix records", 0)
        recs = f" + recorded block inputs {rec / g:,.0f}" if rec else ""
        return (f"estimated peak memory {est['total'] / g:,.0f} MiB (the larger of the CAP pools' phase, pools "
                f"{est['pools'] / g:,.0f} + Fisher pass / loss {(est['allocate'] - est['pools'] - rec) / g:,.0f}"
                f"{recs} + model "
                f"{est['model'] / g:,.0f}, and the block loop, one block in flight {est['block'] / g:,.0f} + "
                f"compressed layers <= {est['compressed'] / g:,.0f}; runtime {est['runtime'] / g:,.0f}" + tail)
    return (f"estimated peak memory {est['total'] / g:,.0f} MiB (model {est['model'] / g:,.0f} + one block in flight "
            f"{est['block'] / g:,.0f} + compressed layers <= {est['compressed'] / g:,.0f} + runtime "
            f"{est['runtime'] / g:,.0f}" + tail)
