"""Checks and helpers of `DistillationTrainer`'s setup: the task of a model, the teacher, the layer mapping, and
whether a student and a teacher can be distilled at all (every failure a `ValueError` naming both values and the fix).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import logging

from ..architectures import get_layers, get_spec, supported_model_types
from ..deploy.checkpoint import load_compressed
from ..pruning.structured_callback import GradualStructuredPruningCallback
from ..remote_code.modeling_hf_compress import CONFIG_KEY
from ..structure import get_structure

logger = logging.get_logger(__name__)

# `from_pretrained` arguments that say where the files are (and whether custom config code may run): reading the
# teacher's config with them finds the same files as loading the teacher.
_CONFIG_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "trust_remote_code",
)

# Attention-dropout fields of the supported configs: returned attention probabilities include dropout in training.
_ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")


@dataclass(frozen=True)
class _Task:
    name: str
    auto_class: type
    class_names: dict[str, str]
    token_level: bool


_TASKS = (
    _Task(
        "sequence classification",
        AutoModelForSequenceClassification,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        False,
    ),
    _Task("token classification", AutoModelForTokenClassification, MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, True),
    _Task("masked language modeling", AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING_NAMES, True),
)


def _task_of(model: PreTrainedModel) -> _Task:
    """The distillation task of `model`, found from its class (subclasses of a supported head included)."""
    class_names = {cls.__name__ for cls in type(model).__mro__}
    model_type = getattr(model.config, "model_type", None)
    for task in _TASKS:
        if task.class_names.get(model_type) in class_names:
            return task
    supported = ", ".join(task.auto_class.__name__ for task in _TASKS)
    raise ValueError(
        f"DistillationTrainer does not support {type(model).__name__}: use a model loaded with one of {supported}."
    )


def _forward_arg_names(model: nn.Module) -> frozenset[str]:
    """The named arguments of `model.forward` (`**kwargs` excluded: what lands there may be rejected downstream)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _is_regression(config) -> bool:
    return config.problem_type == "regression" or (config.problem_type is None and config.num_labels == 1)


def _load_teacher(teacher_model: PreTrainedModel | str, student: PreTrainedModel, args) -> PreTrainedModel:
    """The teacher itself, or the Hub id / local path loaded with `args.teacher_model_init_kwargs`.

    A checkpoint pruned by hf-compress (its config carries the per-layer structure, or transformers 4
    `pruned_heads`) is loaded with `load_compressed`, with the task head it was saved with; any other checkpoint with
    the student's Auto class.
    """
    if isinstance(teacher_model, os.PathLike):
        teacher_model = os.fspath(teacher_model)
    if isinstance(teacher_model, str):
        kwargs = dict(args.teacher_model_init_kwargs or {})
        location = _teacher_location(teacher_model)
        config = _teacher_config(teacher_model, location, kwargs)
        if hasattr(config, CONFIG_KEY) or getattr(config, "pruned_heads", None):
            # Stock `from_pretrained` builds every layer at full width and refuses the pruned weights.
            logger.info(f"Loading the teacher {teacher_model!r}, pruned by hf-compress, with load_compressed.")
            return load_compressed(location, **kwargs)
        auto_class = _task_of(student).auto_class
        logger.info(f"Loading the teacher {teacher_model!r} with {auto_class.__name__}.")
        return auto_class.from_pretrained(location, **kwargs)
    if not isinstance(teacher_model, PreTrainedModel):
        raise ValueError(
            f"teacher_model must be a PreTrainedModel or a Hub id / local path, got {type(teacher_model).__name__}."
        )
    return teacher_model


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path: Hub ids are `name` or `namespace/name`."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or os.path.isabs(name)
        or sum(name.count(separator) for separator in separators) > 1
    )


