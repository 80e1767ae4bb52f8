"""Base models (built-in, folder, GGUF, Hugging Face id), quantization dispatch and adapter creation."""

from fedtune.models.base_update import apply_base_update
from fedtune.models.loader import LoadedModel, attach_adapter, load_base, load_model, pick_device
from fedtune.models.registry import ModelNotFoundError, resolve

__all__ = ["LoadedModel", "ModelNotFoundError", "apply_base_update", "attach_adapter", "load_base", "load_model",
           "pick_device", "resolve"]
