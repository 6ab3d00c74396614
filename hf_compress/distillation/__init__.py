"""Distillation: `DistillationTrainer` and its arguments, the loss functions, the teacher-output cache, students."""

from .config import DistillationTrainingArguments
from .students import bert_to_distilbert, create_student, select_layers
from .teacher_cache import TeacherCache, TeacherCacheCorruptedError
from .trainer import DistillationTrainer

__all__ = [
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "TeacherCache",
    "TeacherCacheCorruptedError",
    "bert_to_distilbert",
    "create_student",
    "select_layers",
]
