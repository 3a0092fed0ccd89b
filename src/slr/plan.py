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

    @classmethod
    def uniform(cls, spec: LayerSpec) -> Plan:
        return cls(default=spec)

    def get(self, block: int, name: str) -> LayerSpec:
        spec = self.specs.get(key(block, name), self.default)
        if spec is None:
            raise KeyError(key(block, name))
        return spec

    def set(self, block: int, name: str, spec: LayerSpec) -> None:
        self.specs[key(block, name)] = spec

    def to_dict(self) -> dict:
        out = {k: {"sparsity": s.sparsity, "nm": list(s.nm) if s.nm else None, "rank": s.rank}
               for k, s in self.specs.items()}
        if self.default is not None:
            d = self.default
            out["*"] = {"sparsity": d.sparsity, "nm": list(d.nm) if d.nm else None, "rank": d.rank}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        def spec(v):
            return LayerSpec(sparsity=v["sparsity"], nm=tuple(v["nm"]) if v["nm"] else None, rank=v["rank"])

        return cls(specs={k: spec(v) for k, v in d.items() if k != "*"}, default=spec(d["*"]) if "*" in d else None)
