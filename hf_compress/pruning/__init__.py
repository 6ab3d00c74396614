"""Pruning: structural edits, importance scores, the budgeted search and rescaling, callbacks, unstructured sparsity."""

from .config import PruningConfig
from .importance import ImportanceScores, compute_importance, compute_layer_importance
from .magnitude_callback import GradualMagnitudePruningCallback
from .pruner import PruningReport, apply_plan, load_plan, prune, save_plan
from .schedules import CubicSparsitySchedule, cubic_sparsity
from .structured import drop_layers, prune_ffn_neurons, prune_heads, round_ffn_plan
from .structured_callback import GradualStructuredPruningCallback
from .unstructured import SparsityReport, l1_penalty, magnitude_prune, make_permanent, sparsity_report

__all__ = [
    "CubicSparsitySchedule",
    "GradualMagnitudePruningCallback",
    "GradualStructuredPruningCallback",
    "ImportanceScores",
    "PruningConfig",
    "PruningReport",
    "SparsityReport",
    "apply_plan",
    "compute_importance",
    "compute_layer_importance",
    "cubic_sparsity",
    "drop_layers",
    "l1_penalty",
    "load_plan",
    "magnitude_prune",
    "make_permanent",
    "prune",
    "prune_ffn_neurons",
    "prune_heads",
    "round_ffn_plan",
    "save_plan",
    "sparsity_report",
]
