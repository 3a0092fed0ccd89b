"""A plan: the per-matrix spec (sparsity or N:M, rank) that the pipeline solves for.

Keys are ``"{block_index}.{linear_name}"``, e.g. ``"3.mlp.down_proj"``. Allocators produce plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import LayerSpec


def key(block: int, name: str) -> str:
    return f"{block}.{name}"


@dataclass
class Plan:
    specs: dict[str, LayerSpec] = field(default_factory=dict)
    default: LayerSpec | None = None
    # key -> (spec, load(W, H) -> SolveResult | None): a solve an allocator already made for that matrix at that spec
    # (level_solve=pipeline), given the weight and H the pipeline has there; the pipeline takes it instead of solving
    # (None: solve as usual). Not part of to_dict: it lives in this process.
    solved: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def uniform(cls, spec: LayerSpec) -> Plan:
        return cls(default=spec)

    def get(self, block: int, name: str) -> LayerSpec:
        spec = self.specs.get(key(block, name), self.default)
        if spec is None:
            raise KeyError(key(block, name))
        return spec

    def presolved(self, block: int, name: str, spec: LayerSpec, W, H):
        """The SolveResult in ``solved`` for this matrix (weight W, H) when it was solved at exactly ``spec``, else
        None."""
        got = self.solved.get(key(block, name))
        return got[1](W, H) if got is not None and got[0] == spec else None

    def set(self, block: int, name: str, spec: LayerSpec) -> None:
        self.specs[key(block, name)] = spec

    def to_dict(self) -> dict:
        out = {k: _spec_dict(s) for k, s in self.specs.items()}
        if self.default is not None:
            out["*"] = _spec_dict(self.default)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        def spec(v):
            return LayerSpec(**(v | {"nm": tuple(v["nm"]) if v["nm"] else None}))

        return cls(specs={k: spec(v) for k, v in d.items() if k != "*"}, default=spec(d["*"]) if "*" in d else None)


def _spec_dict(s: LayerSpec) -> dict:
    """The spec as plain values; the quantization fields only when S or the factors are quantized (so plans of
    float runs read as they always have)."""
    out = {"sparsity": s.sparsity, "nm": list(s.nm) if s.nm else None, "rank": s.rank}
    if s.bits is not None or s.factor_bits != 16:
        out |= {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "factor_bits": s.factor_bits}
    return out
