"""slr: sparse + low-rank compression of large language models (W ~= S + U V).

Python API::

    import slr
    model, tok, info = slr.load_model("smollm2-135m")
    report = slr.compress_(model, slr.CompressConfig(method="admm", pattern="2:4", rank=32), calib)
    print(slr.perplexity(model, tok, text).ppl)
    slr.save(model, "out/", tokenizer=tok); model2, tok2 = slr.load("out/")
"""

from .config import CompressConfig, LayerSpec
from .errors import SLRError
from .eval.ppl import perplexity
from .io import export_dense, load, save
from .models import load_model
from .pipeline import compress_
from .plan import Plan

__version__ = "0.1.0"
__all__ = ["CompressConfig", "LayerSpec", "Plan", "SLRError", "compress_", "export_dense", "load", "load_model",
           "perplexity", "save"]
