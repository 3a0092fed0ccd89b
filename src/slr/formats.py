"""The artifact's packed sparse formats and their byte accounting (``slr.io`` writes and reads the files).

An artifact folder holds config.json, [generation_config.json], [tokenizer files], slr_config.json (the
manifest) and model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json).
Tensors of a compressed linear at module path P (safetensors only, no pickle):

    P.slr.values    N:M [d_out, d_in*N/M] | unstructured [nnz]     (values dtype, row-major support order)
                    | dense [d_out*d_in]: format "dense", an S that keeps every entry, with no index
    P.slr.nm_index  uint8: ceil(log2 M) bits per kept value = its position inside its group of M, LSB first
    P.slr.bitmask   uint8: 1 bit per weight, row-major, LSB first    } unstructured: whichever of the
    P.slr.crow/col  int32|int64 row pointers / int16|int32 columns   } two is smaller
    P.slr.U [d_out, r], P.slr.V [r, d_in]                           (factor dtype; a shared V is stored
                                                                     once, by the first consumer)
A quantized part (manifest record "quant": {"S"|"U"|"V": {"bits", "group_size", "sym"}}, slr.quant's grid) replaces
its float tensor X (P.slr.values, P.slr.U or P.slr.V) by
    X.codes   uint8: its b-bit codes, bit-packed LSB first (S: in CSR order; U, V: row-major)
    X.scales  float16 [rows, groups]: one scale per group of group_size consecutive inputs of a row
    X.zeros   uint8: the b-bit zero points [rows, groups], bit-packed (asymmetric grids only)
With ``embed_bits`` 8 the input embedding (and an untied output head) E is stored as E.q8 (int8 [rows, cols]) and
E.q8_scales (float16 [rows]), per-row symmetric (slr.embeddings); the manifest lists them under "embed".
Everything else (embeddings, norms, head, biases, uncompressed linears) keeps its HF name and is stored
once; tensors sharing storage (tied weights) are stored once and listed under "tied" in the manifest.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import SLRError, one_line
from .nn import SLRLinear, nm_matches
from .qlinear import spec_dict
from .quant import QuantSpec

FORMAT = "slr"
FORMAT_VERSION = 2  # 2: quantized parts or 8-bit embeddings (artifacts without them still say 1)
MANIFEST = "slr_config.json"

# ---------------------------------------------------------------------------------------------------
# bit packing and the sparse formats
# ---------------------------------------------------------------------------------------------------
def nm_index_bits(m: int) -> int:
    """Bits of metadata per kept value for an N:M pattern: ceil(log2 M) (at least 1)."""
    return max(1, (m - 1).bit_length())


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int [n] in [0, 2**bits) -> uint8 [ceil(n * bits / 8)], a little-endian bit stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    if 8 % bits == 0 and bits > 1:  # whole codes per byte: the same stream, without a tensor of single bits
        per = 8 // bits
        pad = (-codes.numel()) % per
        c = torch.cat([codes, codes.new_zeros(pad)]) if pad else codes
        sh = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (c.view(-1, per) << sh).sum(1, dtype=torch.int16).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)  # [n * bits] of 0/1
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream.view(-1, 8) << weights).sum(1, dtype=torch.int16).to(torch.uint8)  # [nbytes]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [nbytes] -> uint8 codes [n]."""
    if packed.numel() != math.ceil(n * bits / 8):
        raise SLRError(f"packed index has {packed.numel()} bytes, expected {math.ceil(n * bits / 8)}",
                       "the artifact is corrupted; re-run slr compress")
    if 8 % bits == 0 and bits > 1:
        sh = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.to(torch.uint8)[:, None] >> sh) & (2**bits - 1)).reshape(-1)[:n]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.to(torch.uint8)[:, None] >> shifts) & 1).reshape(-1)[: n * bits]  # [n * bits]
    weights = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.view(n, bits) << weights).sum(1, dtype=torch.int16).to(torch.uint8)


