"""Per-block checkpoints for resuming an interrupted compression (``slr compress --out DIR --resume``).

Layout of a checkpoint directory (``DIR``'s staging folder, see api.run_compress):

  meta.json                 {"format": 1, "fingerprint": {...}}: what must match for --resume to be allowed
  block_0003.safetensors    the block's solver results (S, mask, U, V per matrix; a V shared by a group once; the
                            (scale, zero) of quantized parts as ``<name>.q<part>.scale|zero``, their grids in the
                            metadata) and, after transformer matching, the block's whole state_dict (``state.<param>``)
  block_0003.json           the block's MatrixRecords and seconds; written last, so it marks the block complete

Every file is written to a temporary name and renamed. On resume the completed blocks are rebuilt from their files
(``_apply_results`` on the saved results, then the saved state), the calibration inputs are propagated through them
exactly as in the first run, and compression continues with the next block, so the artifact is bit-identical to
an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import CompressConfig
from .errors import SLRError
from .fsutil import atomic_file, write_json_atomic, write_text_atomic
from .qlinear import spec_dict, spec_from
from .solvers import SolveResult

FORMAT = 1


def tensor_sha256(t: torch.Tensor | None) -> str | None:
    """sha256 of a tensor's bytes (contiguous CPU copy), or None."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def _with_new_defaults(fingerprint: dict) -> dict:
    """The saved fingerprint with its config read back through CompressConfig: options that a later slr added take
    their defaults (which reproduce the older runs), so adding one does not block a --resume."""
    cfg = fingerprint.get("config")
    if not isinstance(cfg, dict):
        return fingerprint
    try:
        return fingerprint | {"config": CompressConfig.from_dict(cfg).to_dict()}
    except SLRError:
        return fingerprint  # an unreadable config differs anyway, and _diff names it


class BlockCheckpoints:
    """Completed blocks of one run, in ``path``; ``fingerprint`` must equal the saved one to resume."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool, writer: bool = True,
                 sync=lambda: None):
        """Validate an existing checkpoint against ``fingerprint`` (every rank), then ``sync()``; the ``writer``
        (rank 0) creates a missing one, then ``sync()`` again."""
        self.path = Path(path)
        self.writer = writer
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from JSON
        meta = self.path / "meta.json"
        exists = meta.exists()
        if exists:
            if not resume:
                raise SLRError(f"an interrupted run left checkpoints in {self.path}",
                               "rerun the same command with --resume to continue it, or pass --overwrite to start over")
            try:
                saved = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise SLRError(f"checkpoint metadata {meta} is unreadable", "pass --overwrite to start over") from None
            if saved.get("format") != FORMAT:
                raise SLRError(f"checkpoints in {self.path} have format {saved.get('format')}, this slr writes "
                               f"{FORMAT}", "pass --overwrite to start over")
            changed = _diff(_with_new_defaults(saved.get("fingerprint", {})), self.fingerprint)
            if changed:
                raise SLRError(f"--resume with a changed run: {', '.join(changed[:4])} differ from the interrupted "
                               "run's", "rerun with the original options, or pass --overwrite to start over")
        sync()
        if not exists and writer:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(meta, {"format": FORMAT, "fingerprint": self.fingerprint})
        sync()

    def _files(self, i: int) -> tuple[Path, Path]:
        return self.path / f"block_{i:04d}.safetensors", self.path / f"block_{i:04d}.json"

    def completed(self) -> int:
        """Number of leading blocks 0..k-1 whose checkpoint is complete."""
        k = 0
        while all(f.exists() for f in self._files(k)):
            k += 1
        return k

    def save(self, i: int, results: dict[str, SolveResult], records: list[dict], seconds: dict[str, float],
             state: dict[str, torch.Tensor] | None = None, refine: dict | None = None) -> None:
        """Block i's solver results, records and seconds; ``state``: its state after a refinement, whose stats
        (``refine``) come back from ``refine_stats(i)`` on resume."""
        tensors: dict[str, torch.Tensor] = {}
        shared: dict[str, str] = {}
        first_v: dict[int, str] = {}
        grids: dict[str, dict] = {}
        for n, r in results.items():
            for part, (scale, zero) in r.qparams.items():
                tensors[f"{n}.q{part}.scale"] = scale.detach().cpu().float().clone()
                tensors[f"{n}.q{part}.zero"] = zero.detach().cpu().float().clone()
            if r.qspec:
                grids[n] = {part: spec_dict(q) for part, q in r.qspec.items()}
            for field in ("S", "mask", "U"):
                t = getattr(r, field)
                if t is not None:
                    tensors[f"{n}.{field}"] = t.detach().cpu().contiguous()
            if r.V is not None:
                owner = first_v.setdefault(id(r.V), n)
                if owner == n:
                    tensors[f"{n}.V"] = r.V.detach().cpu().contiguous()
                else:
                    shared[n] = owner
        for k, v in (state or {}).items():
            tensors[f"state.{k}"] = v.detach().cpu().contiguous().clone()
        st, js = self._files(i)
        with atomic_file(st) as tmp:
            save_file(tensors, str(tmp), metadata={"slr": json.dumps({"names": list(results), "shared_v": shared,
                                                                        "qspec": grids})})
        write_text_atomic(js, json.dumps({"records": records, "seconds": seconds, "state": state is not None,
                                          **({"refine": refine} if refine is not None else {})}))

    def refine_stats(self, i: int) -> dict | None:
        """The refinement stats saved with block i (None: none, or a checkpoint from before they were saved)."""
        try:
            return json.loads(self._files(i)[1].read_text(encoding="utf-8")).get("refine")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise SLRError(f"checkpoint of block {i} in {self.path} is unreadable",
                           "pass --overwrite to start over") from None

    def load(self, i: int) -> tuple[dict[str, SolveResult], list[dict], dict[str, float], dict | None]:
        st, js = self._files(i)
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            tensors = load_file(str(st))
            with safe_open(str(st), "pt") as f:
                info = json.loads(f.metadata()["slr"])
            names, shared, grids = info["names"], info["shared_v"], info.get("qspec", {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError):
            raise SLRError(f"checkpoint of block {i} in {self.path} is unreadable",
                           "pass --overwrite to start over") from None
        results = {}
        for n in names:
            results[n] = SolveResult(S=tensors.get(f"{n}.S"), mask=tensors.get(f"{n}.mask"), U=tensors.get(f"{n}.U"),
                                     V=tensors.get(f"{n}.V"),
                                     qparams={p: (tensors[f"{n}.q{p}.scale"], tensors[f"{n}.q{p}.zero"])
                                              for p in ("S", "U", "V") if f"{n}.q{p}.scale" in tensors},
                                     qspec={p: spec_from(d) for p, d in grids.get(n, {}).items()})
        for n, owner in shared.items():
            results[n].V = results[owner].V  # the same object again, so the group shares one projection
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")} if meta["state"] else None
        return results, meta["records"], meta["seconds"], state
