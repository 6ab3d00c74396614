"""Constants shared by `PruningConfig` and the modules that implement it.

`PruningConfig` validates against these; the implementations (`importance`, `search`, `unstructured`) import them from
here, so the config never imports an implementation module.
"""

# `PruningConfig.importance` values: how heads and neurons are scored (see `hf_compress.pruning.importance`).
IMPORTANCE_METHODS = ("magnitude", "taylor", "fisher")

# `PruningConfig.layer_importance` values: how whole layers are scored for depth pruning.
LAYER_IMPORTANCE_METHODS = ("cosine", "loss")

# `PruningConfig.target` values: what the budget counts (encoder FLOPs, head and FFN parameters, or unit fractions).
TARGETS = ("flops", "params", "ratios")

# Where units are ranked: across the whole model (`"global"`) or within each layer / module (`"layer"`). Shared by
# `PruningConfig.scope` and the `scope` of `magnitude_prune` and `GradualMagnitudePruningCallback`.
SCOPES = ("global", "layer")