def pack_nm(values: torch.Tensor, col: torch.Tensor, d_out: int, d_in: int, n: int, m: int):
    """CSR (row-major, N per group) -> (values [d_out, d_in*n/m], nm_index uint8 [ceil(nnz*bits/8)])."""
    k = d_in // m * n
    if values.numel() != d_out * k:
        raise ValueError(f"{values.numel()} kept values do not form a {n}:{m} pattern of [{d_out}, {d_in}]")
    off = (col.long() % m).to(torch.uint8)  # [nnz] position inside the group
    return values.reshape(d_out, k), pack_bits(off, nm_index_bits(m))


def unpack_nm(values: torch.Tensor, index: torch.Tensor, d_out: int, d_in: int, n: int, m: int):
    """(values [d_out, d_in*n/m], nm_index) -> (values [nnz], crow int64 [d_out+1], col int64 [nnz])."""
    g = d_in // m
    k = g * n
    nnz = d_out * k
    if tuple(values.shape) != (d_out, k):
        raise SLRError(f"N:M values have shape {tuple(values.shape)}, expected {(d_out, k)}",
                       "the artifact is corrupted; re-run slr compress")
    off = unpack_bits(index, nm_index_bits(m), nnz).long()  # [nnz]
    o = off.view(-1, n)
    if bool((off >= m).any()) or (n > 1 and bool((o[:, 1:] <= o[:, :-1]).any())):
        raise SLRError("N:M index metadata is invalid", "the artifact is corrupted; re-run slr compress")
    grp = torch.arange(nnz, device=off.device) // n % g  # [nnz] group of each kept value
    col = grp * m + off
    crow = torch.arange(d_out + 1, device=off.device) * k
    return values.reshape(-1), crow, col


def csr_dtypes(d_in: int, nnz: int) -> tuple[torch.dtype, torch.dtype]:
    """(row-pointer dtype, column dtype) chosen by width."""
    return (torch.int32 if nnz < 2**31 else torch.int64), (torch.int16 if d_in <= 32768 else torch.int32)


def unstructured_index_bytes(d_out: int, d_in: int, nnz: int) -> dict[str, int]:
    """Index bytes of the two unstructured formats."""
    crow_dt, col_dt = csr_dtypes(d_in, nnz)
    return {"bitmask": math.ceil(d_out * d_in / 8),
            "csr": (d_out + 1) * crow_dt.itemsize + nnz * col_dt.itemsize}


def choose_unstructured(d_out: int, d_in: int, nnz: int) -> str:
    b = unstructured_index_bytes(d_out, d_in, nnz)
    return "bitmask" if b["bitmask"] <= b["csr"] else "csr"


