"""Shared test setup: never reach a model hub; one SmolLM2-135M load per session for the slow tests.

Slow tests (``@pytest.mark.slow``) use the real default cache (``$SLR_CACHE`` or ``~/.cache/slr``); nothing here
skips them by default -- deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOL = "smollm2-135m"


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer, ModelInfo) of the default SmolLM2-135M, loaded once (fp32, CPU). Do not mutate it:
    tests that compress take a ``copy.deepcopy`` of the model."""
    from slr.models import load_model

    return load_model(SMOL, device="cpu")
