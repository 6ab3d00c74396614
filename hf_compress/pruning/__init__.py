"""Pruning: structural edits, importance scores, the budgeted search and rescaling, callbacks, unstructured sparsity.

Budgets of FLOPs, parameters or unit fractions are searched in `search.py`; a budget of measured latency
(`target="latency"`) uses a latency table (`latency_table.py`: measured per device, thread count and shape, saved as
JSON) and its own search over layer shapes (`latency_search.py`).
"""

from .config import PruningConfig
from .importance import ImportanceScores, compute_importance, compute_layer_importance
from .latency_table import LatencyKey, LatencyTable, measure_latency_table
from .magnitude_callback import GradualMagnitudePruningCallback
from .pruner import PruningReport, apply_plan, load_plan, make_plan, prune, save_plan
from .rescale import fit_rescale
from .schedules import CubicSparsitySchedule, cubic_sparsity
from .search import Selection, select_units, unit_costs
from .structured import drop_layers, prune_ffn_neurons, prune_heads, round_ffn_plan
from .structured_callback import GradualStructuredPruningCallback
from .unstructured import SparsityReport, magnitude_prune, make_permanent, sparsity_report

__all__ = [
    "CubicSparsitySchedule",
    "GradualMagnitudePruningCallback",
    "GradualStructuredPruningCallback",
    "ImportanceScores",
    "LatencyKey",
    "LatencyTable",
    "PruningConfig",
    "PruningReport",
    "Selection",
    "SparsityReport",
    "apply_plan",
    "compute_importance",
    "compute_layer_importance",
    "cubic_sparsity",
    "drop_layers",
    "fit_rescale",
    "load_plan",
    "magnitude_prune",
    "make_permanent",
    "make_plan",
    "measure_latency_table",
    "prune",
    "prune_ffn_neurons",
    "prune_heads",
    "round_ffn_plan",
    "save_plan",
    "select_units",
    "sparsity_report",
    "unit_costs",
]
