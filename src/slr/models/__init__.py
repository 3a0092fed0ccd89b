"""Model zoo, loading and architecture adapters."""

from .adapters import ADAPTERS, ArchAdapter, get_adapter
from .load import ModelInfo, load_model, resolve
from .zoo import DEFAULTS

__all__ = ["ADAPTERS", "ArchAdapter", "DEFAULTS", "ModelInfo", "get_adapter", "load_model", "resolve"]
