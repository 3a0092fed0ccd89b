"""Rebuild one compressed linear from an artifact's tensors (``io.load``): the sparse formats of ``slr.formats``,
float or quantized values and factors, own or shared V."""

from __future__ import annotations

import torch

from .errors import SLRError, one_line
from .formats import unpack_bitmask, unpack_nm, unpack_quantized
from .nn import QSharedProjection, QSLRLinear, SharedProjection, SLRLinear
from .qlinear import spec_from


def _support(name: str, rec: dict, get, d_out: int, d_in: int, quantized: bool):
    """(values [nnz] or None when quantized, crow, col) of the layer's S; (None, None, None) without one."""
    fmt, nnz = rec["format"], int(rec["nnz"])
    nm = tuple(rec["nm"]) if rec.get("nm") else None
    key = f"{name}.slr.values"
    values = crow = col = None
    if fmt == "nm":
        n, m = nm
        dummy = torch.empty(d_out, d_in // m * n, dtype=torch.uint8)  # the index alone gives the support
        values, crow, col = unpack_nm(dummy if quantized else get(key), get(f"{name}.slr.nm_index"), d_out, d_in, *nm)
    elif fmt == "bitmask":
        values = None if quantized else get(key)
        crow, col = unpack_bitmask(get(f"{name}.slr.bitmask"), d_out, d_in, nnz)
    elif fmt == "csr":
        values = None if quantized else get(key)
        crow, col = get(f"{name}.slr.crow"), get(f"{name}.slr.col")
        if crow.shape != (d_out + 1,) or col.numel() != nnz or (nnz and int(col.max()) >= d_in):
            raise SLRError(f"CSR index of {name} is invalid", "the artifact is corrupted; re-run slr compress")
    elif fmt == "dense":
        if nnz != d_out * d_in:
            raise SLRError(f"{name} is dense but keeps {nnz} values", "the artifact is corrupted; re-run slr compress")
        values = None if quantized else get(key)
        crow = torch.arange(d_out + 1, dtype=torch.int64) * d_in
        col = torch.arange(d_in, dtype=torch.int64).repeat(d_out)
    elif fmt != "none":
        raise SLRError(f"unknown sparse format {fmt!r} for {name}", "upgrade slr")
    if quantized:
        values = None
    elif values is not None and values.numel() != nnz:
        raise SLRError(f"{name} has {values.numel()} values, expected {nnz}", "re-run slr compress")
    return values, crow, col


def build_layer(name: str, rec: dict, get, shared: dict[str, SharedProjection], dtype: torch.dtype,
                strategy: str) -> SLRLinear:
    """The SLRLinear (a QSLRLinear when the record has "quant") of manifest record ``rec``; ``get(tensor name)`` reads
    the artifact, ``shared`` maps an owner's name to its SharedProjection (filled here, owners first)."""
    d_out, d_in = rec["shape"]
    nm = tuple(rec["nm"]) if rec.get("nm") else None
    nnz, r = int(rec["nnz"]), int(rec.get("rank", 0))
    q = {p: spec_from(d) for p, d in (rec.get("quant") or {}).items()}
    values, crow, col = _support(name, rec, get, d_out, d_in, "S" in q)
    parts = {}
    if "S" in q:
        if crow is None:
            raise SLRError(f"{name} has a quantized S but no support", "the artifact is corrupted; re-run slr compress")
        parts["S"] = unpack_quantized(get, f"{name}.slr.values", (nnz,), d_out, q["S"], d_in // q["S"].group_size)
        values = torch.empty(nnz, dtype=dtype)
    U = V = sp = None
    if r:
        if "U" in q:
            parts["U"] = unpack_quantized(get, f"{name}.slr.U", (d_out, r), d_out, q["U"], r // q["U"].group_size)
            U = torch.empty(d_out, r, dtype=dtype)
        else:
            U = get(f"{name}.slr.U").to(dtype)
        if rec.get("v") == "shared":
            owner = rec["v_from"]
            if owner not in shared:
                if "V" in q:
                    codes = unpack_quantized(get, f"{owner}.slr.V", (r, d_in), r, q["V"], d_in // q["V"].group_size)
                    shared[owner] = QSharedProjection.from_codes(*codes, q["V"], dtype)
                else:
                    shared[owner] = SharedProjection(get(f"{owner}.slr.V").to(dtype))
            sp = shared[owner]
        elif "V" in q:
            parts["V"] = unpack_quantized(get, f"{name}.slr.V", (r, d_in), r, q["V"], d_in // q["V"].group_size)
            V = torch.empty(r, d_in, dtype=dtype)
        else:
            V = get(f"{name}.slr.V").to(dtype)
    bias = get(f"{name}.bias").to(dtype) if rec.get("bias") else None
    cls = QSLRLinear if q else SLRLinear
    try:
        lin = cls(d_in, d_out, values=None if values is None else values.reshape(-1).to(dtype), crow=crow, col=col,
                  U=U, V=V, shared=sp, bias=bias, nm=nm, strategy=strategy)
    except ValueError as e:
        raise SLRError(f"layer {name} is inconsistent ({one_line(e)})", "re-run slr compress") from None
    for part, (codes, sbits, zero) in parts.items():
        lin.install(part, codes, sbits, zero, q[part])
    return lin
