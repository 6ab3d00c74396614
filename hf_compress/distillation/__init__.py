"""Distillation: `DistillationTrainer` and its arguments, the loss functions, the teacher-output cache, students.

Where things live:

- `trainer`: `DistillationTrainer`, the `Trainer` hooks that wire the pieces below together; `config`: its arguments
  (`constants`: the values they accept, shared with the implementations).
- `checks`: the task of a model, the layer mapping, whether a student and teacher can be distilled;
  `teacher`: loading, freezing and running the teacher; `attention_pairs`: which attention maps the attention loss
  compares; `distributed`: the distributed setups accepted (DDP, FSDP2) and refused, the FSDP2-sharded teacher and
  how processes agree before running it together.
- `losses`: the pure loss functions; `loss_parts`: each part of a batch's loss from the two models' outputs;
  `loss_accounting`: the item counts the parts average over and their logged means; `projections`: the learned
  hidden-state projections and their checkpoints.
- `teacher_cache`: `TeacherCache`, the teacher's outputs computed once per training set; `cache_format` (layout, keys,
  fingerprints), `cache_builder` (writing the file), `cache_temp_files` (temporary files of builds) and
  `mmap_safetensors` (checksummed memory-mapped safetensors I/O) serve it.
- `students`: building a smaller student from a teacher (`create_student`, `bert_to_distilbert`, `select_layers`).
"""

from .config import DistillationTrainingArguments
from .losses import l1_penalty
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
    "l1_penalty",
    "select_layers",
]
