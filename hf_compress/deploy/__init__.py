"""Deployment: loading compressed checkpoints, int8, latency, model cards and the Hub."""

from .checkpoint import load_compressed
from .hub import push_compressed_to_hub
from .latency import measure_latency
from .model_card import build_comparison, create_model_card, describe_model
from .quantization import from_pretrained_int8, quantize_dynamic_int8

__all__ = [
    "build_comparison",
    "create_model_card",
    "describe_model",
    "from_pretrained_int8",
    "load_compressed",
    "measure_latency",
    "push_compressed_to_hub",
    "quantize_dynamic_int8",
]
