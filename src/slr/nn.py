"""SLRLinear (y = x (S + U V)^T + b) and SharedProjection (one V for a group of linears reading one input).

The sparse part S is stored as CSR: ``values`` (nn.Parameter [nnz], row-major support order) plus the
index buffers ``crow`` (int64 [d_out+1]) and ``col`` (int16 when d_in <= 32768, else int32 [nnz]).
Training ``values`` can never change the support.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SLRError
from .kernels import int4_s
from .models.adapters import set_module
from .qlinear import QuantizedLinearMixin, QuantizedSharedMixin
from .solvers.base import SolveResult

STRATEGIES = ("auto", "dense-cached", "dense-onthefly", "sparse")

# "auto" uses the CSR kernel up to this many tokens per call and scatter + dense GEMM above it
# (crossover measured on CPU, 1 thread, 1536x576 2:4+r32 and 50% unstructured; see SLRLinear).
AUTO_SPARSE_MAX_TOKENS = 64
_CSR_DTYPES = (torch.float32, torch.float64)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def detect_nm(mask: torch.Tensor, candidates=(2, 4, 8, 16)) -> tuple[int, int] | None:
    """Smallest (N, M) such that every group of M consecutive inputs keeps exactly N (0 < N < M)."""
    d_out, d_in = mask.shape
    for m in candidates:
        if d_in % m:
            continue
        counts = mask.reshape(d_out, d_in // m, m).sum(-1)  # [d_out, G]
        n = int(counts.flatten()[0]) if counts.numel() else 0
        if 0 < n < m and bool((counts == n).all()):
            return n, m
    return None


def nm_matches(mask: torch.Tensor, nm: tuple[int, int]) -> bool:
    n, m = nm
    d_out, d_in = mask.shape
    return d_in % m == 0 and bool((mask.reshape(d_out, d_in // m, m).sum(-1) == n).all())


class SharedProjection(nn.Module):
    """Right factor V [r, d_in] shared by the linears of one group; z = x V^T is computed once per input.

    Cache rule: an entry holds a weak reference to x and is reused only for the *same* tensor object with
    unchanged version counters of x and V, the same grad mode, and by a consumer that has not used it yet.
    Once every registered consumer has used it, it is dropped (so a later forward -- or a repeated call by
    the same consumer -- recomputes). This is what q/k/v (or gate/up) do in one block forward.
    """

    def __init__(self, V: torch.Tensor):
        super().__init__()
        self.V = nn.Parameter(V.detach().clone())  # [r, d_in]
        self.n_consumers = 0
        self.n_computed = 0  # how many times x V^T was actually evaluated (diagnostics / tests)
        self._cache = None

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    @property
    def in_features(self) -> int:
        return self.V.shape[1]

    def register_consumer(self) -> int:
        self.n_consumers += 1
        return self.n_consumers - 1

    def clear_cache(self) -> None:
        self._cache = None

    def _key(self, x: torch.Tensor):
        V = self.V
        return (_version(x), _version(V), V.data_ptr(), V.dtype, V.device, torch.is_grad_enabled())

    def forward(self, x: torch.Tensor, consumer: int | None = None) -> torch.Tensor:
        if consumer is None or self.n_consumers < 2:
            self.n_computed += 1
            return F.linear(x, self.V)
        key = self._key(x)
        c = self._cache
        if c is not None and c[0]() is x and c[1] == key and consumer not in c[3]:
            c[3].add(consumer)
            if len(c[3]) >= self.n_consumers:
                self._cache = None
            return c[2]
        z = F.linear(x, self.V)  # [..., r]
        self.n_computed += 1
        self._cache = (weakref.ref(x), key, z, {consumer})
        return z

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def __getstate__(self):  # weakrefs cannot be pickled / deep-copied meaningfully
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in_features={self.in_features}, consumers={self.n_consumers}"


class SLRLinear(nn.Module):
    """Drop-in nn.Linear replacement computing y = x (S + U V)^T + b.

    Parameters (all trainable): ``values`` [nnz] (None without a sparse part), ``U`` [d_out, r],
    ``V`` [r, d_in] (own factor; None when ``shared`` is set), ``bias`` [d_out]. Buffers: ``crow``, ``col``.

    Execution strategies (``strategy`` attribute; change with ``set_strategy``):

    - ``dense-cached``: caches the dense W = S + U V once, one F.linear per call. As fast as the dense
      model, but holds a dense weight (no memory saving). The cache is rebuilt when any parameter's
      version/storage/dtype changes, cleared on ``train()``, and bypassed while gradients are needed.
    - ``dense-onthefly``: scatters S into a temporary dense matrix each call, F.linear, plus the low-rank
      part as two thin matmuls (x V^T) U^T. Persistent memory = compressed; autograd-safe.
    - ``sparse``: torch CSR (MKL) matmul for S plus the low-rank part. fp32/fp64 only and no autograd on
      ``values``: falls back to ``dense-onthefly`` otherwise.
    - ``auto``: ``sparse`` for <= AUTO_SPARSE_MAX_TOKENS tokens per call, ``dense-onthefly`` above (and
      whenever gradients are needed) -- the fastest option that keeps the memory saving.

    A dense 4-bit S (a QSLRLinear from e.g. gptq at sparsity 0) runs as slr's C++ int4 kernel (decode, float32) or
    torch's CPU int4 weight-only GEMM, a 2:4 one with 4-bit values as slr's 2:4 kernel, under any strategy but
    ``dense-cached``, when ``slr.kernels``' setting and the layer's shapes allow it.

    Measured (torch 2.13 CPU/MKL, 1 thread of a shared 2-core box, fp32, no_grad, best of 30, microseconds;
    d_out=1536, d_in=576, rank 32; 576x1536 gives the same picture):

        tokens per call           1      4     16     64    128    512
        nn.Linear (dense)       162    301    396    848   1593   5406
        dense-cached (2:4)      161    283    414    888   1488   5154
        dense-onthefly (2:4)   1289   1583   1544   2072   2776   7127
        sparse (2:4)            304    376    564   1712   4027  16026
        auto (2:4)              331    381    604   1802   2799   6748
        dense-onthefly (u50)   1383   1582   1725   2027   2635   6593
        sparse (u50)            432    581    843   2150   3571  15304

    On CPU none of these memory-saving strategies beats the dense GEMM; slr.packed's layers (what ``io.load`` builds
    by default where the C++ kernels are built) do, at decode. Resident memory of the sparse part is
    nnz * (value bytes + 2): a 2:4 fp32 layer keeps 75% of the dense bytes, a 2:4 fp16 one 100%; the
    artifact on disk is where the packed formats save bytes (see slr.formats).

    ``num_params()`` = nnz + r * d_out + r * d_in, where a shared V is counted only by its owner (the
    first consumer registered with the SharedProjection); the bias is not counted (like the dense d_out*d_in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        values: torch.Tensor | None = None,
        crow: torch.Tensor | None = None,
        col: torch.Tensor | None = None,
        U: torch.Tensor | None = None,
        V: torch.Tensor | None = None,
        shared: SharedProjection | None = None,
        bias: torch.Tensor | None = None,
        nm: tuple[int, int] | None = None,
        strategy: str = "auto",
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        _check_strategy(strategy)
        self.strategy = strategy
        self.nm = tuple(nm) if nm is not None else None
        d_out, d_in = self.out_features, self.in_features
        if values is not None:
            if crow is None or col is None:
                raise ValueError("values need crow and col")
            crow = crow.to(torch.int64)
            if crow.shape != (d_out + 1,) or col.shape != values.shape or values.dim() != 1:
                raise ValueError(f"bad CSR shapes: crow {tuple(crow.shape)}, col {tuple(col.shape)}, "
                                 f"values {tuple(values.shape)} for [{d_out}, {d_in}]")
            if int(crow[-1]) != values.numel():
                raise ValueError("crow[-1] != nnz")
            self.values = nn.Parameter(values.detach().clone())
            self.register_buffer("crow", crow.clone())
            self.register_buffer("col", col.to(_col_dtype(d_in)).clone())
        else:
            self.values = None
            self.register_buffer("crow", None)
            self.register_buffer("col", None)
        if values is None and U is None:
            raise ValueError("SLRLinear needs a sparse part, a low-rank part, or both")
        if (U is None) != (V is None and shared is None):
            raise ValueError("U needs V or shared (and vice versa)")
        self.U = None if U is None else nn.Parameter(U.detach().clone())  # [d_out, r]
        self.V = None if V is None or shared is not None else nn.Parameter(V.detach().clone())  # [r, d_in]
        self.shared = shared
        self._cid = shared.register_consumer() if shared is not None else None
        if self.U is not None:
            r = self.U.shape[1]
            vshape = tuple((shared.V if shared is not None else self.V).shape)
            if self.U.shape[0] != d_out or vshape != (r, d_in):
                raise ValueError(f"bad factor shapes U {tuple(self.U.shape)}, V {vshape} for [{d_out}, {d_in}]")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._k_cache = None  # (crow version, nnz per row or None)
        self._w_cache = None  # (key, dense W) for dense-cached
        self._i4_cache = None  # (key, {kernel: slr.kernels' pack or None}) for a dense 4-bit S

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_result(
        cls,
        res: SolveResult,
        bias: torch.Tensor | None = None,
        shared: SharedProjection | None = None,
        strategy: str = "auto",
        *,
        nm: tuple[int, int] | None = None,
    ) -> SLRLinear:
        """Build from a solver result. ``nm`` is detected from the mask when not given."""
        values = crow = col = None
        if res.S is not None:
            mask = res.mask if res.mask is not None else res.S != 0
            mask = mask.bool()
            d_out, d_in = mask.shape
            values = res.S[mask]  # [nnz], row-major order
            crow = torch.zeros(d_out + 1, dtype=torch.int64, device=mask.device)
            crow[1:] = mask.sum(1).cumsum(0)
            col = mask.nonzero()[:, 1]
            if nm is None:
                nm = detect_nm(mask)
            elif not nm_matches(mask, nm):
                raise SLRError(f"the sparse support is not {nm[0]}:{nm[1]}", "pass the pattern the solver used")
        elif res.U is not None:
            d_out, d_in = res.U.shape[0], (shared.V if shared is not None else res.V).shape[1]
            nm = None
        else:
            raise ValueError("empty SolveResult")
        if shared is not None and res.U is not None and res.V is not None and res.V is not shared.V:
            if res.V.shape != shared.V.shape:
                raise ValueError("res.V does not match the shared projection")
        return cls(d_in, d_out, values=values, crow=crow, col=col, U=res.U,
                   V=None if shared is not None else res.V, shared=shared, bias=bias, nm=nm, strategy=strategy)

    # ---- introspection ------------------------------------------------------------------------
    @property
    def weight_V(self) -> torch.Tensor | None:
        return self.shared.V if self.shared is not None else self.V

    @property
    def rank(self) -> int:
        return 0 if self.U is None else self.U.shape[1]

    @property
    def nnz(self) -> int:
        return 0 if self.values is None else self.values.numel()

    @property
    def owns_v(self) -> bool:
        return self.U is not None and (self.shared is None or self._cid == 0)

    def num_params(self) -> int:
        """Kept values + r * d_out + r * d_in (a shared V is counted by its owner only; bias excluded)."""
        n = self.nnz
        if self.U is not None:
            n += self.rank * self.out_features + (self.rank * self.in_features if self.owns_v else 0)
        return n

    def mask(self) -> torch.Tensor:
        """bool [d_out, d_in] support of S."""
        dev = self.crow.device if self.crow is not None else self.U.device
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=dev)
        if self.values is not None:
            m[self._rows(), self.col.long()] = True
        return m

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense [d_out, d_in] tensor (differentiable w.r.t. ``values``)."""
        d_out, d_in = self.out_features, self.in_features
        ref = self.values if self.values is not None else self.U
        if self.values is None:
            return torch.zeros(d_out, d_in, dtype=ref.dtype, device=ref.device)
        k = self._per_row()
        if k is not None:  # every row keeps k values (N:M, row-wise unstructured): row scatter
            idx = self.col.view(d_out, k).long()  # [d_out, k]
            return ref.new_zeros(d_out, d_in).scatter(1, idx, self.values.view(d_out, k))
        return ref.new_zeros(d_out, d_in).index_put((self._rows(), self.col.long()), self.values)

    def to_dense(self) -> torch.Tensor:
        """S + U V as [d_out, d_in]."""
        W = self.sparse_dense()
        if self.U is not None:
            W = W + self.U @ self.weight_V
        return W

    def _rows(self) -> torch.Tensor:
        counts = self.crow.diff()
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)

    def _per_row(self) -> int | None:
        ver = (_version(self.crow), self.crow.data_ptr())
        if self._k_cache is None or self._k_cache[0] != ver:
            d_out = self.out_features
            nnz = self.nnz
            k = nnz // d_out if d_out else 0
            ok = d_out > 0 and nnz == k * d_out and bool(
                (self.crow == torch.arange(d_out + 1, device=self.crow.device) * k).all())
            self._k_cache = (ver, k if ok else None)
        return self._k_cache[1]

    # ---- execution ----------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._w_cache = self._i4_cache = None
        if self.shared is not None:
            self.shared.clear_cache()

    def train(self, mode: bool = True):
        self._w_cache = self._i4_cache = None
        return super().train(mode)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_w_cache"] = state["_i4_cache"] = None
        return state

    def _params(self):
        return [p for p in (self.values, self.U, self.weight_V) if p is not None]

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._params())

    def _cached_weight(self) -> torch.Tensor:
        key = tuple((_version(p), p.data_ptr(), p.dtype, p.device) for p in self._params())
        if self._w_cache is None or self._w_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even under inference_mode
                self._w_cache = (key, self.to_dense())
        return self._w_cache[1]

    def _pick(self, tokens: int) -> str:
        s = self.strategy
        if s == "dense-cached":
            return "dense-onthefly" if self._needs_grad() else s
        if s == "dense-onthefly":
            return s
        sparse_ok = self.values is not None and self.values.dtype in _CSR_DTYPES and not self._needs_grad()
        if s == "sparse":
            return "sparse" if sparse_ok else "dense-onthefly"
        return "sparse" if sparse_ok and tokens <= AUTO_SPARSE_MAX_TOKENS else "dense-onthefly"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(self.in_features, 1)
        y = int4_s(self, x, tokens)  # a dense 4-bit S by an int4 kernel (slr.kernels), else None
        how = "int4" if y is not None else self._pick(tokens)
        if how == "dense-cached":
            return F.linear(x, self._cached_weight(), self.bias)
        if (how == "dense-onthefly" and self.shared is None and self.values is not None
                and tokens * (self.in_features + self.out_features) >= self.in_features * self.out_features):
            # S is applied densely anyway (T m n); with many tokens, folding U V into it once (m n r FLOPs) beats two
            # thin products per token (T (m + n) r) and a pass over y: on SmolLM2 calibration batches (4096 tokens)
            # this halves q/o/gate/up's time. Rank-only layers (no S) keep the thin products, which are cheaper.
            return F.linear(x, self.to_dense(), self.bias)
        if y is None and self.values is not None:
            if how == "sparse":
                x2 = x.reshape(-1, self.in_features)  # [T, d_in]
                S = torch.sparse_csr_tensor(self.crow.to(torch.int32), self.col.to(torch.int32), self.values,
                                            (self.out_features, self.in_features), check_invariants=False)
                if x2.shape[0] < 4:  # MKL's CSR mat-vec is ~4x faster than its mat-mat for 1 column
                    y = torch.stack([S @ xi for xi in x2]) if x2.shape[0] else x2.new_zeros(0, self.out_features)
                else:
                    y = (S @ x2.t()).t()  # [T, d_out]
                y = y.reshape(*x.shape[:-1], self.out_features)  # [..., d_out]
            else:
                y = F.linear(x, self.sparse_dense())  # [..., d_out]
        if self.U is not None:
            z = self.shared(x, self._cid) if self.shared is not None else F.linear(x, self.V)  # [..., r]
            y = F.linear(z, self.U) if y is None else torch.addmm(
                y.reshape(-1, self.out_features), z.reshape(-1, self.rank), self.U.t()).view_as(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        pat = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"nnz={self.nnz}"
        sh = ", shared_v" if self.shared is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {pat}, rank={self.rank}"
                f"{sh}, bias={self.bias is not None}, strategy={self.strategy}")


def _col_dtype(d_in: int) -> torch.dtype:
    return torch.int16 if d_in <= 32768 else torch.int32


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise SLRError(f"unknown execution strategy {strategy!r}", f"choose one of: {', '.join(STRATEGIES)}")


def set_strategy(model: nn.Module, strategy: str) -> int:
    """Set the execution strategy of every SLRLinear in ``model``; returns how many were set."""
    _check_strategy(strategy)
    n = 0
    for m in model.modules():
        if isinstance(m, SLRLinear):
            m.strategy = strategy
            m.clear_cache()
            n += 1
    return n


class QSharedProjection(QuantizedSharedMixin, SharedProjection):
    """A SharedProjection whose V is stored as codes + fp16 group scales (slr.qlinear)."""


class QSLRLinear(QuantizedLinearMixin, SLRLinear):
    """An SLRLinear whose quantized parts (S's values, U, V) are stored as codes + fp16 group scales (slr.qlinear)."""


def compress_block_(block: nn.Module, adapter, results: dict[str, SolveResult], strategy: str = "auto") -> None:
    """Replace the block's linears named in ``results`` by SLRLinear (in place); a result with ``qparams`` gives a
    QSLRLinear that stores its quantized parts as codes (their grids from ``res.qspec``).

    Results of one adapter group that hold the *same* V object (``is``) get one SharedProjection.
    """
    _check_strategy(strategy)
    linears = adapter.linears(block)
    unknown = set(results) - set(linears)
    if unknown:
        raise SLRError(f"no linear named {sorted(unknown)[0]!r} in this block ({adapter.family})",
                       f"use one of: {', '.join(linears)}")
    for group in adapter.groups:
        names = [n for n in group if n in results]
        by_v: dict[int, list[str]] = {}
        for n in names:
            if results[n].V is not None and results[n].U is not None:
                by_v.setdefault(id(results[n].V), []).append(n)
        shared_for: dict[str, SharedProjection] = {}
        for members in by_v.values():
            if len(members) > 1:
                lin, r0 = linears[members[0]], results[members[0]]
                if "V" in r0.qparams:
                    sp = _to_like(QSharedProjection.from_result(r0), lin.weight)
                else:
                    sp = SharedProjection(r0.V.to(lin.weight.device, lin.weight.dtype))
                for n in members:
                    shared_for[n] = sp
        for n in names:
            lin = linears[n]
            res = results[n]
            if res.S is not None and tuple(res.S.shape) != (lin.out_features, lin.in_features):
                raise SLRError(f"result for {n} has shape {tuple(res.S.shape)}, the linear is "
                               f"{(lin.out_features, lin.in_features)}", "solve the right matrix")
            bias = None if lin.bias is None else lin.bias.detach()
            cls = QSLRLinear if res.qparams else SLRLinear
            new = _to_like(cls.from_result(res, bias, shared_for.get(n), strategy), lin.weight)
            set_module(block, n, new)


def _to_like(mod: nn.Module, ref: torch.Tensor) -> nn.Module:
    """Move the module's own float params (and float buffers) to ref's device/dtype, its other buffers to ref's
    device (a shared projection, a submodule, is already there)."""
    for name, p in list(mod._parameters.items()):
        if p is not None and (p.dtype != ref.dtype or p.device != ref.device):
            mod._parameters[name] = nn.Parameter(p.detach().to(ref.device, ref.dtype), requires_grad=p.requires_grad)
    for name, b in list(mod._buffers.items()):
        if b is not None:
            mod._buffers[name] = b.to(ref.device, ref.dtype) if b.is_floating_point() else b.to(ref.device)
    return mod
