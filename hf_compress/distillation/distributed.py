"""`DistillationTrainer` beyond one process: which setups it accepts, the sharded teacher, and lockstep agreement.

- DDP: the student is wrapped by the Trainer; the teacher stays whole on every process; the hidden-state projections
  are replicated and their gradients averaged by the trainer (`projections.average_gradients`).
- FSDP2 (`fsdp=True` with `fsdp_config={"version": 2}`, or `accelerate launch` with an FSDP2 config): the
  student is sharded by accelerate; the teacher is sharded the same way (`shard_teacher`, the default
  `teacher_sharding="shard"`) or kept whole (`"replicate"`); the projections stay replicated as under DDP and join the
  optimizer after accelerate has swapped the student's parameters for their shards.
- FSDP1 and DeepSpeed are refused before any work (`check_distributed_setup`).

A sharded teacher all-gathers its weights in every forward, a collective: every process must run it on every batch
together. `Lockstep` is how the processes agree on what to do (build the teacher cache or not, whether a build
failed) before they start such a sequence of collectives, so that no process waits for one that went another way.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..architectures import get_layers, supported_model_types
from ..launch import deepspeed_requested, fsdp_requested
from ..pruning.magnitude_callback import GradualMagnitudePruningCallback
from ..pruning.structured_callback import GradualStructuredPruningCallback

logger = logging.get_logger(__name__)

_FSDP2_FIX = (
    'fsdp=True with fsdp_config={"version": 2} in the training arguments, or `fsdp_version: 2` in the '
    "accelerate config (see examples/accelerate_configs/fsdp2.yaml)"
)


def requested_fsdp_version(args) -> int:
    """The FSDP version the run asks for, read the way transformers and accelerate read it: `fsdp_config["version"]`
    (default 2) when `args.fsdp` is set, else the `FSDP_VERSION` set by `accelerate launch`."""
    if getattr(args, "fsdp", None):
        plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
        config = getattr(args, "fsdp_config", None) or {}
        return int(plugin_args.get("fsdp_version", config.get("version", 2)))
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_distributed_setup(args) -> None:
    """Refuse, before any work, the distributed setups `DistillationTrainer` does not support.

    Args:
        args: The `DistillationTrainingArguments` (or any object with `deepspeed`, `fsdp`, `fsdp_config`).

    Raises:
        ValueError: for DeepSpeed (any ZeRO stage) and for FSDP1; both name FSDP2 as the alternative.
    """
    if deepspeed_requested(args):
        source = (
            f"deepspeed={args.deepspeed!r}"
            if getattr(args, "deepspeed", None)
            else "ACCELERATE_USE_DEEPSPEED=true, set by accelerate launch with a DeepSpeed config"
        )
        raise _deepspeed_error(source)
    if fsdp_requested(args) and requested_fsdp_version(args) != 2:
        raise _fsdp1_error(requested_fsdp_version(args))


def check_enabled_setup(args, state, teacher: PreTrainedModel) -> None:
    """Refuse what accelerate enabled but this trainer cannot train with, once the `Accelerator` exists (it may have
    read its plugins from the environment) and before the teacher or the student is touched.

    Args:
        args: The `DistillationTrainingArguments`.
        state: `accelerator.state`.
        teacher: The teacher as loaded.

    Raises:
        ValueError: for DeepSpeed, FSDP1, `l1_weight > 0` under FSDP (the penalty reads whole weights, each process
            holds shards) and a teacher dispatched with `device_map` with `teacher_sharding="shard"`.
    """
    if getattr(state, "deepspeed_plugin", None) is not None:
        raise _deepspeed_error("the accelerator's DeepSpeed plugin")
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        return
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise _fsdp1_error(getattr(plugin, "fsdp_version", 1))
    if args.l1_weight > 0:
        raise ValueError(
            f"l1_weight={args.l1_weight} is not supported under FSDP: the L1 penalty sums whole weights, and each "
            "process holds only shards of the student. Set l1_weight=0, or train with DDP (no fsdp) for the L1 phase."
        )
    if args.teacher_sharding == "shard" and getattr(teacher, "hf_device_map", None) is not None:
        raise ValueError(
            "teacher_sharding='shard' cannot shard a teacher dispatched over devices with device_map "
            f"({teacher.hf_device_map}); load the teacher without device_map, or set teacher_sharding='replicate'."
        )


def check_pruning_callbacks(callbacks: Iterable, is_fsdp_enabled: bool) -> None:
    """Refuse the gradual pruning callbacks under FSDP: they read and edit whole weights (magnitudes, head and neuron
    importance, smaller modules), while each process holds shards of them.

    Raises:
        ValueError: naming the callback and DDP as the way to run it.
    """
    if not is_fsdp_enabled:
        return
    for callback in callbacks or ():
        callback_class = callback if isinstance(callback, type) else type(callback)
        if issubclass(callback_class, (GradualStructuredPruningCallback, GradualMagnitudePruningCallback)):
            raise ValueError(
                f"{callback_class.__name__} cannot prune a student sharded by FSDP: it reads and edits whole weights, "
                "and each process holds shards of them. Prune with DDP (no fsdp; every process holds the whole "
                "student), or prune before or after the FSDP run."
            )


def _deepspeed_error(source: str) -> ValueError:
    return ValueError(
        f"DistillationTrainer does not support DeepSpeed ({source}): the teacher and the hidden-state projections "
        "live outside the DeepSpeed engine, ZeRO-3 would have to partition the teacher for inference, and none of it "
        f"is tested. Shard the student and the teacher with FSDP2 instead ({_FSDP2_FIX}), or train with plain DDP "
        "(torchrun or accelerate launch without DeepSpeed)."
    )


def _fsdp1_error(version: int) -> ValueError:
    return ValueError(
        f"DistillationTrainer supports FSDP2 only, but FSDP version {version} was requested; use {_FSDP2_FIX}."
    )


def warn_if_fsdp_ignored(args, state, is_fsdp_enabled: bool) -> None:
    """Warn when FSDP was asked for but accelerate did not enable it (CPU runs, a single process without a launcher):
    training then runs as plain DDP or on one process, with the whole student on every process."""
    if not fsdp_requested(args) or is_fsdp_enabled:
        return
    logger.warning(
        f"FSDP was requested (fsdp={getattr(args, 'fsdp', None)!r}) but accelerate runs this job as "
        f"{getattr(state, 'distributed_type', None)} without FSDP: it only shards models on accelerator devices (GPU, "
        "XPU, NPU, ...) under a distributed launcher, and runs CPU jobs as plain DDP. The student is therefore "
        "replicated on every process (not sharded) and the teacher kept whole; launch on GPUs with `accelerate "
        "launch` or torchrun to shard them."
    )


def teacher_layers(teacher: PreTrainedModel) -> list[nn.Module]:
    """The teacher's transformer layers: from the architecture registry, else the modules named by the model's
    `_no_split_modules` (what transformers keeps whole when dispatching), inner ones first."""
    if teacher.config.model_type in supported_model_types():
        return list(get_layers(teacher))
    names = set(getattr(teacher, "_no_split_modules", None) or ())
    modules = [module for module in teacher.modules() if type(module).__name__ in names and module is not teacher]
    return modules[::-1]  # inner modules first: `fully_shard` a module before any module that holds it


def device_mesh(accelerator):
    """The mesh accelerate shards the student over (`None`: FSDP2's default mesh over all processes)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    config = getattr(accelerator, "parallelism_config", None)
    if mesh is None or config is None:
        return None
    return mesh[tuple(config.fsdp_dim_names)]


def shard_teacher(teacher: PreTrainedModel, accelerator) -> PreTrainedModel:
    """Shard a frozen teacher over the student's device mesh: `fully_shard` each transformer layer, then the root.

    Every forward then all-gathers one layer at a time and frees it again (`reshard_after_forward=True`, the root
    included: nothing runs backward through the teacher), so a process holds its shard plus one layer at a time.

    Args:
        teacher: The teacher, already frozen, in eval mode and on the training device and dtype (`prepare_teacher`).
        accelerator: The trainer's accelerator, with FSDP2 enabled.

    Returns:
        `teacher`, sharded in place (its class becomes an `FSDPModule`; its state dict holds `DTensor`s).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(teacher, FSDPModule):
        return teacher
    kwargs = {"mesh": device_mesh(accelerator), "reshard_after_forward": True}
    layers = teacher_layers(teacher)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)
    logger.info(f"Sharded the teacher over {accelerator.num_processes} processes ({len(layers)} layers + the root).")
    return teacher


def broadcast_teacher(teacher: PreTrainedModel, device: torch.device | str) -> None:
    """Give every process the main process's teacher: broadcast each parameter and buffer from global rank 0.

    With accelerate's `cpu_ram_efficient_loading` (`FSDP_CPU_RAM_EFFICIENT_LOADING=true`), `from_pretrained` reads
    the weights on each node's main process only and leaves the other processes' parameters on the meta device (and
    non-persistent buffers zeroed), for accelerate to broadcast when it prepares the model, which it never does for the
    teacher. A collective: every process calls it, the tensors come in the same order on all.

    Args:
        teacher: The teacher as loaded (parameters possibly on the meta device).
        device: Where tensors of the meta device are allocated before receiving their values.
    """
    tensors = list(itertools.chain(teacher.parameters(), teacher.buffers()))
    if any(tensor.is_meta for tensor in tensors):
        teacher.to_empty(device=device)
        tensors = list(itertools.chain(teacher.parameters(), teacher.buffers()))
    for tensor in tensors:
        torch.distributed.broadcast(tensor.data, src=0)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class Lockstep:
    """How the processes that run a sharded teacher together agree before a sequence of collectives.

    Args:
        accelerator: The trainer's accelerator.

    Attributes:
        writes: Whether this process writes files shared by its node (the local main process).
    """

    def __init__(self, accelerator):
        self.device = accelerator.device
        self.writes = accelerator.is_local_main_process
        self.num_processes = accelerator.num_processes

    def any(self, flag: bool) -> bool:
        """Whether any process passed `True`: a collective every process must call, so also a barrier."""
        if self.num_processes == 1:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())
