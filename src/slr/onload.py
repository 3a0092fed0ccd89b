"""Layer onloading: compress a model that does not fit in memory, one decoder block at a time.

The model is built on the meta device (no weight memory); only the parts outside the blocks (embeddings, final
norm, head, rotary tables) are materialised, from the safetensors shards. ``BlockSource.load(i, block)`` fills
block i from the memory-mapped shards just before the pipeline needs it; ``release(block)`` sends it back to the
meta device once its compressed form is in the run's block checkpoints. Calibration activations can live on disk
too (``calibration.DiskActivations``: one file per batch, one batch in memory at a time). Peak memory is then about the
non-block part + one block in flight (its fp32 weights, H's and solver workspace) + the activations in memory.
After the last block the save streams the compressed blocks from the checkpoints one at a time
(``pipeline.CompressedBlocks``, ``io.save(blocks=...)``); only an in-memory evaluation rebuilds them all.

Limits: the global allocators (knapsack, cap, owl) read every matrix up front and are refused with --onload;
torchrun is refused too (each rank would need the checkpoints of all ranks).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import SLRError
from .models.adapters import get_adapter
from .models.load import needs_bos, resolve


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise SLRError(f"{folder} has no safetensors weights (model.safetensors or its index)",
                   "onloading reads safetensors shards: re-save the model with save_pretrained()")


def _meta_left(module: nn.Module) -> list[str]:
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]


class BlockSource:
    """Tensors of a safetensors HF folder; a block's tensors are read on demand (memory-mapped, then unmapped)."""

    def __init__(self, folder: str | Path, blocks_path: str):
        self.folder = Path(folder)
        self.prefix = blocks_path + "."
        self.where: dict[str, Path] = {}
        try:
            for f in _shards(self.folder):
                with safe_open(str(f), framework="pt") as h:  # the header only: which shard holds which tensor
                    for k in h.keys():
                        self.where[k] = f
        except SLRError:
            raise
        except Exception as e:
            raise SLRError(f"cannot open the safetensors shards of {self.folder}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:100]}", "re-copy the model's weights") from None

    def tensors(self, select) -> dict[str, torch.Tensor]:
        """The selected tensors, read through handles opened for this call only.

        A safetensors handle memory-maps its shard, and every page a read touches stays in this process's resident
        set while the handle lives: with long-lived handles RSS grew by each block's weights (13.5 MiB a block on
        SmolLM2, 0.65 -> 1.06 GiB over 30 blocks). Dropping the handles after each read unmaps them.
        """
        out: dict[str, torch.Tensor] = {}
        for f in dict.fromkeys(f for k, f in self.where.items() if select(k)):
            h = safe_open(str(f), framework="pt", device="cpu")
            out.update({k: h.get_tensor(k).clone() for k, g in self.where.items() if g == f and select(k)})
            del h
        return out

    def non_block(self) -> dict[str, torch.Tensor]:
        return self.tensors(lambda k: not k.startswith(self.prefix))

    def load(self, i: int, block: nn.Module) -> None:
        """Materialise block ``i`` (on the meta device) on the CPU from the shards."""
        p = f"{self.prefix}{i}."
        sd = {k[len(p):]: v for k, v in self.tensors(lambda k: k.startswith(p)).items()}
        block.to_empty(device="cpu")  # load_state_dict then copies (and casts) the shard tensors in
        missing, unexpected = block.load_state_dict(sd, strict=False)
        left = _meta_left(block) or [m for m in missing if m in dict(block.named_parameters())]
        if left or unexpected:
            raise SLRError(f"block {i} of {self.folder} does not match its config (missing {left[:3]}, unexpected "
                           f"{unexpected[:3]})", "check that the shards and config.json belong to the same model")

    @staticmethod
    def release(block: nn.Module) -> None:
        """Free a block's memory (its tensors go back to the meta device)."""
        block.to("meta")


def skeleton(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, BlockSource]:
    """A causal LM from ``folder`` with every block on the meta device and the rest loaded. Returns (model, source)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    ad = get_adapter(model)
    parent_path, _, attr = ad.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())  # so that to_empty below skips the blocks
    try:
        fresh_needed = [(n, m) for n, m in model.named_modules() if m._non_persistent_buffers_set]
        model.to_empty(device="cpu")
        src = BlockSource(folder, ad.blocks_path)
        model.load_state_dict(src.non_block(), strict=False)
        if getattr(cfg, "tie_word_embeddings", False) or getattr(getattr(cfg, "get_text_config", lambda: cfg)(),
                                                                  "tie_word_embeddings", False):
            model.tie_weights()
        if fresh_needed:  # non-persistent tables (rotary inv_freq, embedding scales) are not in the shards
            values = _non_persistent_values(cfg, dtype)
            for name, mod in fresh_needed:
                for b in mod._non_persistent_buffers_set:
                    full = f"{name}.{b}" if name else b
                    if full not in values or values[full].shape != getattr(mod, b).shape:
                        raise SLRError(f"onloading cannot rebuild the buffer {full}",
                                       "compress this model without --onload")
                    setattr(mod, b, values[full].clone())
        left = _meta_left(model)
        if left:
            raise SLRError(f"onloading cannot materialise {left[0]} of {folder}",
                           "compress this model without --onload")
    finally:
        setattr(parent, attr, blocks)
    return model.eval(), src


def _non_persistent_values(cfg, dtype) -> dict[str, torch.Tensor]:
    """Non-persistent buffers outside the blocks, from a real 1-block, 8-token-vocabulary copy of the model (they
    depend on the widths and rope settings, not on the depth or the vocabulary)."""
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(cfg)
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    ids = [getattr(text, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    text.vocab_size = 1 + max([8] + [i for i in ids if isinstance(i, int)])
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:1])
    m = AutoModelForCausalLM.from_config(small, dtype=dtype)
    return {n: b for n, b in m.named_buffers() if ".layers." not in n}


def check_request(config, out_dir: Path | None, world: int, model_name: str, onload: bool) -> None:
    """Refuse, before any work, what onloading cannot do (see the module docstring)."""
    flag = "--onload" if onload else "--offload-activations"
    if out_dir is None:
        raise SLRError(f"{flag} keeps the compressed blocks and activations in the output's staging folder",
                       "pass --out DIR")
    if not onload:
        return
    if config.alloc.method != "uniform":
        raise SLRError(f"--allocate {config.alloc.method} reads every matrix up front, which --onload avoids",
                       "drop --onload, or use the uniform allocator")
    if world > 1:
        raise SLRError("--onload does not run under torchrun yet", "drop --onload, or run one process")


def open_onloaded(model_name: str):
    """(skeleton model, tokenizer, info dict, BlockSource) for a default name, .gguf or HF folder."""
    from transformers import AutoTokenizer

    folder, mi = resolve(model_name)
    try:
        model, source = skeleton(folder)
    except SLRError:
        raise
    except Exception as e:
        raise SLRError(f"cannot build {folder} on the meta device: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                       "check that the folder is a complete HF causal LM, or drop --onload") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SLRError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0][:120]}",
                       "add tokenizer files") from None
    info = {"name": mi.name, "label": mi.label, "sha256": mi.sha256, "bos_per_window": needs_bos(model, tok)}
    return model, tok, info, source
