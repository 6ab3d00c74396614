"""hf-compress: distillation and structured pruning for Hugging Face transformers."""

from .architectures import ArchitectureSpec, get_spec, register_architecture, supported_model_types

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "__version__",
    "get_spec",
    "register_architecture",
    "supported_model_types",
]
