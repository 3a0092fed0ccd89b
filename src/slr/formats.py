"""The artifact's packed sparse formats and their byte accounting (``slr.io`` writes and reads the files).

An artifact folder holds config.json, [generation_config.json], [tokenizer files], slr_config.json (the
manifest) and model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json).
Tensors of a compressed linear at module path P (safetensors only, no pickle):

    P.slr.values    N:M [d_out, d_in*N/M] | unstructured [nnz]     (values dtype, row-major support order)
    P.slr.nm_index  uint8: ceil(log2 M) bits per kept value = its position inside its group of M, LSB first
    P.slr.bitmask   uint8: 1 bit per weight, row-major, LSB first    } unstructured: whichever of the
    P.slr.crow/col  int32|int64 row pointers / int16|int32 columns   } two is smaller
    P.slr.U [d_out, r], P.slr.V [r, d_in]                           (factor dtype; a shared V is stored
                                                                     once, by the first consumer)
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

FORMAT = "slr"
FORMAT_VERSION = 1
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
def theoretical_bytes(d_out: int, d_in: int, nnz: int, rank: int, *, nm: tuple[int, int] | None = None,
                      values_dtype: torch.dtype = torch.float16, factor_dtype: torch.dtype = torch.float16,
                      count_v: bool = True) -> dict[str, int]:
    """Bytes a compressed matrix should take: values + index + factors.

    N:M: nnz * value bytes + ceil(nnz * ceil(log2 M) / 8); unstructured: min(bitmask, CSR) index;
    factors: r * (d_out + d_in) * factor bytes (r * d_out when a shared V is counted elsewhere).
    """
    vb = nnz * values_dtype.itemsize
    if nnz == 0:
        ib = 0
    elif nm is not None:
        ib = math.ceil(nnz * nm_index_bits(nm[1]) / 8)
    else:
        ib = min(unstructured_index_bytes(d_out, d_in, nnz).values())
    fb = rank * (d_out + (d_in if count_v else 0)) * factor_dtype.itemsize
    return {"values": vb, "index": ib, "factors": fb, "total": vb + ib + fb}


def _pack_layer(name: str, lin: SLRLinear, owner: str | None, values_dtype, factor_dtype):
    """-> (tensors {name: tensor}, manifest record) for one SLRLinear."""
    d_out, d_in = lin.out_features, lin.in_features
    t: dict[str, torch.Tensor] = {}
    rec: dict = {"shape": [d_out, d_in], "nm": None, "rank": lin.rank, "nnz": lin.nnz,
                 "bias": lin.bias is not None}
    nm = lin.nm
    if lin.values is None:
        rec["format"] = "none"
    else:
        vals = lin.values.detach().cpu().to(values_dtype)
        crow, col = lin.crow.cpu(), lin.col.cpu()
        if nm is not None and not nm_matches(lin.mask().cpu(), nm):
            nm = None  # support no longer N:M (should not happen: the support is fixed)
        if nm is not None:
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
    count_v = False
    if lin.U is not None:
        t[f"{name}.slr.U"] = lin.U.detach().cpu().to(factor_dtype)
        if lin.shared is None:
            rec["v"], count_v = "own", True
            t[f"{name}.slr.V"] = lin.V.detach().cpu().to(factor_dtype)
        else:
            rec["v"], rec["v_from"] = "shared", owner
            if owner == name:
                count_v = True
                t[f"{name}.slr.V"] = lin.shared.V.detach().cpu().to(factor_dtype)
    actual = sum(x.numel() * x.element_size() for x in t.values())
    theory = theoretical_bytes(d_out, d_in, lin.nnz, lin.rank, nm=nm, values_dtype=values_dtype,
                               factor_dtype=factor_dtype, count_v=count_v)
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
