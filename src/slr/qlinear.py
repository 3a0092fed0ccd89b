"""Quantized storage of an SLRLinear's parts: S's values, U and V as integer codes + fp16 group scales (+ zeros).

A part on a ``quant.QuantSpec`` grid is kept as three buffers instead of a float Parameter:

    q{P}_codes  uint8, one code per value (S: [nnz] in CSR order; U: [d_out, r]; V: [r, d_in])
    q{P}_scale  int16 [rows, groups]: the fp16 bits of each group's scale (an integer buffer, so that ``.to(dtype)``
                never rounds it)
    q{P}_zero   uint8 [rows, groups]: the zero points (asymmetric grids only; symmetric ones use 2^(b-1))

and read back as float values by dequantization in pure torch (``scale (code - zero)``, computed in float32 and cast
to the layer's dtype, the dtype of its non-persistent ``_qref`` buffer). Groups are ``group_size`` consecutive
entries of a row of the dense matrix: for S, value k at (row i, column j) is in group (i, j // group_size).

``QuantizedLinearMixin`` and ``QuantizedSharedMixin`` are mixed into ``nn.SLRLinear`` / ``nn.SharedProjection``
(``nn.QSLRLinear``, ``nn.QSharedProjection``): the attributes ``values``, ``U`` and ``V`` stay readable (a
dequantized tensor for a quantized part, the Parameter otherwise), so execution, ``to_dense`` and export need no
second code path. Within one ``forward`` / ``to_dense`` each part is dequantized once. Quantized parts are buffers,
not Parameters: transformer matching trains only the float parts of a layer (bias, float factors).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import SLRError
from .quant import QuantSpec, dequantize, quantize
from .solvers.base import SolveResult
from .spec import LayerSpec

PARTS = {"S": "values", "U": "U", "V": "V"}  # part -> attribute


def scale_bits(scale: torch.Tensor) -> torch.Tensor:
    """fp16 scales (float tensor) -> their int16 bit patterns."""
    return scale.to(torch.float16).contiguous().view(torch.int16)


def scale_values(bits: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns -> the fp16 scales as float32."""
    return bits.contiguous().view(torch.float16).float()


def zero_of(zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | float:
    """The zero points as float (a constant 2^(b-1) on a symmetric grid)."""
    return float(2 ** (spec.bits - 1)) if zero is None else zero.float()


def spec_dict(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}


def spec_from(d: dict) -> QuantSpec:
    try:
        spec = QuantSpec(int(d["bits"]), int(d["group_size"]), bool(d["sym"]))
    except (KeyError, TypeError, ValueError):
        raise SLRError(f"quantization record {d!r} is invalid", "the artifact is corrupted; re-run slr compress") \
            from None
    spec.validate()
    return spec


def grids(spec: LayerSpec, res: SolveResult) -> dict[str, QuantSpec]:
    """The grid of each quantized part of ``res`` (those in ``res.qparams``), from the LayerSpec it was solved for."""
    out = {}
    for part in res.qparams:
        if part == "S":
            q = spec.quant
        elif part == "U":
            q = spec.factor_quant(res.U.shape[1])
        elif part == "V":
            q = spec.factor_quant(res.V.shape[1])
        else:
            raise SLRError(f"qparams names an unknown part {part!r}", "use S, U or V")
        if q is None:
            raise SLRError(f"the result has qparams for {part} but its spec {spec.label} does not quantize it",
                           "pass --bits / --factor-bits that match the solver")
        out[part] = q
    return out


def encode(part: str, W: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor], spec: QuantSpec,
           mask: torch.Tensor | None = None):
    """(codes [d_out, d_in] uint8, scale bits int16, zero uint8 or None) of values ``W`` that lie on the grid.

    Values off the grid by more than 1e-3 of a step are an error (the solver did not return grid values)."""
    scale, zero = (t.float() for t in qparams)
    codes = quantize(W, scale, zero, spec)
    back = dequantize(codes, scale, zero, spec)
    off = (back - W.float()).abs().reshape(W.shape[0], -1, spec.group_size) / scale[..., None]
    if mask is not None:
        off = off * mask.reshape(off.shape)
    worst = float(off.max()) if off.numel() else 0.0
    if worst > 1e-3:
        raise SLRError(f"the values of {part} are not on their {spec.bits}-bit grid (off by {worst:.3g} steps)",
                       "the solver must return values on the grid of its qparams (quant.rtn / quant.quantize)")
    return codes, scale_bits(scale), None if spec.sym else zero.round().to(torch.uint8)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class QPart:
    """Data descriptor for ``values`` / ``U`` / ``V``: the dequantized part when it is stored quantized, else the
    Parameter (or None). Unset, it raises AttributeError, so that nn.Module.register_parameter accepts it."""

    def __init__(self, part: str):
        self.part, self.attr = part, PARTS[part]

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        if self.part in obj.__dict__.get("qspecs", ()):
            return obj.dequantized(self.part)
        params = obj.__dict__.get("_parameters", {})
        if self.attr in params:
            return params[self.attr]
        raise AttributeError(self.attr)

    def __set__(self, obj, value):  # nn.Module.__setattr__ lands here only for non-Parameters
        if value is not None:
            raise TypeError(f"cannot assign {type(value).__name__} as {self.attr} (use an nn.Parameter)")
        obj._parameters[self.attr] = None


