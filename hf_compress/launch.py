"""What a training run asks of its launcher: FSDP or DeepSpeed, read from the arguments and `accelerate launch`.

A leaf: the trainer (`distillation/distributed.py`) and the pruning callbacks both ask it, and neither imports the
other for it.
"""

from __future__ import annotations

import os


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def deepspeed_requested(args) -> bool:
    """Whether the run asks for DeepSpeed: `args.deepspeed` (a config path or dict), or `accelerate launch` with a
    DeepSpeed config (which sets `ACCELERATE_USE_DEEPSPEED=true`)."""
    return bool(getattr(args, "deepspeed", None)) or _env_flag("ACCELERATE_USE_DEEPSPEED")


def fsdp_requested(args) -> bool:
    """Whether the run asks for FSDP: `args.fsdp`, or `accelerate launch` with an FSDP config (which sets both
    `ACCELERATE_USE_FSDP=true` and `FSDP_VERSION`; accelerate also sets the first alone in any process that created an
    FSDP `Accelerator`, which is no request). Whether accelerate then enables it is another matter."""
    return bool(getattr(args, "fsdp", None)) or (_env_flag("ACCELERATE_USE_FSDP") and "FSDP_VERSION" in os.environ)


def refuse_sharded_pruning(args, callback_name: str) -> None:
    """Refuse pruning callbacks on a sharded run, before any step.

    They read and edit whole weights (magnitudes, head and neuron importance, smaller modules), while under FSDP or
    DeepSpeed ZeRO each process holds shards of them: pruning would see a slice and cut the wrong units.

    Raises:
        ValueError: naming the callback, the sharding asked for, and DDP (or pruning before/after) as the fix.
    """
    engine = "DeepSpeed" if deepspeed_requested(args) else "FSDP" if fsdp_requested(args) else None
    if engine is not None:
        raise ValueError(
            f"{callback_name} cannot prune a model sharded by {engine}: it reads and edits whole weights, and each "
            f"process holds shards of them. Prune with DDP (no {engine}; every process holds the whole model), or "
            "prune before or after the sharded run (hf_compress.prune, then distil)."
        )
