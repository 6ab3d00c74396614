"""Checks of `DistillationTrainer`'s setup: the task of a model, the layer mapping, and whether a student and a
teacher can be distilled at all (every failure a `ValueError` naming both values and the fix).
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

from .attention_pairs import check_attention_loss

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class DistillationTask:
    """A head `DistillationTrainer` distills, and how: `token_level` tasks compare predictions token by token.

    Args:
        name: What the head does, for error messages.
        auto_class: The Auto class that loads such a head (a teacher given as a Hub id or folder is loaded with it).
        class_names: model_type -> the head's class name.
        token_level: Logits per token (token classification, masked LM) rather than per example.
    """

    name: str
    auto_class: type
    class_names: dict[str, str]
    token_level: bool


_TASKS = (
    DistillationTask(
        "sequence classification",
        AutoModelForSequenceClassification,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        False,
    ),
    DistillationTask(
        "token classification", AutoModelForTokenClassification, MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, True
    ),
    DistillationTask("masked language modeling", AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING_NAMES, True),
)


def task_of(model: PreTrainedModel) -> DistillationTask:
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


def forward_arg_names(model: nn.Module) -> frozenset[str]:
    """The named arguments of `model.forward` (`**kwargs` excluded: what lands there may be rejected downstream)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def is_regression(config) -> bool:
    """Whether `config` is a regression head (one output compared by MSE) rather than a classifier."""
    return config.problem_type == "regression" or (config.problem_type is None and config.num_labels == 1)


def resolve_layer_mapping(student: PreTrainedModel, teacher: PreTrainedModel, args) -> dict[int, int]:
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


def check_compatible(student: PreTrainedModel, teacher: PreTrainedModel, args) -> None:
    """Raise a ValueError naming both values and the fix when `teacher` cannot be distilled into `student`."""
    student_task, teacher_task = task_of(student), task_of(teacher)
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
    if is_regression(s_config) != is_regression(t_config):
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
        mapping = resolve_layer_mapping(student, teacher, args)
        if args.attention_loss_weight > 0:
            check_attention_loss(student, teacher, mapping, args)
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
