"""Deployment: loading compressed checkpoints, int8, latency, model cards and the Hub."""

from .checkpoint import from_pretrained_compressed, load_compressed
from .comparison import build_comparison, describe_latency, describe_model
from .hub import push_compressed_to_hub
from .latency import device_name, measure_latency
from .latency_compare import LatencyComparison, compare_latency
from .model_card import create_model_card
from .onnx_export import OnnxExport, export_onnx
from .onnx_quantization import quantize_onnx
from .onnx_runtime import OnnxModel, inspect_onnx
from .quantization import from_pretrained_int8, quantize_dynamic_int8

__all__ = [
    "LatencyComparison",
    "OnnxExport",
    "OnnxModel",
    "build_comparison",
    "compare_latency",
    "create_model_card",
    "describe_latency",
    "describe_model",
    "device_name",
    "export_onnx",
    "from_pretrained_compressed",
    "from_pretrained_int8",
    "inspect_onnx",
    "load_compressed",
    "measure_latency",
    "push_compressed_to_hub",
    "quantize_dynamic_int8",
    "quantize_onnx",
]
