"""The state of `GradualStructuredPruningCallback` in a Trainer checkpoint: written beside the weights, read on resume.

`hf_compress_pruning_state.safetensors` holds the running importance (one tensor per layer and unit kind) and, as JSON
in the safetensors header, what else an exact resume needs: the settings that must agree between the saving and the
resuming run (config, schedule, beta), the budget's reference, the schedule's progress, the pruning history and the
heads and FFN widths at that step. Data only, no pickle.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict

import safetensors
import safetensors.torch
import torch
from transformers import TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import PruningConfig

PRUNING_STATE_NAME = "hf_compress_pruning_state.safetensors"
_STATE_FORMAT_VERSION = 1


def checkpoint_folder(args: TrainingArguments | None, state: TrainerState) -> str:
    """Where the Trainer writes (and `resume_from_checkpoint=True` finds) the checkpoint of `state.global_step`."""
    return os.path.join(getattr(args, "output_dir", None) or ".", f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def save_pruning_state(folder: str, scores: dict[str, list[torch.Tensor]], description: dict) -> None:
    """Write `PRUNING_STATE_NAME` into `folder`.

    Args:
        folder: The checkpoint folder.
        scores: Unit kind (`"heads"`, `"ffn"`) -> running importance of each layer's units.
        description: JSON-serialisable state; it must hold `global_step`, which `load_pruning_state` checks.
    """
    tensors = {
        f"scores.{kind}.{layer}": values.detach().cpu().contiguous()
        for kind, running in scores.items()
        for layer, values in enumerate(running)
    }
    metadata = {"hf_compress": json.dumps({"format_version": _STATE_FORMAT_VERSION, **description})}
    safetensors.torch.save_file(tensors, os.path.join(folder, PRUNING_STATE_NAME), metadata=metadata)


def load_pruning_state(folder: str, global_step: int) -> dict | None:
    """The description `save_pruning_state` wrote into `folder`, its tensors under `"tensors"` (None: no such file).

    Raises:
        ValueError: when the file is of another format version or another step (it belongs to another run).
    """
    path = os.path.join(folder, PRUNING_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with safetensors.safe_open(path, framework="pt") as file:
        saved = json.loads(file.metadata()["hf_compress"])
        saved["tensors"] = {key: file.get_tensor(key) for key in file.keys()}
    if saved.get("format_version") != _STATE_FORMAT_VERSION or saved.get("global_step") != global_step:
        raise ValueError(
            f"{path} holds the gradual pruning state of step {saved.get('global_step')} (format "
            f"{saved.get('format_version')}), but training resumes at step {global_step}: it belongs to "
            "another run. Remove it to resume without it, or resume from the checkpoint it was written with."
        )
    return saved


def config_as_json(config: PruningConfig) -> dict:
    """`config` as the state file records it among the settings."""
    return json.loads(json.dumps(asdict(config), default=str))


def current_settings(saved: dict) -> dict:
    """Saved settings with their config as this version writes it, to compare with a resuming run's.

    Checkpoints written before `head_keep` / `ffn_keep` replaced `head_ratio` / `ffn_ratio` resume with the same
    config under the new names.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            config = PruningConfig.from_dict(saved["config"])
    except (KeyError, TypeError, ValueError):  # not a config this version reads: compared as it is, and refused
        return saved
    return {**saved, "config": config_as_json(config)}
