"""The teacher of `DistillationTrainer`: loaded from a model, Hub id or folder, frozen, and run on a batch."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from ..deploy.checkpoint import load_compressed
from ..remote_code.modeling_hf_compress import CONFIG_KEY
from .attention_pairs import use_eager_attention
from .checks import task_of

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


def load_teacher(teacher_model: PreTrainedModel | str, student: PreTrainedModel, args) -> PreTrainedModel:
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
        auto_class = task_of(student).auto_class
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


def prepare_teacher(teacher: PreTrainedModel, args) -> PreTrainedModel:
    """Freeze the teacher in place and put it on the training device and compute dtype (it is never `prepare`d).

    Args:
        teacher: The teacher; modified in place (no copy, which would double its memory).
        args: The `DistillationTrainingArguments`: `device`, `bf16` / `fp16`, and `attention_loss_weight`, which needs
            eager attention.

    Returns:
        `teacher`, in eval mode with `requires_grad=False`.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    # A teacher dispatched over devices by `device_map` stays where it is.
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device=args.device, dtype=dtype)
    if args.attention_loss_weight > 0:
        use_eager_attention(teacher, "teacher")
    return teacher


def run_teacher(
    teacher: PreTrainedModel, inputs: dict[str, Any], input_names: Iterable[str], output_flags: dict[str, bool]
) -> ModelOutput:
    """The teacher's output for a batch: it receives the inputs its `forward` names (`input_names`), on its device.

    Gradients are left as the caller has them: the trainer runs it under `torch.no_grad()`, the cache build under
    `torch.inference_mode()`.
    """
    device = teacher.device
    teacher_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items() if k in input_names}
    return teacher(**teacher_inputs, **output_flags)
