"""`DistillationTrainingArguments`: every `TrainingArguments` field plus the knobs of knowledge distillation."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.utils import logging

from .constants import CACHE_DTYPES, HIDDEN_LOSS_TYPES, TEACHER_SHARDING

logger = logging.get_logger(__name__)


def _parse_layer_mapping(value: dict | str) -> dict[int, int]:
    """A `{student_layer: teacher_layer}` dict of non-negative ints, from a dict or a JSON string (the CLI form)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f'layer_mapping={value!r} is not valid JSON; pass a JSON object such as \'{{"1": 3, "2": 6}}\' '
                "(student layer -> teacher layer)."
            ) from error
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"layer_mapping={value!r} must be a non-empty dict of student layer -> teacher layer, e.g. {{1: 3, 2: 6}}."
        )
    mapping = {}
    for student_layer, teacher_layer in value.items():
        student_index, teacher_index = _layer_index(student_layer), _layer_index(teacher_layer)
        if student_index is None or teacher_index is None:
            raise ValueError(
                f"layer_mapping entry {student_layer!r}: {teacher_layer!r} is invalid; layers are non-negative integer "
                "hidden-state indices (0 = embeddings, i = output of transformer layer i)."
            )
        mapping[student_index] = teacher_index
    return mapping


def _layer_index(value: Any) -> int | None:
    """`value` as a non-negative int (JSON keys arrive as strings), or None when it is not one."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    r"""[`~transformers.TrainingArguments`] for [`DistillationTrainer`]. Only the new arguments are listed here.

    The training loss is
    `alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)
    + hidden_loss_weight * hidden_loss + attention_loss_weight * attention_loss`.

    Evaluation reports the same weighted loss as `eval_loss` (without the L1 term), and each part as `eval_soft_loss`,
    `eval_hard_loss`, `eval_hidden_loss` and `eval_attention_loss`, averaged over the whole evaluation set. With
    `load_best_model_at_end=True` and no `metric_for_best_model`, the best checkpoint is the one with the lowest
    `eval_loss`, which mixes agreement with the teacher and with the labels; set `metric_for_best_model="hard_loss"`
    (the loss on the labels alone) or a metric of your `compute_metrics` (e.g. `"accuracy"`) to select on the labels.

    Args:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature `T > 0` of the soft targets. Higher values expose more of the teacher's "dark
            knowledge" (the relative probabilities of wrong classes). Unused for regression heads.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight in `[0, 1]` of the soft (teacher) loss; `1 - alpha` weighs the hard-label loss. `alpha=0` is plain
            fine-tuning (exactly the `Trainer` loss), `alpha=1` pure distillation (labels optional).
        hidden_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the hidden-state loss between mapped layers (TinyBERT / DistilBERT). `0` turns it off.
        hidden_loss_type (`str`, *optional*, defaults to `"mse"`):
            `"mse"` (TinyBERT) or `"cosine"` (`1 - cos`, DistilBERT).
        attention_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the KL between attention distributions of mapped layers (MiniLM / TinyBERT). `0` turns it off.
            Needs a student without attention dropout. Layers are matched by their actual index, also in pruned
            models, whose layers left with no heads return no attention: a mapped pair in which either layer has no
            heads is left out of the attention loss (with a warning; the hidden-state loss still uses it), and a
            mapping whose every pair is left out is refused.
        attention_average_heads (`bool`, *optional*, defaults to `False`):
            How the attention loss compares a pair of mapped layers. `False` compares head `h` with head `h`, so both
            layers must have the same number of heads, counted in the modules (after any head pruning); a mismatch,
            or a [`GradualStructuredPruningCallback`] (which removes student heads during training), is refused at
            construction. `True` compares the distributions averaged over each layer's heads, which needs no equal
            head counts and so works with head-pruned students and gradual pruning.
        layer_mapping (`dict[int, int]` or `str`, *optional*):
            Student layer -> teacher layer for the intermediate losses, as hidden-state indices: `0` is the embedding
            output, `i` the output of transformer layer `i`. A JSON string on the command line (`'{"1": 3, "2": 6}'`).
            Defaults to spreading the student's layers evenly over the teacher's: student layer `i` of `S` maps to
            teacher layer `i * T // S` of `T` (the last layers always meet; embeddings are not mapped).
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments of `from_pretrained` when the teacher is given as a Hub id or path (a JSON string on the
            command line), e.g. `{"revision": "main"}`.
        teacher_cache_dir (`str`, *optional*):
            Folder of teacher-output caches; setting it turns caching on. `train()` first runs the teacher once over
            the training set (in inference mode and the training precision) and stores its logits, plus the mapped
            layers' hidden states / attentions when the intermediate losses are on, in
            `<teacher_cache_dir>/<teacher fingerprint>-<data fingerprint>.safetensors`; every training batch then
            reads them instead of running the teacher, and later runs with the same teacher and training set reuse
            the file. Examples are keyed by their content, so inputs that change between passes (random masking,
            augmentation) raise a `ValueError` instead of training on stale targets. Evaluation keeps the live teacher.
        teacher_cache_dtype (`str`, *optional*):
            Storage dtype of the cached hidden states and attentions: `"float32"`, `"float16"` or `"bfloat16"`
            (half the size of float32). Defaults to the teacher's dtype, which reproduces the live loss exactly. The
            logits always keep the teacher's dtype.
        teacher_sharding (`str`, *optional*, defaults to `"shard"`):
            Where the teacher lives when the student trains with FSDP2 (`fsdp=True`, or `accelerate launch`
            with an FSDP2 config); ignored otherwise. `"shard"` shards it like the student (`fully_shard` on each
            transformer layer and on the whole model, over the student's device mesh; frozen, in eval mode, no
            optimizer state, never saved), so each process holds `1 / num_processes` of its weights and every
            forward all-gathers them layer by layer: every process then runs the teacher on every batch together,
            including the teacher-cache build (each process runs the whole training set in lockstep; one process
            per node writes the file). `"replicate"` keeps a whole copy on every process (no communication; the
            cache is built by the main process alone, as under DDP), faster when the teacher fits on each device.
    """

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T > 0 of the soft targets (DistilBERT used 2). Unused for regression."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight in [0, 1] of the soft (teacher) loss; 1 - alpha weighs the hard-label loss. 0 is plain "
            "fine-tuning, 1 pure distillation (labels optional)."
        },
    )
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state loss between mapped layers; 0 turns it off."},
    )
    hidden_loss_type: str = field(
        default="mse",
        metadata={
            "help": "Hidden-state loss: 'mse' (TinyBERT) or 'cosine' (1 - cos, DistilBERT).",
            "choices": list(HIDDEN_LOSS_TYPES),
        },
    )
    attention_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the KL between attention distributions of mapped layers (MiniLM); 0 turns it off. "
            "Needs no attention dropout in the student, and equal head counts in mapped layers unless "
            "attention_average_heads."
        },
    )
    attention_average_heads: bool = field(
        default=False,
        metadata={
            "help": "Compare head-averaged attention distributions in the attention loss, so mapped layers need not "
            "have the same number of heads (head-pruned students, GradualStructuredPruningCallback). Default: head "
            "by head, which refuses unequal head counts."
        },
    )
    layer_mapping: dict | str | None = field(
        default=None,
        metadata={
            "help": "Student layer -> teacher layer for the intermediate losses, as a JSON object such as "
            '\'{"1": 3, "2": 6}\'. Layers are hidden-state indices: 0 = embeddings, i = output of layer i. '
            "Defaults to spreading the student's layers evenly over the teacher's."
        },
    )
    l1_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an L1 penalty (sum of |w| of the selected linear weights, see `l1_penalty`) added to "
            "the training loss and logged as `l1_loss`; it pushes weights towards zero before magnitude pruning. "
            "0 turns it off; useful values are small (1e-7 to 1e-5), since the sum runs over millions of weights."
        },
    )
    l1_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module-name patterns the L1 penalty covers, as in `magnitude_prune(include=...)`. Default: "
            "every linear layer inside the transformer layers (no embeddings, LayerNorms or task head)."
        },
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of `from_pretrained` when the teacher is a Hub id or path, as a JSON object."
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of teacher-output caches; set it to run the teacher once over the training set and reuse "
            "its outputs every epoch and in later runs with the same teacher and data. Evaluation keeps the live "
            "teacher. Refused for inputs that change between passes (random masking, augmentation)."
        },
    )
    teacher_cache_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Storage dtype of cached hidden states and attentions (float32, float16, bfloat16); default: the "
            "teacher's dtype, which reproduces the live loss exactly. Logits keep the teacher's dtype.",
            "choices": list(CACHE_DTYPES),
        },
    )

    teacher_sharding: str = field(
        default="shard",
        metadata={
            "help": "Under FSDP2 only: 'shard' shards the teacher like the student (every process runs its forward "
            "together), 'replicate' keeps a whole copy on every process.",
            "choices": list(TEACHER_SHARDING),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(
                f"temperature={self.temperature!r} is invalid: it must be a finite number > 0 (typical values 1 to 8)."
            )
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(
                f"alpha={self.alpha!r} is invalid: it is the weight of the soft loss and must lie in [0, 1] "
                "(0 = hard labels only, 1 = teacher only)."
            )
        for name in ("hidden_loss_weight", "attention_loss_weight", "l1_weight"):
            weight = getattr(self, name)
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{name}={weight!r} is invalid: it must be a finite number >= 0 (0 turns it off).")
        if self.hidden_loss_type not in HIDDEN_LOSS_TYPES:
            raise ValueError(
                f"hidden_loss_type={self.hidden_loss_type!r} is not supported; use one of {list(HIDDEN_LOSS_TYPES)}."
            )
        if not isinstance(self.attention_average_heads, bool):
            raise ValueError(
                f"attention_average_heads={self.attention_average_heads!r} must be True (compare head-averaged "
                "attention) or False (compare head by head)."
            )
        if self.attention_average_heads and self.attention_loss_weight == 0:
            logger.warning(
                "attention_average_heads=True is unused because attention_loss_weight is 0; set attention_loss_weight "
                "> 0 to distill attention."
            )
        if self.layer_mapping is not None:
            self.layer_mapping = _parse_layer_mapping(self.layer_mapping)
            if self.hidden_loss_weight == 0 and self.attention_loss_weight == 0:
                logger.warning(
                    "layer_mapping is set but hidden_loss_weight and attention_loss_weight are 0, so it is unused; "
                    "set one of them > 0 to distill intermediate layers."
                )
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not valid JSON; pass a JSON "
                    'object such as \'{"revision": "main"}\'.'
                ) from error
        self._check_teacher_cache()
        if self.teacher_sharding not in TEACHER_SHARDING:
            raise ValueError(
                f"teacher_sharding={self.teacher_sharding!r} is not supported; use 'shard' (shard the teacher like the "
                "student under FSDP2) or 'replicate' (a whole teacher on every process)."
            )
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} must be a dict of `from_pretrained` "
                "keyword arguments."
            )

    def _check_teacher_cache(self) -> None:
        if self.teacher_cache_dir is not None:
            if isinstance(self.teacher_cache_dir, os.PathLike):
                self.teacher_cache_dir = os.fspath(self.teacher_cache_dir)
            if not isinstance(self.teacher_cache_dir, str) or not self.teacher_cache_dir.strip():
                raise ValueError(
                    f"teacher_cache_dir={self.teacher_cache_dir!r} is invalid: pass a folder path (created if missing), "
                    "or None to run the teacher live on every batch."
                )
            if os.path.exists(self.teacher_cache_dir) and not os.path.isdir(self.teacher_cache_dir):
                raise ValueError(
                    f"teacher_cache_dir={self.teacher_cache_dir!r} is a file; pass a folder to hold the cache files."
                )
        if self.teacher_cache_dtype is not None:
            if self.teacher_cache_dtype not in CACHE_DTYPES:
                raise ValueError(
                    f"teacher_cache_dtype={self.teacher_cache_dtype!r} is not supported; use one of "
                    f"{list(CACHE_DTYPES)}, or None to keep the teacher's dtype."
                )
            if self.teacher_cache_dir is None or not self.uses_intermediate_layers:
                logger.warning(
                    f"teacher_cache_dtype={self.teacher_cache_dtype!r} only applies to cached hidden states and "
                    "attentions, so it is unused without teacher_cache_dir and an intermediate (hidden-state or "
                    "attention) loss."
                )

    @property
    def uses_intermediate_layers(self) -> bool:
        """Whether a hidden-state or attention loss is on."""
        return self.hidden_loss_weight > 0 or self.attention_loss_weight > 0
