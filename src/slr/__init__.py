"""slr: sparse + low-rank compression of large language models (W ~= S + U V).

Python API::

    import slr
    model, tok, info = slr.load_model("smollm2-135m")
    config = slr.CompressConfig(method="admm", pattern="2:4", rank=32,
                                alloc=slr.AllocConfig("knapsack", budget=0.5))
    calib = slr.calibration_data(tok, config, bos_per_window=info.bos_per_window)
    report = slr.compress_(model, config, calib)  # plan, every block, refine: the whole job
    print(slr.perplexity(model, tok, text).ppl)
    slr.save(model, "out/", tokenizer=tok); model2, tok2 = slr.load("out/")

``slr.run_compress(name, config, slr.RunOptions(out="out/"))`` is `slr compress`: load, calibrate, compress,
evaluate, save, with resume, onloading and torchrun.
"""

from .api import calibration_data, run_compress, run_eval
from .config import AllocConfig, CompressConfig, LayerSpec, RefineConfig, RunOptions
from .errors import SLRError
from .eval.ppl import perplexity
from .io import export_dense, load, save
from .models import load_model
from .pipeline import compress_, plan_for
from .plan import Plan

__version__ = "0.1.0"
__all__ = ["AllocConfig", "CompressConfig", "LayerSpec", "Plan", "RefineConfig", "RunOptions", "SLRError",
           "calibration_data", "compress_", "export_dense", "load", "load_model", "perplexity", "plan_for",
           "run_compress", "run_eval", "save"]
