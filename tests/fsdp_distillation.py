"""Tiny FSDP2 distillation runs, launched on 2 CPU processes by `tests/test_fsdp.py`; in-process (one process, no FSDP)
the same `run` gives the reference they must match.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_distillation.py train OUTPUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_distillation.py resume OUTPUT_DIR

`train` runs every scenario of `SCENARIOS` (the "shard" one saves a checkpoint halfway, in OUTPUT_DIR/shard); `resume`
runs the "shard" scenario again from that checkpoint in a new launch. Each process writes `OUTPUT_DIR/{mode}-rank{rank}.pt`:
per scenario, the whole student and projection weights (gathered from the shards), the log history and what was
sharded.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402
from distributed_distillation import GLOBAL_BATCH_SIZE, build_dataset  # noqa: E402

from hf_compress import DistillationTrainer, DistillationTrainingArguments  # noqa: E402

NUM_STEPS = 4  # the "shard" scenario saves a checkpoint at step NUM_STEPS // 2; "resume" starts from it
SCENARIOS = {
    # The default: student and teacher sharded, checkpoints halfway and at the end, then an evaluation (which runs the
    # sharded teacher on every process together).
    "shard": {
        "task": "sequence-classification",
        "teacher_sharding": "shard",
        "save_steps": NUM_STEPS // 2,
        "evaluate": True,
    },
    # The teacher cache built by both processes running the sharded teacher together, then reused by a new trainer.
    # It then evaluates, running the sharded teacher live after the build ran it in inference mode.
    "cache-build": {"task": "sequence-classification", "teacher_sharding": "shard", "cache": True, "evaluate": True},
    "cache-reuse": {"task": "sequence-classification", "teacher_sharding": "shard", "cache": True},
    # A whole teacher on every process; token labels, so the shards hold different numbers of labelled tokens. With
    # `cpu_ram_efficient_loading`, the teacher of the other processes is on the meta device, as `from_pretrained`
    # leaves it: the trainer must broadcast the main process's. Two accumulated micro-batches per step.
    "replicate": {
        "task": "token-classification",
        "teacher_sharding": "replicate",
        "cpu_ram_efficient_loading": True,
        "gradient_accumulation_steps": 2,
    },
}


def enable_fsdp_on_cpu() -> None:
    """TEST-ONLY SHIM, never in the library: make accelerate honour an FSDP plugin on CPU processes.

    accelerate 1.16 switches `AcceleratorState` to `DistributedType.FSDP` only for accelerator-device types
    (MULTI_GPU, MULTI_XPU, ...), so a CPU/gloo run with `fsdp=...` silently trains with DDP. FSDP2 itself
    (`fully_shard`, DTensor) works on CPU with gloo, so the test turns MULTI_CPU + an FSDP plugin into FSDP to run the
    real FSDP2 code paths of the Trainer and of accelerate. Remove it once accelerate enables FSDP on CPU itself.
    """
    import accelerate.state as accelerate_state

    original_init = accelerate_state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == accelerate_state.DistributedType.MULTI_CPU:
            self.distributed_type = accelerate_state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # Every later `AcceleratorState()` copies the PartialState's fields over its own: switch both.
            accelerate_state.PartialState._shared_state["distributed_type"] = self.distributed_type

    accelerate_state.AcceleratorState.__init__ = init


def run(
    output_dir: str,
    per_device_batch_size: int,
    task: str,
    fsdp: bool,
    teacher_sharding: str = "shard",
    save_steps: int | None = None,
    cache: bool = False,
    resume_from_checkpoint: str | None = None,
    cpu_ram_efficient_loading: bool = False,
    gradient_accumulation_steps: int = 1,
    evaluate: bool = False,
) -> dict:
    """Distil a 4-layer hidden-24 BERT into a 2-layer hidden-16 one (soft, hard and projected hidden losses) with SGD
    with momentum (optimizer state to checkpoint), weight decay, a linear schedule and gradient clipping.

    `per_device_batch_size` examples per process and optimizer step, in `gradient_accumulation_steps` micro-batches;
    `evaluate` evaluates on the first global batch's rows after training."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    student = tiny_model("bert", task, seed=0, num_hidden_layers=2, **no_dropout)
    teacher = tiny_model("bert", task, seed=1, hidden_size=24, **no_dropout)
    fsdp_args = {}
    if fsdp:
        fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}
        if cpu_ram_efficient_loading:
            fsdp_config["cpu_ram_efficient_loading"] = True
            if int(os.environ.get("RANK", 0)) != 0:
                teacher = teacher.to("meta")
        fsdp_args = {"fsdp": True, "fsdp_config": fsdp_config}
    args = DistillationTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch_size // gradient_accumulation_steps,
        per_device_eval_batch_size=per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_steps=NUM_STEPS,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.01,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        temperature=2.0,
        alpha=0.5,
        hidden_loss_weight=1.0,
        teacher_sharding=teacher_sharding,
        teacher_cache_dir=os.path.join(os.path.dirname(output_dir), "teacher_cache") if cache else None,
        **fsdp_args,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=build_dataset(task, NUM_STEPS)
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    result = {
        "world_size": args.world_size,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "student_param_types": {type(p).__name__ for p in trainer.model.parameters()},
        "teacher_param_types": {type(p).__name__ for p in trainer.teacher_model.parameters()},
        "teacher_local_numel": sum(_local(p).numel() for p in trainer.teacher_model.parameters()),
        "teacher_numel": sum(p.numel() for p in trainer.teacher_model.parameters()),
        "teacher_frozen": not trainer.teacher_model.training
        and not any(p.requires_grad for p in trainer.teacher_model.parameters()),
        "teacher_in_optimizer": any(id(p) in optimizer_params for p in trainer.teacher_model.parameters()),
        "projections_in_optimizer": all(id(p) in optimizer_params for p in trainer.hidden_projections.parameters()),
        "cache_built": trainer.teacher_cache.built if trainer.teacher_cache is not None else None,
        # Gathering every weight is a collective: every process does it, in the same order.
        "student": {k: _whole(v) for k, v in trainer.model.state_dict().items()},
        "projections": {k: _whole(v) for k, v in trainer.hidden_projections.state_dict().items()},
    }
    # After a forward outside training, FSDP2 keeps the root's parameters gathered: look at the types before.
    result["eval_metrics"] = trainer.evaluate(build_dataset(task, 1)) if evaluate else None
    result["log_history"] = trainer.state.log_history
    return result


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu().clone()


def main(mode: str, output_dir: str) -> None:
    enable_fsdp_on_cpu()
    torch.set_num_threads(1)
    per_device = GLOBAL_BATCH_SIZE // int(os.environ["WORLD_SIZE"])
    if mode == "train":
        results = {
            name: run(os.path.join(output_dir, name), per_device, fsdp=True, **scenario)
            for name, scenario in SCENARIOS.items()
        }
    elif mode == "resume":
        checkpoint = os.path.join(output_dir, "shard", f"checkpoint-{NUM_STEPS // 2}")
        scenario = {**SCENARIOS["shard"], "save_steps": None, "evaluate": False}
        results = {
            "shard": run(
                os.path.join(output_dir, "resumed"),
                per_device,
                fsdp=True,
                resume_from_checkpoint=checkpoint,
                **scenario,
            )
        }
    else:
        raise ValueError(f"mode={mode!r}: use 'train' or 'resume'.")
    torch.save(results, os.path.join(output_dir, f"{mode}-rank{int(os.environ['RANK'])}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