def pack_bitmask(crow: torch.Tensor, col: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    rows = torch.repeat_interleave(torch.arange(d_out, device=crow.device), crow.long().diff())
    bits = torch.zeros(d_out * d_in, dtype=torch.uint8, device=crow.device)
    bits[rows * d_in + col.long()] = 1
    return pack_bits(bits, 1)


def unpack_bitmask(packed: torch.Tensor, d_out: int, d_in: int, nnz: int):
    """-> (crow int64 [d_out+1], col int64 [nnz])."""
    mask = unpack_bits(packed, 1, d_out * d_in).view(d_out, d_in).bool()
    counts = mask.sum(1)
    if int(counts.sum()) != nnz:
        raise SLRError(f"bitmask keeps {int(counts.sum())} values, expected {nnz}",
                       "the artifact is corrupted; re-run slr compress")
    crow = torch.zeros(d_out + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    return crow, mask.nonzero()[:, 1]


# ---------------------------------------------------------------------------------------------------
# byte accounting
# ---------------------------------------------------------------------------------------------------
def quant_bytes(n: int, rows: int, groups: int, q: QuantSpec) -> dict[str, int]:
    """Bytes of ``n`` b-bit codes and of their grid: an fp16 scale per group (+ b-bit zero points if asymmetric)."""
    zb = 0 if q.sym else math.ceil(rows * groups * q.bits / 8)
    return {"codes": math.ceil(n * q.bits / 8), "scales": rows * groups * 2 + zb}


def _factor_bytes(rows: int, cols: int, q: QuantSpec | None, dtype: torch.dtype) -> int:
    if q is None:
        return rows * cols * dtype.itemsize
    return sum(quant_bytes(rows * cols, rows, cols // q.group_size, q).values())


def theoretical_bytes(d_out: int, d_in: int, nnz: int, rank: int, *, nm: tuple[int, int] | None = None,
                      values_dtype: torch.dtype = torch.float16, factor_dtype: torch.dtype = torch.float16,
                      count_v: bool = True, quant: dict[str, QuantSpec] | None = None) -> dict[str, int]:
    """Bytes a compressed matrix should take: values (+ their scales) + index + factors.

    Values: nnz * value bytes, or for a quantized S (``quant["S"]``) ceil(nnz * b / 8) code bytes plus "scales": an
    fp16 scale (and a b-bit zero point when asymmetric) per group of d_out x d_in / group_size. Index: N:M
    ceil(nnz * ceil(log2 M) / 8); unstructured min(bitmask, CSR). Factors: r * (d_out + d_in) values at the factor
    dtype, or b-bit codes with their scales for quantized U / V (r * d_out only when a shared V is counted elsewhere).
    """
    q = quant or {}
    sb = 0
    if "S" in q and nnz:
        qb = quant_bytes(nnz, d_out, d_in // q["S"].group_size, q["S"])
        vb, sb = qb["codes"], qb["scales"]
    else:
        vb = nnz * values_dtype.itemsize
    if nnz == 0 or nnz == d_out * d_in:  # no S, or a dense one (format "dense"): no index
        ib = 0
    elif nm is not None:
        ib = math.ceil(nnz * nm_index_bits(nm[1]) / 8)
    else:
        ib = min(unstructured_index_bytes(d_out, d_in, nnz).values())
    fb = 0
    if rank:
        fb = _factor_bytes(d_out, rank, q.get("U"), factor_dtype)
        fb += _factor_bytes(rank, d_in, q.get("V"), factor_dtype) if count_v else 0
    return {"values": vb, "scales": sb, "index": ib, "factors": fb, "total": vb + sb + ib + fb}


def layer_quant(lin: SLRLinear) -> dict[str, QuantSpec]:
    """The grids of the layer's quantized parts (a quantized shared V included)."""
    q = dict(getattr(lin, "qspecs", {}))
    if lin.shared is not None and "V" in getattr(lin.shared, "qspecs", {}):
        q["V"] = lin.shared.qspecs["V"]
    return q


def pack_quantized(key: str, codes: torch.Tensor, sbits: torch.Tensor, zero: torch.Tensor | None,
                   q: QuantSpec) -> dict[str, torch.Tensor]:
    """The artifact tensors of one quantized part (see the module docstring)."""
    t = {f"{key}.codes": pack_bits(codes.detach().cpu(), q.bits),
         f"{key}.scales": sbits.detach().cpu().contiguous().view(torch.float16)}
    if zero is not None:
        t[f"{key}.zeros"] = pack_bits(zero.detach().cpu(), q.bits)
    return t


def unpack_quantized(get, key: str, shape: tuple[int, ...], rows: int, q: QuantSpec, groups: int):
    """(codes uint8 [shape], scale bits int16 [rows, groups], zero uint8 [rows, groups] or None) of one part;
    ``get(name)`` reads an artifact tensor."""
    codes = unpack_bits(get(f"{key}.codes"), q.bits, math.prod(shape)).view(shape)
    scales = get(f"{key}.scales")
    if scales.dtype != torch.float16 or tuple(scales.shape) != (rows, groups):
        raise SLRError(f"{key}.scales is {scales.dtype} {tuple(scales.shape)}, expected float16 {(rows, groups)}",
                       "the artifact is corrupted; re-run slr compress")
    zero = None if q.sym else unpack_bits(get(f"{key}.zeros"), q.bits, rows * groups).view(rows, groups)
    return codes, scales.contiguous().view(torch.int16), zero


def _part(lin: SLRLinear, part: str):
    """(codes, scale bits, zero) of a quantized part of ``lin`` (V from the shared projection when shared)."""
    holder = lin.shared if part == "V" and lin.shared is not None else lin
    return holder.qbuffers(part)


def _pack_layer(name: str, lin: SLRLinear, owner: str | None, values_dtype, factor_dtype):
    """-> (tensors {name: tensor}, manifest record) for one SLRLinear."""
    d_out, d_in = lin.out_features, lin.in_features
    q = layer_quant(lin)
    t: dict[str, torch.Tensor] = {}
    rec: dict = {"shape": [d_out, d_in], "nm": None, "rank": lin.rank, "nnz": lin.nnz,
                 "bias": lin.bias is not None}
    if q:
        rec["quant"] = {p: spec_dict(s) for p, s in q.items()}
    nm = lin.nm
    if "S" not in q and lin.values is None:
        rec["format"] = "none"
    else:
        vals = lin.qS_codes.cpu() if "S" in q else lin.values.detach().cpu().to(values_dtype)
        crow, col = lin.crow.cpu(), lin.col.cpu()
        if nm is not None and not nm_matches(lin.mask().cpu(), nm):
            nm = None  # support no longer N:M (should not happen: the support is fixed)
        if lin.nnz == d_out * d_in:  # a dense S (e.g. quantized, sparsity 0): row-major, no index
            rec["format"] = "dense"
            t[f"{name}.slr.values"] = vals
        elif nm is not None:
            rec["format"], rec["nm"] = "nm", list(nm)
            t[f"{name}.slr.values"], t[f"{name}.slr.nm_index"] = pack_nm(vals, col, d_out, d_in, *nm)
        else:
            fmt = choose_unstructured(d_out, d_in, lin.nnz)
            rec["format"] = fmt
            t[f"{name}.slr.values"] = vals
            if fmt == "bitmask":
                t[f"{name}.slr.bitmask"] = pack_bitmask(crow, col, d_out, d_in)
            else:
                crow_dt, col_dt = csr_dtypes(d_in, lin.nnz)
                t[f"{name}.slr.crow"], t[f"{name}.slr.col"] = crow.to(crow_dt), col.to(col_dt)
        if "S" in q:
            del t[f"{name}.slr.values"]
            t.update(pack_quantized(f"{name}.slr.values", *_part(lin, "S"), q["S"]))
    count_v = False
    if lin.rank:
        factors = {"U": True}
        if lin.shared is None:
            rec["v"], count_v = "own", True
        else:
            rec["v"], rec["v_from"] = "shared", owner
            count_v = owner == name
        factors["V"] = count_v
        for part, store in factors.items():
            if not store:
                continue
            if part in q:
                t.update(pack_quantized(f"{name}.slr.{part}", *_part(lin, part), q[part]))
            else:
                f = lin.weight_V if part == "V" else lin.U
                t[f"{name}.slr.{part}"] = f.detach().cpu().to(factor_dtype)
    actual = sum(x.numel() * x.element_size() for x in t.values())
    theory = theoretical_bytes(d_out, d_in, lin.nnz, lin.rank, nm=nm, values_dtype=values_dtype,
                               factor_dtype=factor_dtype, count_v=count_v, quant=q)
    rec["bytes"] = actual
    rec["theory_bytes"] = theory
    rec["dense_bytes"] = d_out * d_in * values_dtype.itemsize
    rec["bits_per_weight"] = round(8 * actual / (d_out * d_in), 4)
    rec["tensors"] = sorted(t)
    return t, rec


def layer_bytes(lin: SLRLinear, *, values_dtype: torch.dtype = torch.float16,
                factor_dtype: torch.dtype = torch.float16, count_v: bool = True) -> dict:
    """Packed size of one SLRLinear as it would be saved: {"actual", "theory", "dense", "format"}.

    ``count_v=False`` leaves a shared V out (it is stored once, by the group's first consumer).
    """
    owner = None
    if lin.shared is not None:
        owner = "this" if count_v else "other"
    _, rec = _pack_layer("this", lin, owner, values_dtype, factor_dtype)
    return {"actual": rec["bytes"], "theory": rec["theory_bytes"], "dense": rec["dense_bytes"],
            "format": rec["format"], "bits_per_weight": rec["bits_per_weight"]}


def model_bytes(model, *, values_dtype: torch.dtype = torch.float16,
                factor_dtype: torch.dtype = torch.float16) -> dict:
    """Theoretical bytes of every SLRLinear of an in-memory model (a shared V counted once) and their bits per weight
    (PROTOCOL §5): what ``io.save`` would write for the compressed linears, without packing them."""
    total = params = 0
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, SLRLinear):
            continue
        count_v = m.shared is None or id(m.shared) not in seen
        if m.shared is not None:
            seen.add(id(m.shared))
        total += theoretical_bytes(m.out_features, m.in_features, m.nnz, m.rank, nm=m.nm, values_dtype=values_dtype,
                                   factor_dtype=factor_dtype, count_v=count_v and m.rank > 0,
                                   quant=layer_quant(m))["total"]
        params += m.out_features * m.in_features
    return {"compressed_layers_theory": total, "compressed_params": params, "bpw": bpw(total, params)}


def bpw(nbytes: int, params: int) -> float | None:
    """Bits per weight: bytes x 8 / parameter count (PROTOCOL §5); None without parameters."""
    return round(8 * nbytes / params, 4) if params else None


def artifact_bytes(path: str | os.PathLike) -> dict:
    """Byte report of a saved artifact: per compressed layer (actual vs theory) and files on disk."""
    p = Path(path)
    man = read_manifest(p)
    layers = {n: {"actual": r["bytes"], "theory": r["theory_bytes"]["total"], "dense": r["dense_bytes"],
                  "format": r["format"], "rank": r["rank"], "nnz": r["nnz"]} for n, r in man["layers"].items()}
    files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
    return {"layers": layers, "files": files, "files_total": sum(files.values()), **man["bytes"]}


# ---------------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------------
def read_manifest(p: Path) -> dict:
    """The validated manifest (slr_config.json) of the artifact folder ``p``; SLRError when it is not one."""
    if not p.is_dir():
        raise SLRError(f"artifact {p} does not exist or is not a directory", "pass the folder written by slr compress")
    mp = p / MANIFEST
    if not mp.is_file():
        raise SLRError(f"{p} is not an slr artifact (no {MANIFEST})", "pass the folder written by slr compress")
    try:
        man = json.loads(mp.read_text())
    except (ValueError, OSError) as e:
        raise SLRError(f"{MANIFEST} is unreadable ({one_line(e)})",
                       "re-run slr compress or re-copy the artifact") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise SLRError(f"{MANIFEST} does not describe an slr artifact", "re-run slr compress")
    ver = man.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise SLRError(f"artifact format version {ver!r} is invalid", "re-run slr compress or re-copy the artifact")
    if ver > FORMAT_VERSION:
        raise SLRError(f"artifact format version {ver} is newer than this slr supports ({FORMAT_VERSION})",
                       "upgrade slr")
    for key in ("layers", "files", "tied", "dtypes"):
        if not isinstance(man.get(key), dict):
            raise SLRError(f"{MANIFEST} has no valid {key!r} entry", "re-run slr compress or re-copy the artifact")
    return man