class _QuantizedParts:
    """What both mixins share: the q-buffers, the per-call dequantization cache, installing a part."""

    def _init_q(self, dtype: torch.dtype) -> None:
        self.qspecs: dict[str, QuantSpec] = {}
        self._dq = None
        self.register_buffer("_qref", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def qdtype(self) -> torch.dtype:
        return self._qref.dtype

    def qbuffers(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes, scale bits, zero or None) of a quantized part."""
        return getattr(self, f"q{part}_codes"), getattr(self, f"q{part}_scale"), self._buffers.get(f"q{part}_zero")

    def install(self, part: str, codes: torch.Tensor, sbits: torch.Tensor, zero: torch.Tensor | None,
                spec: QuantSpec) -> None:
        """Store ``part`` as codes + scales (+ zeros), replacing its float Parameter."""
        attr = PARTS[part]
        dev = self._qref.device
        self._parameters.pop(attr, None)
        self.register_buffer(f"q{part}_codes", codes.to(dev, torch.uint8).contiguous())
        self.register_buffer(f"q{part}_scale", sbits.to(dev, torch.int16).contiguous())
        if zero is not None:
            self.register_buffer(f"q{part}_zero", zero.to(dev, torch.uint8).contiguous())
        self.qspecs[part] = spec
        self._w_cache = None

    @contextlib.contextmanager
    def dq_scope(self):
        """Dequantize each part at most once inside this block."""
        d = self.__dict__  # a plain attribute: set without nn.Module.__setattr__'s checks (it runs on every forward)
        outer = d.get("_dq") is not None
        if not outer:
            d["_dq"] = {}
        try:
            yield
        finally:
            if not outer:
                d["_dq"] = None

    def trainable_scales_(self) -> list[nn.Parameter]:
        """Each quantized part's group scales as a float32 Parameter ``q{P}_tscale`` that dequantization reads instead
        of the fp16 buffer (the codes stay fixed); ``store_scales_`` writes them back."""
        out = []
        for part in self.qspecs:
            name = f"q{part}_tscale"
            if self._parameters.get(name) is None:
                self.register_parameter(name, nn.Parameter(scale_values(getattr(self, f"q{part}_scale"))))
            out.append(self._parameters[name])
        return out

    def store_scales_(self) -> None:
        """Round the trained scales to fp16 into the scale buffers and drop the Parameters."""
        for part in self.qspecs:
            p = self._parameters.pop(f"q{part}_tscale", None)
            if p is not None:
                getattr(self, f"q{part}_scale").copy_(scale_bits(p.detach()))
        self.clear_cache()  # packed / dense caches were built from the old scales

    def scales(self, part: str, sbits: torch.Tensor) -> torch.Tensor:
        """The group scales of ``part`` as float32: the trained Parameter while there is one, else the fp16 bits."""
        p = self._parameters.get(f"q{part}_tscale")
        return scale_values(sbits) if p is None else p

    def dequantized(self, part: str) -> torch.Tensor:
        cache = self.__dict__.get("_dq")
        if cache is not None and part in cache:
            return cache[part]
        codes, sbits, zero = self.qbuffers(part)
        spec = self.qspecs[part]
        if part == "S":
            out = self._dequant_values(codes, sbits, zero, spec)
        else:
            scale = self.scales(part, sbits)
            z = torch.full_like(scale, 2 ** (spec.bits - 1)) if zero is None else zero.float()
            out = dequantize(codes, scale, z, spec)
        out = out.to(self.qdtype)
        if cache is not None:
            cache[part] = out
        return out

    def _qkey(self) -> list[torch.Tensor]:
        return [b for n, b in self._buffers.items() if b is not None and (n.startswith("q") or n == "_qref")]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_dq"] = None
        return state

    def _qrepr(self) -> str:
        return ", ".join(f"{p}=int{s.bits}g{s.group_size}{'' if s.sym else 'a'}" for p, s in self.qspecs.items())


class QuantizedLinearMixin(_QuantizedParts):
    """Mixed into SLRLinear (``nn.QSLRLinear``): any of S's values, U and own V stored as codes + scales."""

    values = QPart("S")
    U = QPart("U")
    V = QPart("V")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        floats = [p for p in self._parameters.values() if p is not None]
        if self.shared is not None:
            floats += [t for t in (*self.shared.parameters(), *self.shared.buffers()) if t.is_floating_point()]
        self._init_q(floats[0].dtype if floats else torch.float32)

    @classmethod
    def from_result(cls, res: SolveResult, bias=None, shared=None, strategy: str = "auto", *, nm=None):
        """Build from a quantized solver result: ``res.qparams`` and ``res.qspec`` name the quantized parts (a
        quantized shared V lives in ``shared``, a ``QSharedProjection``)."""
        missing = set(res.qparams) - set(res.qspec)
        if missing:
            raise SLRError(f"the result has qparams for {sorted(missing)} but no grid (qspec)",
                           "fill SolveResult.qspec (qlinear.grids(spec, res)), as the pipeline does")
        mod = super().from_result(res, bias, shared, strategy, nm=nm)
        for part in ("S", "U", "V"):
            if part not in res.qparams or (part == "V" and shared is not None):
                continue
            spec = res.qspec[part]
            W = {"S": res.S, "U": res.U, "V": res.V}[part].float()
            mask = res.mask.bool() if part == "S" and res.mask is not None else None
            codes, sbits, zero = encode(part, W, res.qparams[part], spec, mask)
            if part == "S":
                codes = codes[mask if mask is not None else res.S != 0]  # CSR order, like the float values
            mod.install(part, codes, sbits, zero, spec)
        return mod

    def _dequant_values(self, codes, sbits, zero, spec: QuantSpec) -> torch.Tensor:
        """S's values [nnz]: each code with its group's scale and zero, group (row, col // group_size)."""
        d_out = self.out_features
        scale = self.scales("S", sbits)
        zf = zero_of(zero, spec)
        k = self._per_row()
        if k is not None:
            gi = self.col.view(d_out, k).long() // spec.group_size  # [d_out, k]
            s = scale.gather(1, gi).reshape(-1)
            z = zf if isinstance(zf, float) else zf.gather(1, gi).reshape(-1)
        else:
            rows, gi = self._rows(), self.col.long() // spec.group_size
            s = scale[rows, gi]
            z = zf if isinstance(zf, float) else zf[rows, gi]
        return (codes.float() - z) * s

    # ---- cheap introspection (no dequantization) --------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.qS_codes.numel() if "S" in self.qspecs else super().nnz

    @property
    def rank(self) -> int:
        return self.qU_codes.shape[1] if "U" in self.qspecs else super().rank

    @property
    def owns_v(self) -> bool:
        has_u = "U" in self.qspecs or self._parameters.get("U") is not None
        return has_u and (self.shared is None or self._cid == 0)

    def _params(self):
        """What the dense cache's key and the grad check look at: float Parameters and the q-buffers."""
        out = [p for n, p in self._parameters.items() if p is not None and n != "bias"] + self._qkey()
        if self.shared is not None:
            out += list(self.shared.parameters()) + [b for b in self.shared.buffers() if b is not None]
        return out

    # ---- execution: each part dequantized once per call --------------------------------------------------------
    def mask(self) -> torch.Tensor:
        with self.dq_scope():
            return super().mask()

    def sparse_dense(self) -> torch.Tensor:
        with self.dq_scope():
            return super().sparse_dense()

    def to_dense(self) -> torch.Tensor:
        with self.dq_scope():
            return super().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.__dict__  # dq_scope() inlined: at decode its overhead is a fair part of a small layer's time
        if d.get("_dq") is not None:
            return super().forward(x)
        d["_dq"] = {}
        try:
            return super().forward(x)
        finally:
            d["_dq"] = None

    def extra_repr(self) -> str:
        with self.dq_scope():
            return f"{super().extra_repr()}, {self._qrepr()}"


class QuantizedSharedMixin(_QuantizedParts):
    """Mixed into SharedProjection (``nn.QSharedProjection``): the shared V stored as codes + scales."""

    V = QPart("V")

    def __init__(self, V: torch.Tensor):
        super().__init__(V)
        self._init_q(V.dtype if V.is_floating_point() else torch.float32)

    @classmethod
    def from_result(cls, res: SolveResult, dtype: torch.dtype = torch.float32, device=None):
        spec = res.qspec["V"]
        codes, sbits, zero = encode("V", res.V.float(), res.qparams["V"], spec)
        return cls.from_codes(codes, sbits, zero, spec, dtype, device)

    @classmethod
    def from_codes(cls, codes, sbits, zero, spec: QuantSpec, dtype: torch.dtype = torch.float32, device=None):
        sp = cls(torch.empty(tuple(codes.shape), dtype=dtype, device=device))
        sp.install("V", codes, sbits, zero, spec)
        return sp

    @property
    def rank(self) -> int:
        return self.qV_codes.shape[0] if "V" in self.qspecs else super().rank

    @property
    def in_features(self) -> int:
        return self.qV_codes.shape[1] if "V" in self.qspecs else super().in_features

    def _key(self, x: torch.Tensor):
        c = self.qV_codes
        return (_version(x), _version(c), c.data_ptr(), self.qdtype, c.device, torch.is_grad_enabled())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._qrepr()}"
