"""Deployment: loading compressed checkpoints, int8, latency, model cards and the Hub."""

from .checkpoint import from_pretrained_compressed, load_compressed
from .comparison import build_comparison, describe_model
from .hub import push_compressed_to_hub
from .latency import device_name, measure_latency
from .model_card import create_model_card
from .quantization import from_pretrained_int8, quantize_dynamic_int8

__all__ = [
    "build_comparison",
    "create_model_card",
    "describe_model",
    "device_name",
    "from_pretrained_compressed",
    "from_pretrained_int8",
    "load_compressed",
    "measure_latency",
    "push_compressed_to_hub",
    "quantize_dynamic_int8",
]
