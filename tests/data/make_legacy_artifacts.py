"""Write the frozen artifacts under tests/data/legacy/ that tests/test_legacy_artifacts.py must keep loading.

These are artifacts as a released slr wrote them (format_version 1). They were made ONCE with the code at commit
5dc985c (the last release's io.py, before io.py was split into slr.formats + slr.io) and committed; do not
regenerate them with newer code, or the test stops checking backward compatibility. To rebuild from that commit:

    git worktree add /tmp/slr-5dc985c 5dc985c
    cp tests/data/make_legacy_artifacts.py /tmp/slr-5dc985c/tests/data/
    cd /tmp/slr-5dc985c && HF_HUB_OFFLINE=1 PYTHONPATH=src python tests/data/make_legacy_artifacts.py OUT_DIR

(OUT_DIR defaults to tests/data/legacy beside this script.) Each artifact is a tiny random HF model (2 layers,
64 wide; ``slr.models.tiny``) compressed by ``slr.compress_`` and written by ``slr.save``:

  llama_nm24_r4     LLaMA, OATS 2:4 + rank 4 (N:M index, own V); fp16 values/factors (the defaults); tokenizer
  opt_u60_r4_csr    OPT (biases), Wanda-calibrated OATS, unstructured 60% + rank 4 (bitmask), the MLP matrices at
                    97% sparsity (CSR index); fp32 values/factors; sharded into several safetensors files
  qwen3_joint_r4    Qwen3, joint rank 4 (rank-only layers, one V shared per group: "v": "shared"); bf16 values,
                    fp16 factors, fp16 dense remainder

reference.safetensors holds, for each artifact NAME, ``NAME.input_ids`` (a fixed [2, 12] batch) and
``NAME.logits``: the fp32 logits of ``slr.load(NAME)`` by the code that wrote it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tokenizers
import torch
import transformers as T
from safetensors.torch import save_file
from tokenizers import models, pre_tokenizers

import slr
from slr.config import CompressConfig, LayerSpec
from slr.models.tiny import tiny_model
from slr.plan import Plan

HERE = Path(__file__).resolve().parent


def _tokenizer():
    tk = tokenizers.Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0")


def _calib(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (8, 32), generator=g)


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    refs: dict[str, torch.Tensor] = {}

    model = tiny_model("llama", seed=1)
    slr.compress_(model, CompressConfig(method="oats", pattern="2:4", rank=4, solver_opts={"iters": 4}), _calib(1),
                  progress=False)
    slr.save(model, out / "llama_nm24_r4", tokenizer=_tokenizer(), manifest={"source": {"model": "tiny-llama"}},
             overwrite=True)

    model = tiny_model("opt", seed=2)
    plan = Plan(default=LayerSpec(sparsity=0.6, rank=4))
    for b in range(2):
        for name in ("fc1", "fc2"):
            plan.set(b, name, LayerSpec(sparsity=0.97, rank=4))
    slr.compress_(model, CompressConfig(method="oats", sparsity=0.6, rank=4, solver_opts={"iters": 4}), _calib(2),
                  plan=plan, progress=False)
    slr.save(model, out / "opt_u60_r4_csr", values_dtype=torch.float32, factor_dtype=torch.float32,
             max_shard_bytes=120_000, overwrite=True)

    model = tiny_model("qwen3", seed=3)
    slr.compress_(model, CompressConfig(method="joint", sparsity=None, rank=4), None, progress=False)
    slr.save(model, out / "qwen3_joint_r4", values_dtype=torch.bfloat16, factor_dtype=torch.float16,
             dense_dtype=torch.float16, overwrite=True)

    for i, name in enumerate(("llama_nm24_r4", "opt_u60_r4_csr", "qwen3_joint_r4")):
        x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(100 + i))
        m, _ = slr.load(out / name)
        with torch.no_grad():
            refs[f"{name}.input_ids"] = x
            refs[f"{name}.logits"] = m(x).logits.float().contiguous()
    save_file(refs, str(out / "reference.safetensors"))


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "legacy")
