"""Constants shared by `PruningConfig` and the modules that implement it.

`PruningConfig` validates against these; the implementations (`importance`, `search`, `unstructured`) import them from
here, so the config never imports an implementation module.
"""

# `PruningConfig.importance` values: how heads and neurons are scored (see `hf_compress.pruning.importance`).
IMPORTANCE_METHODS = ("magnitude", "taylor", "fisher")

# `PruningConfig.layer_importance` values: how whole layers are scored for depth pruning.
LAYER_IMPORTANCE_METHODS = ("cosine", "loss")

# `PruningConfig.target` values: what the budget counts (encoder FLOPs, head and FFN parameters, unit fractions, or
# the model's latency as measured in a latency table, see `hf_compress.pruning.latency_table`).
TARGETS = ("flops", "params", "ratios", "latency")

# The file a latency table is saved as, next to the run that measured it (`LatencyTable.save`).
LATENCY_TABLE_NAME = "latency_table.json"

# Where units are ranked: across the whole model (`"global"`) or within each layer / module (`"layer"`). Shared by
# `PruningConfig.scope` and the `scope` of `magnitude_prune` and `GradualMagnitudePruningCallback`.
SCOPES = ("global", "layer")
