"""Memory estimate of a compression run, printed before it starts; a run that will not fit is refused.

Peak = the model in memory (its parameters at their dtype) + one block in flight:
  block weights as fp32 copies for the solver, one fp64 H per input group (d_in^2 * 8), the calibration activations
  entering and leaving the block (2 * windows * seqlen * d_model * 4), the solver workspace (about eight fp32
  [d_out, d_in] buffers of the largest linear plus three fp64 [d_in, d_in] eigen-matrices) and the forward
  workspace of one calibration batch (eager attention scores and probabilities, batch * heads * seqlen^2 * 4 each,
  and three [batch, seqlen, d_ff] fp32 MLP intermediates)
+ the compressed blocks' sparse and low-rank factors (at most the dense size of the linears again)
+ a fixed runtime overhead (Python, torch, transformers: ~600 MiB measured on an idle import).
CAP allocation (``allocate="cap"``) runs before the block loop and holds every matrix's candidate pools (fp32
residual values, int32 indices, the directions' factors: ~10 B per linear parameter) and a copy of the original
weights (4 B), plus per-matrix SVD and sort buffers that the process does not hand back. The term is 40 B per linear
parameter: on SmolLM2 at g50 (106 M linear parameters, admm, whitened pools) the run's peak RSS was 4812 MiB, in the
CAP phase, 3699 MiB above the model and the runtime, i.e. 37 B per parameter. The peak is the larger of that phase
and the block loop. The other allocators hold one block's statistics at a time.
With onloading the model term is only the non-block weights, and the compressed blocks are never all resident: the
save streams them from the checkpoints, so its phase holds one rebuilt block plus the packed shard being written
(at most the linears at fp16, or the shard size).
benchmarks/scaling.py uses the same block model to extrapolate to bigger models.
"""

from __future__ import annotations

import os

from torch import nn

from .errors import SLRError
from .models.adapters import get_adapter

RUNTIME_MIB = 600
CAP_BYTES_PER_PARAM = 40  # CAP's pools phase per linear parameter (see the module docstring)


def block_memory_bytes(linears: list[tuple[int, int]], group_din: list[int], d_model: int, tokens: int) -> dict:
    """Bytes of one block in flight; ``linears`` = [(d_out, d_in)], ``group_din`` = d_in of each input group."""
    big = max(m * n for m, n in linears)
    n_max = max(n for _, n in linears)
    return {
        "block weights (fp32)": sum(m * n for m, n in linears) * 4,
        "H per group (fp64)": sum(8 * n * n for n in group_din),
        "calibration activations in + out (fp32)": 2 * tokens * d_model * 4,
        "solver workspace (~8 [m, n] fp32 + eig fp64)": 8 * big * 4 + 3 * 8 * n_max * n_max,
    }


def forward_workspace_bytes(batch: int, seqlen: int, heads: int, d_ff: int) -> int:
    """Transient memory of one block forward on a calibration batch (eager attention, gated MLP), fp32."""
    return 2 * batch * heads * seqlen * seqlen * 4 + 3 * batch * seqlen * d_ff * 4


def estimate_run(model: nn.Module, windows: int, seqlen: int, *, onload: bool = False,
                 offload_activations: bool = False, batch_size: int = 8, rebuild: bool = True,
                 max_shard_bytes: int = 4 << 30, allocate: str = "uniform") -> dict:
    """{"model", "block", "compressed", "runtime", "total"} in bytes for compressing ``model``.

    ``onload``: only the non-block parameters and one block's fp32 weights are resident (slr.onload); the peak is
    the larger of the block loop and the final phase. ``rebuild`` (onloading followed by an in-memory evaluation):
    the final phase holds every compressed block; otherwise the save streams them (one block + the packed shard).
    ``offload_activations``: two batches of activations in memory instead of all windows.
    """
    ad = get_adapter(model)
    block = ad.blocks(model)[0]
    lin = ad.linears(block)
    shapes = [(int(m.weight.shape[0]), int(m.weight.shape[1])) for m in lin.values()]
    gdin = [int(lin[g[0]].weight.shape[1]) for g in ad.groups if all(n in lin for n in g)]
    d_model = int(model.get_input_embeddings().weight.shape[1])
    tokens = min(windows, batch_size) * seqlen if offload_activations else windows * seqlen
    parts = block_memory_bytes(shapes, gdin, d_model, tokens)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(getattr(cfg, "num_attention_heads", 0) or max(d_model // 64, 1))
    parts["forward workspace (one batch)"] = forward_workspace_bytes(min(windows, batch_size), seqlen, heads,
                                                                    max(m for m, _ in shapes))
    model_b = sum(p.numel() * p.element_size() for p in model.parameters())
    linear_b = sum(m.weight.numel() * m.weight.element_size() for b in ad.blocks(model) for m in ad.linears(b).values())
    if onload:
        blocks_b = sum(p.numel() * p.element_size() for b in ad.blocks(model) for p in b.parameters())
        rest = model_b - blocks_b  # embeddings, final norm, untied head
        # solving: the rest + one block in flight (its weights are in parts); then either every compressed block
        # rebuilt in memory (bounded by the dense linears) or the streamed save (one block + the packed shard)
        block_b = linear_b // len(ad.blocks(model))
        final = linear_b if rebuild else block_b + min(max_shard_bytes, linear_b // 2)
        out = {"model": rest, "block": sum(parts.values()), "compressed": 0, "runtime": RUNTIME_MIB * 2**20}
        out["total"] = rest + max(out["block"], final) + out["runtime"]
        out["rebuilt"] = final
        out["streamed"] = not rebuild
    else:
        out = {"model": model_b, "block": sum(parts.values()), "compressed": linear_b, "runtime": RUNTIME_MIB * 2**20}
        out["total"] = sum(out.values())
    if allocate == "cap":  # the pools' phase: whole model + pools + original weights + one calibration forward
        linear_n = sum(m.weight.numel() for b in ad.blocks(model) for m in ad.linears(b).values())
        out["allocate"] = CAP_BYTES_PER_PARAM * linear_n
        out["total"] = max(out["total"], model_b + out["allocate"] + parts["forward workspace (one batch)"]
                           + out["runtime"])
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


def describe(est: dict) -> str:
    g = 2**20
    if "rebuilt" in est:
        final = "streamed save <=" if est.get("streamed") else "rebuilt compressed layers <="
        return (f"estimated peak memory {est['total'] / g:,.0f} MiB with onloading (non-block weights "
                f"{est['model'] / g:,.0f} + max(one block in flight {est['block'] / g:,.0f}, {final} "
                f"{est['rebuilt'] / g:,.0f}) + runtime {est['runtime'] / g:,.0f})")
    if "allocate" in est:
        return (f"estimated peak memory {est['total'] / g:,.0f} MiB (the larger of the CAP pools' phase, pools "
                f"{est['allocate'] / g:,.0f} + model {est['model'] / g:,.0f}, and the block loop, one block in flight "
                f"{est['block'] / g:,.0f} + compressed layers <= {est['compressed'] / g:,.0f}; runtime "
                f"{est['runtime'] / g:,.0f})")
    return (f"estimated peak memory {est['total'] / g:,.0f} MiB (model {est['model'] / g:,.0f} + one block in flight "
            f"{est['block'] / g:,.0f} + compressed layers <= {est['compressed'] / g:,.0f} + runtime "
            f"{est['runtime'] / g:,.0f})")
