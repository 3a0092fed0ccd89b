"""Shared pieces of the allocators: the matrices, the budget, the mode, activation statistics, exact budget fitting.

Budget (PROTOCOL §5): retained fraction = (kept sparse values + Σ r (m + n)) / Σ m n over the compressed linears.
A shared right factor (group solvers) would be counted once by the pipeline; the allocators price every matrix's
factors separately, so group solvers are refused (see ``alloc_mode``).

Every allocator works on per-matrix choices ``Choice(k_row, rank)``: ``k_row`` = sparse values kept per output row
(unstructured sparsity 1 - k_row / d_in, the same row-wise rounding as ``LayerSpec.kept``), or the fixed N:M count,
or nothing (rank-only methods). ``fit_budget`` then moves single rows (or single rank units) so that the plan lands
on the budget to within one row of the narrowest matrix, never above it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import dense_block_hessians
from ..errors import SLRError
from ..models.adapters import get_adapter
from ..plan import Plan, key
from ..solvers.base import damp_hessian, method
from ..spec import LayerSpec, keep_per_row

if TYPE_CHECKING:
    from ..config import CompressConfig

MODES = ("sparse", "slr", "rank")


@dataclass
class Matrix:
    """One compressed linear: its plan key and a reference to its weight [d_out, d_in]."""

    block: int
    name: str
    weight: torch.Tensor

    @property
    def key(self) -> str:
        return key(self.block, self.name)

    @property
    def d_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def numel(self) -> int:
        return self.d_out * self.d_in

    @property
    def lr_unit(self) -> int:
        """Parameters of one rank unit: r (m + n)."""
        return self.d_out + self.d_in


@dataclass
class Choice:
    """Per-matrix decision: k_row kept values per row (None with N:M or rank-only), rank, and S's bit width (None =
    the run's, ``config.bits``; set by the bits allocator)."""

    k_row: int | None
    rank: int = 0
    bits: int | None = None


def matrices(model: nn.Module) -> list[Matrix]:
    ad = get_adapter(model)
    out = []
    for i, block in enumerate(ad.blocks(model)):
        for n, lin in ad.linears(block).items():
            out.append(Matrix(i, n, lin.weight))
    return out


def alloc_mode(config: CompressConfig, mode: str | None = None) -> str:
    """'sparse' (pure pruning: sparsity only), 'slr' (sparsity and rank) or 'rank' (rank only): the method's kind
    (``slr.solvers.Method``), unless ``mode`` says otherwise."""
    m = method(config.method)
    if m.group:
        raise SLRError(f"global allocation does not support the shared-factor group method {config.method!r}",
                       "use --allocate uniform with joint, or a per-matrix method (lowrank, svd, admm, ...)")
    if mode is not None:
        if mode not in MODES:
            raise SLRError(f"unknown allocation mode {mode!r}", f"choose one of: {', '.join(MODES)}")
        return mode
    return m.kind


def nm_of(config: CompressConfig) -> tuple[int, int] | None:
    return config.layer_spec().nm if config.pattern else None


def uniform_choice(m: Matrix, spec: LayerSpec, mode: str) -> Choice:
    """The choice equivalent to ``spec`` under ``mode`` (rank dropped for pruning, sparse part for rank-only)."""
    rank = 0 if mode == "sparse" else min(spec.rank, m.d_out, m.d_in)
    if mode == "rank":
        return Choice(None, rank)
    if spec.nm is not None:
        return Choice(None, rank)
    return Choice(keep_per_row(m.d_in, spec.sparsity), rank)


