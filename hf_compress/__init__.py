"""hf-compress: distillation and structured pruning for Hugging Face transformers."""

from .architectures import ArchitectureSpec, get_spec, register_architecture, supported_model_types
from .checkpoint import load_compressed
from .data import HubUnreachableError, load_text_classification_dataset, require_hub_or_local
from .distillation_config import DistillationTrainingArguments
from .distillation_trainer import DistillationTrainer
from .hub import push_compressed_to_hub
from .importance import ImportanceScores, compute_importance, compute_layer_importance
from .latency import measure_latency
from .magnitude_callback import GradualMagnitudePruningCallback
from .model_card import build_comparison, create_model_card, describe_model
from .pruner import PruningReport, apply_plan, load_plan, prune, save_plan
from .pruning_callback import GradualStructuredPruningCallback
from .pruning_config import PruningConfig
from .quantization import from_pretrained_int8, quantize_dynamic_int8
from .report import CompressionReport, ModelSummary, compression_report, format_bytes
from .schedules import CubicSparsitySchedule, cubic_sparsity
from .structured import (
    ModelStructure,
    drop_layers,
    get_structure,
    prune_ffn_neurons,
    prune_heads,
    round_ffn_plan,
)
from .students import bert_to_distilbert, create_student, select_layers
from .teacher_cache import TeacherCache, TeacherCacheCorruptedError
from .unstructured import SparsityReport, l1_penalty, magnitude_prune, make_permanent, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "CompressionReport",
    "CubicSparsitySchedule",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "GradualMagnitudePruningCallback",
    "GradualStructuredPruningCallback",
    "HubUnreachableError",
    "ImportanceScores",
    "ModelStructure",
    "ModelSummary",
    "PruningConfig",
    "PruningReport",
    "SparsityReport",
    "TeacherCache",
    "TeacherCacheCorruptedError",
    "__version__",
    "apply_plan",
    "bert_to_distilbert",
    "build_comparison",
    "compression_report",
    "compute_importance",
    "compute_layer_importance",
    "create_model_card",
    "create_student",
    "cubic_sparsity",
    "describe_model",
    "drop_layers",
    "format_bytes",
    "from_pretrained_int8",
    "get_spec",
    "get_structure",
    "l1_penalty",
    "load_compressed",
    "load_plan",
    "load_text_classification_dataset",
    "magnitude_prune",
    "make_permanent",
    "measure_latency",
    "prune",
    "prune_ffn_neurons",
    "prune_heads",
    "push_compressed_to_hub",
    "quantize_dynamic_int8",
    "register_architecture",
    "require_hub_or_local",
    "round_ffn_plan",
    "save_plan",
    "select_layers",
    "sparsity_report",
    "supported_model_types",
]
