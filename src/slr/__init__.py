"""slr: sparse + low-rank LLM compression."""