def _teacher_location(name: str) -> str:
    """The folder `name` points to (`~` expanded), or `name` itself as a Hub id; a `ValueError` for a path that is not
    a folder, raised before anything is loaded."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ValueError(
            f"teacher_model={name!r} is a file, not a folder; pass the folder that `save_pretrained` wrote (the one "
            "holding config.json and the weights), or a Hub model id."
        )
    if _looks_like_path(name):
        raise ValueError(
            f"teacher_model={name!r}: the folder {os.path.abspath(expanded)!r} does not exist. Pass the folder that "
            "`save_pretrained` wrote (check the path and the working directory), or a Hub model id such as "
            "'org/model'."
        )
    return name


def _teacher_config(name: str, location: str, kwargs: dict) -> PretrainedConfig:
    """The teacher's config (to choose how to load it); a failure to find it names the folder that is missing."""
    config = kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        return config
    try:
        return AutoConfig.from_pretrained(location, **{k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS})
    except (OSError, ValueError) as error:
        if os.path.isdir(location):
            raise  # a folder whose config is broken: transformers' own error says what is wrong with it
        # `runs/teacher` with a local `runs/` folder: most likely a folder that was never written.
        parent = os.path.dirname(os.path.expanduser(name))
        if _is_repo_id(name) and not (parent and os.path.isdir(parent)):
            raise  # a Hub id that could not be fetched (network, access): the Hub's own error says why
        raise ValueError(
            f"teacher_model={name!r} is neither an existing folder (nothing at {os.path.abspath(location)!r}) nor a "
            f"Hub model that could be loaded ({type(error).__name__}: {error}). Pass the folder that `save_pretrained` "
            "wrote, or a Hub model id such as 'org/model'."
        ) from error


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _resolve_layer_mapping(student: PreTrainedModel, teacher: PreTrainedModel, args) -> dict[int, int]:
    """`args.layer_mapping` checked against both depths, or the default that spreads the student over the teacher."""
    student_layers, teacher_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    if args.layer_mapping is None:
        return {layer: layer * teacher_layers // student_layers for layer in range(1, student_layers + 1)}
    for student_layer, teacher_layer in args.layer_mapping.items():
        if student_layer > student_layers or teacher_layer > teacher_layers:
            raise ValueError(
                f"layer_mapping entry {student_layer}: {teacher_layer} is out of range: student layers are 0..."
                f"{student_layers} and teacher layers 0...{teacher_layers} (0 = embeddings, i = output of layer i)."
            )
    return dict(args.layer_mapping)


def _check_compatible(student: PreTrainedModel, teacher: PreTrainedModel, args) -> None:
    """Raise a ValueError naming both values and the fix when `teacher` cannot be distilled into `student`."""
    student_task, teacher_task = _task_of(student), _task_of(teacher)
    if student_task != teacher_task:
        raise ValueError(
            f"The student ({type(student).__name__}) does {student_task.name} but the teacher "
            f"({type(teacher).__name__}) does {teacher_task.name}; load the teacher with "
            f"{student_task.auto_class.__name__} so both predict the same outputs."
        )
    s_config, t_config = student.config, teacher.config
    if "multi_label_classification" in (s_config.problem_type, t_config.problem_type):
        raise ValueError(
            "problem_type='multi_label_classification' is not supported: the soft loss compares softmax "
            "distributions over mutually exclusive classes. Use single-label classification or regression."
        )
    if student_task.token_level and s_config.vocab_size != t_config.vocab_size:
        raise ValueError(
            f"The student model has vocab_size {s_config.vocab_size} but the teacher model has vocab_size "
            f"{t_config.vocab_size}; token-level distillation compares predictions token by token, so use a teacher "
            "and student with the same tokenizer and vocab_size."
        )
    if student_task.auto_class is not AutoModelForMaskedLM and s_config.num_labels != t_config.num_labels:
        raise ValueError(
            f"The student model has num_labels={s_config.num_labels} but the teacher model has "
            f"num_labels={t_config.num_labels}; build the student with num_labels={t_config.num_labels} (and the "
            "teacher's id2label) or use a teacher trained on the student's labels."
        )
    if _is_regression(s_config) != _is_regression(t_config):
        raise ValueError(
            f"The student's problem_type is {s_config.problem_type!r} but the teacher's is {t_config.problem_type!r}; "
            "set the same problem_type on both configs."
        )
    if not student_task.token_level and s_config.vocab_size > t_config.vocab_size:
        raise ValueError(
            f"The student has vocab_size {s_config.vocab_size} but the teacher only {t_config.vocab_size}: the teacher "
            f"reads the student's input_ids, and ids from {t_config.vocab_size} on would index past its embeddings. "
            f"Build the student with the teacher's tokenizer and vocab_size={t_config.vocab_size}, or use a teacher "
            "whose vocabulary covers the student's."
        )
    if not student_task.token_level and s_config.vocab_size != t_config.vocab_size:
        logger.warning(
            f"The student has vocab_size {s_config.vocab_size} and the teacher {t_config.vocab_size}: the teacher reads "
            "the student's input_ids, so both must share a tokenizer."
        )
    if s_config.num_labels > 1 and s_config.id2label != t_config.id2label:
        logger.warning(
            f"The student's id2label {s_config.id2label} differs from the teacher's {t_config.id2label}: distillation "
            "matches classes by index, so make sure index i means the same label in both."
        )
    if args.uses_intermediate_layers:
        mapping = _resolve_layer_mapping(student, teacher, args)
        if args.attention_loss_weight > 0:
            _check_attention_loss(student, teacher, mapping, args)
    _check_student_trainable(student, teacher)


def _check_student_trainable(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """The trainer freezes (and may cast) the teacher in place: refuse students that this would freeze or tie."""
    teacher_parameters = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in student.named_parameters() if id(p) in teacher_parameters]
    if shared:
        raise ValueError(
            f"The student shares {len(shared)} parameters with the teacher (e.g. {shared[0]!r}). DistillationTrainer "
            "freezes the teacher in place (requires_grad=False, and bf16/fp16 when those are on), which would freeze "
            "them in the student too, and training them would change the teacher. Give the student its own copy, "
            "e.g. `copy.deepcopy(teacher_module)` instead of the module itself."
        )
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError(
            f"The student ({type(student).__name__}) has no parameter with requires_grad=True, so there is nothing to "
            "train. A student copied from a teacher that a DistillationTrainer had already frozen inherits "
            "requires_grad=False: call `student.requires_grad_(True)`, or copy the student before creating the "
            "trainer of its teacher."
        )


def _heads_per_layer(model: PreTrainedModel) -> tuple[int, ...] | None:
    """Attention heads of each transformer layer as its modules have them, or `None` when unknown.

    Head pruning leaves `config.num_attention_heads` at the unpruned count, so registered architectures are read
    from their modules (`get_structure`); others are taken to have the config's count in every layer.
    """
    if getattr(model.config, "model_type", None) in supported_model_types():
        return get_structure(model).heads
    heads, layers = (
        getattr(model.config, "num_attention_heads", None),
        getattr(model.config, "num_hidden_layers", None),
    )
    return (heads,) * layers if isinstance(heads, int) and isinstance(layers, int) else None


def _attention_position(heads: Sequence[int] | None, layer: int) -> int | None:
    """Index in a model's returned `attentions` of transformer layer `layer` (1-based, as in `layer_mapping`).

    A layer left with no heads returns no attention map at all, so the maps of the layers after it move up one
    place; `None` for such a layer.
    """
    if heads is None:
        return layer - 1
    if heads[layer - 1] == 0:
        return None
    return sum(1 for count in heads[: layer - 1] if count > 0)


def _attention_pairs(
    student: PreTrainedModel, teacher: PreTrainedModel, mapping: dict[int, int]
) -> tuple[list[tuple[int, int]], list[str]]:
    """The mapped (student, teacher) transformer-layer pairs the attention loss compares, and why others are not."""
    student_heads, teacher_heads = _heads_per_layer(student), _heads_per_layer(teacher)
    pairs, skipped = [], []
    for s, t in mapping.items():
        if s == 0 or t == 0:
            continue
        if _attention_position(student_heads, s) is None:
            skipped.append(f"{s} -> {t} (student layer {s} has no attention heads left)")
        elif _attention_position(teacher_heads, t) is None:
            skipped.append(f"{s} -> {t} (teacher layer {t} has no attention heads left)")
        else:
            pairs.append((s, t))
    return pairs, skipped


def _check_attention_loss(student: PreTrainedModel, teacher: PreTrainedModel, mapping: dict[int, int], args) -> None:
    if not any(s > 0 and t > 0 for s, t in mapping.items()):
        raise ValueError(
            f"attention_loss_weight={args.attention_loss_weight} but layer_mapping {mapping} maps no transformer layer "
            "to a transformer layer (0 is the embedding output, which has no attention); map layers >= 1."
        )
    pairs, skipped = _attention_pairs(student, teacher, mapping)
    if not pairs:
        raise ValueError(
            f"attention_loss_weight={args.attention_loss_weight} but every layer pair of the mapping {mapping} has a "
            f"layer without attention heads: {'; '.join(skipped)}. Map layers that kept heads with layer_mapping, or "
            "set attention_loss_weight=0."
        )
    if skipped:
        logger.warning(f"The attention loss leaves out the mapped layers {'; '.join(skipped)}.")
    if not args.attention_average_heads:
        student_heads, teacher_heads = _heads_per_layer(student), _heads_per_layer(teacher)
        for s, t in pairs:
            if student_heads is None or teacher_heads is None or student_heads[s - 1] == teacher_heads[t - 1]:
                continue
            raise ValueError(
                f"The attention loss compares heads one to one, but in the mapped layers {s} -> {t} the student has "
                f"{student_heads[s - 1]} attention heads and the teacher {teacher_heads[t - 1]} (counted in the "
                "modules, after any head pruning). Set attention_average_heads=True to compare head-averaged "
                "attention, set attention_loss_weight=0 (use hidden_loss_weight instead), or map layers with as "
                "many heads."
            )
    # Registered architectures get their attention dropout switched off (`_prepare_student`); others cannot.
    if student.config.model_type in supported_model_types():
        return
    for name in _ATTENTION_DROPOUT_FIELDS:
        dropout = getattr(student.config, name, None)
        if dropout:
            raise ValueError(
                f"attention_loss_weight={args.attention_loss_weight} needs the student's attention probabilities "
                f"without dropout, but its config has {name}={dropout} and hf-compress cannot switch it off for "
                f"model_type {student.config.model_type!r}; create or load the student with {name}=0.0 "
                f"(e.g. `from_pretrained(..., {name}=0.0)`) or register the architecture."
            )


def _switch_off_attention_dropout(model: PreTrainedModel) -> None:
    """Attention probabilities come back after dropout in training, which would make the KL meaningless."""
    spec = get_spec(model)
    switched = set()
    for layer in get_layers(model):
        dropout = getattr(layer.get_submodule(spec.attention_core), "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            switched.add(dropout.p)
            dropout.p = 0.0
    if switched:
        logger.warning(
            f"attention_loss_weight > 0: the student's attention-probability dropout ({max(switched)}) is switched "
            "off for distillation (its other dropout stays); the config, and so the saved checkpoint, keep the value."
        )


def _check_gradual_pruning(callbacks: Iterable, args) -> None:
    """Head-by-head attention distillation cannot survive heads being removed from the student during training."""
    if args.attention_loss_weight == 0 or args.attention_average_heads:
        return
    for callback in callbacks or ():
        callback_class = callback if isinstance(callback, type) else type(callback)
        if issubclass(callback_class, GradualStructuredPruningCallback):
            raise ValueError(
                f"attention_loss_weight={args.attention_loss_weight} compares the student's attention heads one to "
                "one with the teacher's, but GradualStructuredPruningCallback removes student heads during "
                "training, after which they no longer match. Set attention_average_heads=True (compare "
                "head-averaged attention, which needs no equal head counts) or attention_loss_weight=0."
            )