def choice_params(m: Matrix, c: Choice, mode: str, nm: tuple[int, int] | None) -> int:
    """Retained parameters of one matrix under a choice."""
    sparse = 0
    if mode != "rank":
        if nm is not None:
            sparse = m.d_out * (m.d_in // nm[1]) * nm[0]
        else:
            sparse = m.d_out * int(c.k_row)
    return sparse + c.rank * m.lr_unit


def resolve_budget(config: CompressConfig, mats: list[Matrix], mode: str) -> float:
    """config.alloc.budget (validated by AllocConfig); when it is None, the retained fraction of the uniform
    config.layer_spec()."""
    if config.alloc.budget is not None:
        return config.alloc.budget
    spec = config.layer_spec()
    nm = nm_of(config)
    total = sum(m.numel for m in mats)
    kept = sum(choice_params(m, uniform_choice(m, spec, mode), mode, nm) for m in mats)
    b = kept / total
    if not (0.0 < b < 1.0):
        raise SLRError(f"the uniform spec {spec.label} retains a fraction {b:.4f}, so there is nothing to allocate",
                       "pass --budget with a retained fraction in (0, 1)")
    return b


def fixed_params(mats: list[Matrix], mode: str, nm: tuple[int, int] | None) -> int:
    """Parameters no allocator can move: the N:M sparse part."""
    if mode == "rank" or nm is None:
        return 0
    return sum(choice_params(m, Choice(None, 0), mode, nm) for m in mats)


def fit_budget(mats: list[Matrix], choices: list[Choice], target: int, mode: str, nm: tuple[int, int] | None,
               min_params: int = 1) -> list[Choice]:
    """Move single units (one row of kept values, or one rank) so the total lands just below ``target``.

    Units are spread round-robin over matrices (largest unit first), so rounding residuals never pile up on one
    matrix; then pair moves (one unit up, a smaller one down) close the gap further. Rows are used for unstructured
    sparse parts; ranks only when there is no free sparse part (N:M or rank-only). A matrix never drops below
    ``min_params`` retained parameters. The total never exceeds ``target``.
    """
    choices = [Choice(c.k_row, c.rank, c.bits) for c in choices]
    use_rows = mode != "rank" and nm is None

    def unit(m: Matrix) -> int:
        return m.d_out if use_rows else m.lr_unit

    def can(i: int, step: int) -> bool:
        m, c = mats[i], choices[i]
        if use_rows:
            k = c.k_row + step
            ok = 0 <= k <= m.d_in
        else:
            k = c.rank + step
            ok = 0 <= k <= min(m.d_out, m.d_in)
        if not ok:
            return False
        return step > 0 or choice_params(m, c, mode, nm) - unit(m) >= min_params

    def move(i: int, step: int) -> None:
        if use_rows:
            choices[i].k_row += step
        else:
            choices[i].rank += step

    order = sorted(range(len(mats)), key=lambda i: -unit(mats[i]))
    total = sum(choice_params(m, c, mode, nm) for m, c in zip(mats, choices))
    for _ in range(100000):
        diff = target - total
        moved = False
        for i in order:
            u = unit(mats[i])
            if diff >= u and can(i, +1):
                move(i, +1)
                diff -= u
                total += u
                moved = True
            elif diff < 0 and can(i, -1):
                move(i, -1)
                diff += u
                total -= u
                moved = True
        if not moved:
            break
    for _ in range(1000):  # pair moves (one unit up, a smaller one down) to get closer than the smallest unit
        diff = target - total
        ups: dict[int, int] = {}
        downs: dict[int, int] = {}
        for i in order:  # one representative matrix per unit size (round-robin order)
            if can(i, +1):
                ups.setdefault(unit(mats[i]), i)
            if can(i, -1):
                downs.setdefault(unit(mats[i]), i)
        best = None
        for ui, i in ups.items():
            for uj, j in downs.items():
                net = ui - uj
                if 0 < net <= diff and (best is None or net > best[0]):
                    best = (net, i, j)
        if best is None:
            break
        move(best[1], +1)
        move(best[2], -1)
        total += best[0]
    if total > target:
        raise SLRError(f"cannot fit the plan into the budget ({total} > {target} parameters)",
                       "raise the budget (fixed N:M parts and minimum ranks cost parameters)")
    return choices


def to_spec(m: Matrix, c: Choice, mode: str, nm: tuple[int, int] | None, base: LayerSpec | None = None) -> LayerSpec:
    """The spec of a choice; the grids (bits, group_size, sym, factor_bits) are ``base``'s (the run's uniform spec),
    with S's bit width the choice's when it sets one."""
    q = {} if base is None else {"bits": base.bits, "group_size": base.group_size, "sym": base.sym,
                                 "factor_bits": base.factor_bits}
    if c.bits is not None:
        q["bits"] = c.bits
    if mode == "rank":
        return LayerSpec(sparsity=1.0, rank=c.rank, **q)
    if nm is not None:
        return LayerSpec(nm=nm, rank=c.rank, **q)
    k = int(c.k_row)
    sparsity = 1.0 - k / m.d_in
    if keep_per_row(m.d_in, sparsity) != k:  # guard the float round trip of the rounding rule
        raise AssertionError(f"sparsity round trip failed for {m.key}: {k} of {m.d_in}")
    return LayerSpec(sparsity=sparsity, rank=c.rank, **q)


def finish(allocator: str, mats: list[Matrix], choices: list[Choice], mode: str, nm: tuple[int, int] | None,
           budget: float | None, t0: float, extra: dict | None = None,
           base: LayerSpec | None = None) -> tuple[Plan, dict]:
    """Plan with an explicit spec for every matrix (on ``base``'s grids, see ``to_spec``), plus the common info dict
    (per matrix: sparsity, rank, and bits when S is quantized)."""
    plan = Plan()
    per = {}
    kept = 0
    for m, c in zip(mats, choices):
        spec = to_spec(m, c, mode, nm, base)
        spec.validate(m.d_out, m.d_in)
        plan.specs[m.key] = spec
        kept += spec.kept(m.d_out, m.d_in) * (mode != "rank") + spec.rank * m.lr_unit
        per[m.key] = {"sparsity": spec.sparsity if spec.nm is None else None, "rank": spec.rank,
                      **({"nm": list(spec.nm)} if spec.nm else {}), **({"bits": spec.bits} if spec.bits else {})}
    total = sum(m.numel for m in mats)
    info = {"allocator": allocator, "budget": budget, "achieved_fraction": kept / total, "retained_params": kept,
            "dense_params": total, "mode": mode, "seconds": time.perf_counter() - t0, "per_matrix": per}
    if extra:
        info.update(extra)
    return plan, info


def plan_fraction(plan: Plan, mats: list[Matrix]) -> float:
    """Retained fraction of a plan over ``mats`` (specs priced per matrix; rank-only specs have sparsity 1)."""
    kept = sum(plan.get(m.block, m.name).kept(m.d_out, m.d_in) + plan.get(m.block, m.name).rank * m.lr_unit
               for m in mats)
    return kept / sum(m.numel for m in mats)


def whitener(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, G^{-1}, 1 / diag(H^{-1})) with G G^T = H for the damped H [d_in, d_in], float32.

    G is the lower Cholesky factor: tr(E H E^T) = ||E G||_F^2, so the SVD of W G gives the metric-optimal low-rank
    truncations exactly as the symmetric root H^{1/2} would (G = H^{1/2} Q for an orthogonal Q), at a fraction of
    the cost (one Cholesky instead of an eigendecomposition: 0.05 s vs 3.1 s for a 1536^2 H on one core).
    """
    Hd = damp_hessian(H, percdamp)  # float64, dead inputs -> 1
    G = torch.linalg.cholesky(Hd)
    Gi = torch.linalg.solve_triangular(G, torch.eye(G.shape[0], dtype=G.dtype), upper=False)
    sal = 1.0 / (Gi * Gi).sum(0)  # diag(H^{-1}) = diag(G^{-T} G^{-1}) = column norms^2 of G^{-1}
    return G.float(), Gi.float(), sal.float()


def whitened_metrics(model: nn.Module, mats: list[Matrix], calib: torch.Tensor, device="cpu",
                     max_samples: int | None = 8):
    """Yield (index into ``mats``, whitener(H)) for every matrix, block by block (one Cholesky per input group)."""
    by_key = {m.key: j for j, m in enumerate(mats)}
    for b, Hs in dense_block_hessians(model, calib, device, max_samples):
        whites: dict[int, tuple] = {}  # the linears of a group share one H object
        for name, H in Hs.items():
            j = by_key.get(key(b, name))
            if j is not None:
                yield j, whites.setdefault(id(H), whitener(H))


def scales(m: Matrix, norms: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """sqrt of the mean squared input per column (float64 [d_in]); None without data. Dead inputs get a tiny scale."""
    if norms is None or m.key not in norms:
        return None
    h = norms[m.key].double().clamp_min(0)
    floor = 1e-8 * float(h.max().clamp_min(1e-300))
    return h.clamp_min(floor).sqrt()


SPAN = 0.1  # the default trust region of knapsack and CAP (see check_span)


def check_span(span, who: str, name: str = "span") -> None:
    """A trust region ``span``: every matrix keeps a retained fraction within budget ± span (span=1 turns it off).

    The per-matrix proxies (whitened tails, Fisher weights) order matrices near the uniform plan, not far from it;
    the g50 runs behind the default of 0.1 are in BENCHMARKS.md ("Global allocation").
    """
    if isinstance(span, bool) or not (isinstance(span, (int, float)) and 0 < span <= 1):
        raise SLRError(f"{who} {name} {span!r} is not in (0, 1]", f"use e.g. --alloc-opt {name}=0.1"
                       + (" (span=1 turns it off)" if name == "span" else ""))


def resolve_normalize(normalize: str | None, data: bool) -> str:
    """The knapsack allocators' ``normalize`` option: None = "fisher" with calibration data, "size" without; one-line
    errors for an unknown name and for "fisher" without data."""
    if normalize is None:
        normalize = "fisher" if data else "size"
    if normalize not in ("fisher", "size", "relative", "absolute"):
        raise SLRError(f"unknown normalize={normalize!r}", "use 'fisher', 'size', 'relative' or 'absolute'")
    if normalize == "fisher" and not data:
        raise SLRError("normalize='fisher' needs calibration data", "use --alloc-opt normalize=size when data-free")
    return normalize


def loss_weight(numel: int, energy: float, sens: float | None, power: float = 1.0) -> float:
    """What one unit of a matrix's *relative* error ||ΔA||^2 / ||A||^2 costs in the allocators' common loss.

    sens None ("size"): m n, scale-free (equal relative errors cost the same per parameter everywhere).
    sens = F̄ ("fisher"): m n (F̄ ||A||^2 / m n)^power; power 1 is the Fisher estimate F̄ ||ΔA||^2 of the loss increase,
    power 0 is "size", and powers in between temper the sensitivity's dynamic range (F̄ spans ~7 decades over
    SmolLM2's blocks, and a first-order estimate overstates how much the early blocks matter at large errors).
    """
    if sens is None:
        return float(numel)
    return float(numel) * (max(energy, 1e-300) * max(sens, 1e-300) / numel) ** power


def output_grad_sq(model: nn.Module, calib: torch.Tensor | None, device="cpu", max_samples: int | None = 8,
                   batch_size: int = 2) -> dict[str, float] | None:
    """Per-linear mean squared per-token loss gradient at its output, mean_i E_t[(dℓ_t/dy_ti)^2] (dense model).

    This is the output-side (diagonal) factor of the Fisher / K-FAC curvature: a weight error ΔW of a linear raises
    the expected next-token loss by about ½ Σ_i F_ii (ΔW H ΔW^T)_ii with H = E[x x^T], so with the rows weighed
    alike ½ F̄ ||ΔW||_H^2, F̄ = mean_i F_ii. F̄ is how strongly an error at that linear's output reaches the loss
    through the rest of the network (its depth and type), which the layer-wise metric ||ΔW||_H^2 alone cannot see.
    One forward + backward over ``max_samples`` windows with activation gradients only (the weights get none).
    None without calibration data.
    """
    if calib is None or len(calib) == 0:
        return None
    ad = get_adapter(model)
    calib = calib[:max_samples] if max_samples else calib
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []

    def out_hook(k):
        def fn(_mod, _args, out):
            if out.requires_grad:
                def grad_fn(g):
                    s = (g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0).cpu()
                    sums[k] = sums[k] + s if k in sums else s
                out.register_hook(grad_fn)
        return fn

    emb = model.get_input_embeddings()
    # the weights need no gradient: the embedding output is made a leaf that requires one, so only activation
    # gradients flow
    hooks.append(emb.register_forward_hook(lambda _m, _a, o: o.detach().requires_grad_(True)))
    for i, block in enumerate(ad.blocks(model)):
        for n, lin in ad.linears(block).items():
            hooks.append(lin.register_forward_hook(out_hook(key(i, n))))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for s in range(0, len(calib), batch_size):
                ids = calib[s:s + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                tgt = ids[:, 1:]
                # per-token losses summed, so each token's gradient is that of its own loss ℓ_t
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                         reduction="sum")
                loss.backward()
                count[0] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return {k: float(v.mean()) / max(count[0], 1) for k, v in sums.items()}
