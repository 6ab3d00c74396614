"""Constants shared by the distillation arguments and the modules that implement them.

`DistillationTrainingArguments` validates against these; the implementations (`losses`, `teacher_cache`) import them
from here, so the arguments never import an implementation module.
"""

# `hidden_loss_type` values: per-token MSE (TinyBERT) or 1 - cosine similarity (DistilBERT), see `hidden_state_loss`.
HIDDEN_LOSS_TYPES = ("mse", "cosine")

# `teacher_cache_dtype` values: storage dtypes of cached hidden states and attentions (names of `torch` dtypes).
CACHE_DTYPES = ("float32", "float16", "bfloat16")

# `teacher_sharding` values under FSDP2: shard the teacher like the student, or keep a whole copy on every process.
TEACHER_SHARDING = ("shard", "replicate")
