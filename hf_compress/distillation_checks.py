"""Checks and helpers of `DistillationTrainer`'s setup: the task of a model, the teacher, the layer mapping, and
whether a student and a teacher can be distilled at all (every failure a `ValueError` naming both values and the fix).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import logging

from .architectures import get_layers, get_spec, supported_model_types

logger = logging.get_logger(__name__)

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
    """The teacher itself, or the Hub id / local path loaded with the student's Auto class."""
    if isinstance(teacher_model, str):
        auto_class = _task_of(student).auto_class
        logger.info(f"Loading the teacher {teacher_model!r} with {auto_class.__name__}.")
        return auto_class.from_pretrained(teacher_model, **(args.teacher_model_init_kwargs or {}))
    if not isinstance(teacher_model, PreTrainedModel):
        raise ValueError(
            f"teacher_model must be a PreTrainedModel or a Hub id / local path, got {type(teacher_model).__name__}."
        )
    return teacher_model


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


def _check_attention_loss(student: PreTrainedModel, teacher: PreTrainedModel, mapping: dict[int, int], args) -> None:
    if not any(s > 0 and t > 0 for s, t in mapping.items()):
        raise ValueError(
            f"attention_loss_weight={args.attention_loss_weight} but layer_mapping {mapping} maps no transformer layer "
            "to a transformer layer (0 is the embedding output, which has no attention); map layers >= 1."
        )
    student_heads, teacher_heads = student.config.num_attention_heads, teacher.config.num_attention_heads
    if student_heads != teacher_heads:
        raise ValueError(
            f"The attention loss needs the same number of heads, but the student has {student_heads} attention heads "
            f"and the teacher {teacher_heads}; set attention_loss_weight=0 (use hidden_loss_weight instead) or use a "
            "student with as many heads as the teacher."
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
