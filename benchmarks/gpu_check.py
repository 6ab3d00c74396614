"""What hf-compress does on a GPU, in one command and one JSON: distillation throughput in bf16 and fp16, the teacher
cache, latency of compressed variants, FSDP2, and exactness checks whose answer can differ on a GPU.

```bash
python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.json           # about 3-8 minutes on a GPU
python benchmarks/gpu_check.py --teacher path/to/local/teacher                       # a local teacher instead
python benchmarks/gpu_check.py --quick --output /tmp/gpu_check.json                  # tiny models, for CI (CPU)
```

No downloads: by default the teacher is a randomly initialised 6-layer, hidden-384 BERT built from `BertConfig`
(MiniLM-L6 size, its classifier scaled so that its soft targets are not uniform; `--teacher PATH` loads a local
sequence classifier instead), the student a random model of its config with half its layers, and the data synthetic
token batches of `--seq-len / 2` to `--seq-len` tokens (padded per batch), with random labels.

Parts (each is `{"status": "ok" | "skipped" | "failed", ...}` in the JSON; a skipped part says why in `reason`, and
is also listed under `skipped` and printed; a failed part keeps its error, and the others still run):

- `throughput.<precision>`: optimizer steps/s of the stock `Trainer` (the student alone), `DistillationTrainer`
  (soft, hard and hidden-state losses, every student layer mapped) with a live teacher, and with the teacher cache (`teacher_cache_dir`), in interleaved rounds (median interval between
  step ends after `--warmup-steps`, `torch.cuda.synchronize()` at each end); plus the cache build time and size on
  this device. Precisions: bf16 and fp16 on a GPU; fp32 on CPU (bf16 and fp16 are skipped there).
- `exactness.<precision>`: the loss of each training batch with cached teacher outputs against the live teacher on
  the same student weights, for batches identical to the cache build's (sequential order) and reshuffled ones
  (other compositions and padded lengths, hence other kernels): max absolute and relative difference.
- `latency` (GPU only): median forward latency (`torch.cuda.synchronize()`, interleaved rounds) of the teacher, the
  student and the teacher pruned to 1/2 and 1/4 of its FLOPs (`prune` with magnitude importance: no data) at batch
  sizes 1, 32 and 128, in float32 and bfloat16, with the realised speed-up against the FLOPs ratio
  (`hf_compress.report.summarize`).
- `fsdp2` (GPU only): one process under torchrun with `fsdp=True` (FSDP2, student and teacher sharded over one
  device): steps/s, whether FSDP2 engaged, and its logged losses against the same run without FSDP.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate
import datasets
import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from hf_compress import (  # noqa: E402
    DistillationTrainer,
    DistillationTrainingArguments,
    PruningConfig,
    create_student,
    device_name,
    prune,
)
from hf_compress.architectures import get_layers  # noqa: E402
from hf_compress.report import summarize  # noqa: E402

logger = hf_logging.get_logger("gpu_check")
MODES = ("stock", "live", "cached")
GPU_PRECISIONS = ("bf16", "fp16")
LATENCY_BATCH_SIZES = (1, 32, 128)
NEEDS_CUDA = "needs a CUDA device (none is available here)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    parser.add_argument(
        "--teacher", default=None, help="Local folder of a sequence classifier (default: random BERT)."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny models and few steps (CI; about 30 s on a CPU).")
    parser.add_argument("--batch-size", type=int, default=None, help="Training batch (default 32; quick: 4).")
    parser.add_argument("--seq-len", type=int, default=None, help="Longest sequence (default 128; quick: 16).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default 40; quick: 4).")
    parser.add_argument("--warmup-steps", type=int, default=None, help="Untimed steps per run (default 5; quick: 1).")
    parser.add_argument("--rounds", type=int, default=None, help="Interleaved rounds (default 3; quick: 1).")
    parser.add_argument("--work-dir", default=None, help="Trainer outputs and caches (default: a temporary folder).")
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)  # internal: the torchrun child
    args = parser.parse_args(argv)
    defaults = {
        "batch_size": (32, 4),
        "seq_len": (128, 16),
        "steps": (40, 4),
        "warmup_steps": (5, 1),
        "rounds": (3, 1),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.steps <= args.warmup_steps + 1:
        parser.error(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps} + 1 to time any interval.")
    if args.teacher is not None and not os.path.isdir(args.teacher):
        parser.error(f"--teacher {args.teacher!r} is not a folder; pass the folder `save_pretrained` wrote.")
    return args


# ---- Models and data ----


def build_teacher(args: argparse.Namespace) -> PreTrainedModel:
    """The local `--teacher`, or a random 6-layer hidden-384 BERT (quick: 4 layers, hidden 32), in eval mode."""
    if args.teacher is not None:
        return AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    torch.manual_seed(0)
    if args.quick:
        config = BertConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    else:
        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        )
    teacher = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # logits far from uniform, so that the soft loss is not ~0 with random weights
        teacher.classifier.weight.mul_(20.0)
    return teacher


def build_student(teacher: PreTrainedModel) -> PreTrainedModel:
    """A randomly initialised student of the teacher's config with half its layers and no dropout.

    Random rather than `create_student`: a copy of the teacher's layers would start with hidden-state losses of
    almost 0, which would make the cached-against-live comparison blind; no dropout, so that two forwards of a batch
    give the same student outputs.
    """
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = max(1, config.num_hidden_layers // 2)
    torch.manual_seed(1)
    student = type(teacher)(config).train()
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return student


def synthetic_dataset(num_examples: int, seq_len: int, vocab_size: int, num_labels: int) -> datasets.Dataset:
    """Random token ids of random lengths between `seq_len // 2` and `seq_len`, and random labels."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(2, seq_len // 2), seq_len + 1, (num_examples,), generator=generator)
    rows = [torch.randint(5, vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    labels = torch.randint(0, num_labels, (num_examples,), generator=generator).tolist()
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": labels})


def pad_collator(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad `input_ids` to the longest example of the batch (deterministic, so the teacher cache accepts it)."""
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention_mask[row, : len(example["input_ids"])] = 1
    labels = torch.tensor([example["labels"] for example in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- Training runs ----


class _StepTimer(TrainerCallback):
    """The time of every step end (after the device finished it) and of `on_train_begin` (after any cache build)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started = time.perf_counter()
        self.train_begin: float | None = None
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize(self.device)
        self.step_ends.append(time.perf_counter())

    def step_seconds(self, warmup_steps: int) -> float:
        return statistics.median([b - a for a, b in itertools.pairwise(self.step_ends)][warmup_steps:])


class _ComparingTrainer(DistillationTrainer):
    """Computes each training batch's loss twice: from the teacher cache (what it trains on) and with the live teacher.

    The student has no dropout, so both see the same student outputs; `pairs` collects `(cached, live)` losses.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs: list[tuple[float, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.teacher_cache is not None:
            cache, self.teacher_cache = self.teacher_cache, None
            try:
                with torch.no_grad():
                    live = super().compute_loss(model, inputs, False, num_items_in_batch)
            finally:
                self.teacher_cache = cache
            cached = loss[0] if return_outputs else loss
            self.pairs.append((cached.item(), live.item()))
        return loss


def train_run(
    mode: str,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    dataset: datasets.Dataset,
    precision: str,
    work_dir: str,
    args: argparse.Namespace,
    steps: int | None = None,
    cache_dir: str | None = None,
    sequential: bool = False,
    fsdp: bool = False,
    trainer_class: type[Trainer] | None = None,
) -> tuple[Trainer, _StepTimer]:
    """Train a fresh copy of `student` for `steps` steps in `mode` ("stock", "live" or "cached")."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = dict(
        output_dir=os.path.join(work_dir, f"{mode}-{precision}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps or args.steps,
        learning_rate=5e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
        train_sampling_strategy="sequential" if sequential else "random",
        seed=0,
    )
    if fsdp:
        # Shard each transformer layer: accelerate's default (every `_no_split_modules` class) fails for BERT, whose
        # embeddings are among them and are then sharded twice.
        layer_class = type(get_layers(student)[0]).__name__
        common.update(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [layer_class]})
    timer = _StepTimer(device)
    student = copy.deepcopy(student).train()
    if mode == "stock":
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            data_collator=pad_collator,
            callbacks=[timer],
        )
    else:
        trainer = (trainer_class or DistillationTrainer)(
            model=student,
            teacher_model=copy.deepcopy(teacher),  # prepare_teacher casts it in place: keep the original as it was
            args=DistillationTrainingArguments(
                **common,
                teacher_cache_dir=cache_dir if mode == "cached" else None,
                alpha=0.5,
                temperature=2.0,
                hidden_loss_weight=1.0,  # the cache then holds hidden states too, and the loss depends on them
            ),
            train_dataset=dataset,
            data_collator=pad_collator,
            callbacks=[timer],
        )
    trainer.remove_callback(PrinterCallback)  # the losses stay in `trainer.state.log_history`
    timer.started = time.perf_counter()
    trainer.train()
    return trainer, timer


def throughput_part(
    precision: str,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    dataset: datasets.Dataset,
    work_dir: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Steps/s of stock / live / cached training in interleaved rounds, and the cache build on this device."""
    cache_dir = os.path.join(work_dir, f"teacher_cache-{precision}")
    _, build = train_run("cached", teacher, student, dataset, precision, work_dir, args, steps=1, cache_dir=cache_dir)
    cache_files = list(Path(cache_dir).glob("*.safetensors"))
    step_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES[round_index % 3 :] + MODES[: round_index % 3]:
            _, timer = train_run(mode, teacher, student, dataset, precision, work_dir, args, cache_dir=cache_dir)
            step_seconds[mode].append(timer.step_seconds(args.warmup_steps))

    def speed(numerator: str, denominator: str) -> float:  # per-round ratios, then the median
        pairs = zip(step_seconds[numerator], step_seconds[denominator], strict=True)
        return statistics.median(d / n for n, d in pairs)

    return {
        "status": "ok",
        "steps_per_second": {mode: 1 / statistics.median(times) for mode, times in step_seconds.items()},
        "step_seconds_per_round": step_seconds,
        "live_vs_stock_speed": speed("live", "stock"),
        "cached_vs_stock_speed": speed("cached", "stock"),
        "cached_vs_live_speed": speed("cached", "live"),
        "cache_build_s": build.train_begin - build.started,
        "cache_mb": sum(f.stat().st_size for f in cache_files) / 1e6,
        "cache_examples": len(dataset),
    }


def exactness_part(
    precision: str,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    dataset: datasets.Dataset,
    work_dir: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Cached against live loss on the same student, for the build's batches and for reshuffled ones."""
    cache_dir = os.path.join(work_dir, f"teacher_cache-{precision}")  # built by `throughput_part` when it ran
    result: dict[str, Any] = {"status": "ok"}
    for name, sequential in (("same_batches", True), ("reshuffled_batches", False)):
        trainer, _ = train_run(
            "cached",
            teacher,
            student,
            dataset,
            precision,
            work_dir,
            args,
            cache_dir=cache_dir,
            sequential=sequential,
            trainer_class=_ComparingTrainer,
        )
        differences = [abs(cached - live) for cached, live in trainer.pairs]
        relative = [abs(cached - live) / max(abs(live), 1e-12) for cached, live in trainer.pairs]
        result[name] = {
            "batches": len(trainer.pairs),
            "equal": all(d == 0 for d in differences),
            "max_abs_difference": max(differences),
            "max_rel_difference": max(relative),
            "losses": trainer.pairs,
        }
    return result


# ---- Latency of compressed variants ----


def compressed_variants(teacher: PreTrainedModel) -> dict[str, PreTrainedModel]:
    """The teacher, the `create_student` half-depth student, and the teacher pruned to 1/2 and 1/4 of its FLOPs by
    weight magnitude (no data, no rescaling)."""
    half = max(1, teacher.config.num_hidden_layers // 2)
    variants = {"teacher": teacher, f"student_{half}_layers": create_student(teacher, num_layers=half)}
    for name, keep in (("pruned_flops_1/2", 0.5), ("pruned_flops_1/4", 0.25)):
        model = copy.deepcopy(teacher)
        prune(
            model, PruningConfig(target="flops", keep=keep, importance="magnitude", rescale=False), show_progress=False
        )
        variants[name] = model
    return variants


def latency_part(
    teacher: PreTrainedModel,
    device: str | torch.device,
    batch_sizes: tuple[int, ...] = LATENCY_BATCH_SIZES,
    seq_len: int = 128,
    rounds: int = 5,
    iterations: int = 20,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
) -> dict[str, Any]:
    """Median forward latency of each compressed variant, its realised speed-up over the teacher and its FLOPs ratio.

    Each round times every variant at every batch size (`iterations` forwards after 3 untimed, synchronised before
    and after), in a rotating order; the reported latency is the median over rounds of the per-round medians.
    """
    device = torch.device(device)
    variants = compressed_variants(teacher)
    flops = {name: summarize(model, seq_len).flops_per_token for name, model in variants.items()}
    generator = torch.Generator().manual_seed(2)
    result: dict[str, Any] = {
        "status": "ok",
        "device": device_name(device),
        "seq_len": seq_len,
        "rounds": rounds,
        "iterations": iterations,
        "flops_per_token": flops,
        "flops_ratio_vs_teacher": {name: flops["teacher"] / value for name, value in flops.items()},
        "structures": {name: str(summarize(model, seq_len).structure) for name, model in variants.items()},
    }
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        models = {name: copy.deepcopy(model).to(device=device, dtype=dtype).eval() for name, model in variants.items()}
        per_round: dict[int, dict[str, list[float]]] = {b: {name: [] for name in models} for b in batch_sizes}
        names = list(models)
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for batch_size in batch_sizes:
                inputs = {
                    "input_ids": torch.randint(
                        5, teacher.config.vocab_size, (batch_size, seq_len), generator=generator
                    ).to(device),
                    "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
                }
                for name in order:
                    per_round[batch_size][name].append(_median_forward_ms(models[name], inputs, device, iterations))
        table = {}
        for batch_size, times in per_round.items():
            medians = {name: statistics.median(values) for name, values in times.items()}
            table[str(batch_size)] = {
                name: {
                    "median_ms": medians[name],
                    "speedup_vs_teacher": medians["teacher"] / medians[name],
                    "flops_ratio_vs_teacher": result["flops_ratio_vs_teacher"][name],
                    "speedup_over_flops_ratio": medians["teacher"]
                    / medians[name]
                    / result["flops_ratio_vs_teacher"][name],
                    "ms_per_round": times[name],
                }
                for name in names
            }
        result[dtype_name] = table
        del models
    return result


def _median_forward_ms(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device, iterations: int):
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        times = []
        for _ in range(iterations):
            _synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            _synchronize(device)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- FSDP2 with one process ----


def fsdp_part(args: argparse.Namespace, work_dir: str, reference_losses: list[float]) -> dict[str, Any]:
    """Run `--fsdp-worker` under torchrun with one process and compare its losses with the same run without FSDP."""
    worker_output = os.path.join(work_dir, "fsdp_worker.json")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(Path(__file__).resolve()),
        "--fsdp-worker",
        worker_output,
        "--work-dir",
        os.path.join(work_dir, "fsdp"),
        *_forwarded(args),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        return {"status": "failed", "error": (completed.stdout[-2000:] + completed.stderr[-4000:]).strip()}
    result = json.loads(Path(worker_output).read_text())
    losses = result["losses"]
    differences = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference_losses, strict=False)]
    result.update(
        status="ok" if result["is_fsdp_enabled"] else "failed",
        reference_losses=reference_losses,
        max_rel_loss_difference_vs_no_fsdp=max(differences) if differences else None,
    )
    if not result["is_fsdp_enabled"]:
        result["error"] = "accelerate did not enable FSDP in the torchrun process"
    return result


def _forwarded(args: argparse.Namespace) -> list[str]:
    forwarded = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    forwarded += ["--warmup-steps", str(args.warmup_steps)]
    if args.quick:
        forwarded.append("--quick")
    if args.teacher:
        forwarded += ["--teacher", args.teacher]
    return forwarded


def fsdp_worker(args: argparse.Namespace) -> None:
    """The torchrun child of `fsdp_part`: live-teacher distillation in bf16 under FSDP2 (teacher sharded)."""
    teacher = build_teacher(args)
    student = build_student(teacher)
    dataset = synthetic_dataset(args.batch_size * args.steps, args.seq_len, teacher.config.vocab_size, 2)
    trainer, timer = train_run("live", teacher, student, dataset, "bf16", args.work_dir, args, fsdp=True)
    result = {
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "student_param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "teacher_param_types": sorted({type(p).__name__ for p in trainer.teacher_model.parameters()}),
        "steps_per_second": 1 / timer.step_seconds(args.warmup_steps),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.fsdp_worker).write_text(json.dumps(result, indent=2) + "\n")


# ---- Main ----


def _run_part(results: dict[str, Any], path: tuple[str, ...], function: Callable[[], dict[str, Any]]) -> Any:
    """Run one part into `results[path]`; an exception marks it failed (with the error) and the others still run."""
    name = ".".join(path)
    print(f"[gpu_check] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        value = function()
    except Exception as error:  # noqa: BLE001 - one failing part must not cost the whole GPU session
        value = {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    value["seconds"] = time.perf_counter() - start
    target = results
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    print(f"[gpu_check] {name}: {value['status']} ({value['seconds']:.1f} s)", flush=True)
    return value


def _skip(results: dict[str, Any], path: tuple[str, ...], reason: str) -> None:
    name = ".".join(path)
    target = results
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = {"status": "skipped", "reason": reason}
    results["skipped"].append(f"{name}: {reason}")
    print(f"[gpu_check] SKIPPED {name}: {reason}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.fsdp_worker:
        fsdp_worker(args)
        return {}
    cuda = torch.cuda.is_available()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    teacher = build_teacher(args)
    student = build_student(teacher)
    dataset = synthetic_dataset(args.batch_size * args.steps, args.seq_len, teacher.config.vocab_size, 2)
    results: dict[str, Any] = {
        "settings": {
            "quick": args.quick,
            "teacher": args.teacher
            or f"random BertConfig ({teacher.config.num_hidden_layers} layers, hidden {teacher.config.hidden_size})",
            "student_layers": student.config.num_hidden_layers,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "rounds": args.rounds,
            "train_examples": len(dataset),
        },
        "environment": {
            "device": device_name("cuda" if cuda else "cpu"),
            "cuda": torch.version.cuda if cuda else None,
            "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "cpu_count": os.cpu_count(),
        },
        "skipped": [],
    }
    precisions = GPU_PRECISIONS if cuda else ("fp32",)
    if not cuda:
        for precision in GPU_PRECISIONS:
            _skip(results, ("throughput", precision), NEEDS_CUDA)
            _skip(results, ("exactness", precision), NEEDS_CUDA)
    for precision in precisions:
        if precision == "bf16" and not results["environment"]["bf16_supported"]:
            _skip(results, ("throughput", precision), "this GPU does not support bf16")
            _skip(results, ("exactness", precision), "this GPU does not support bf16")
            continue
        throughput = _run_part(
            results,
            ("throughput", precision),
            lambda p=precision: throughput_part(p, teacher, student, dataset, work_dir, args),
        )
        if throughput["status"] == "ok":
            _run_part(
                results,
                ("exactness", precision),
                lambda p=precision: exactness_part(p, teacher, student, dataset, work_dir, args),
            )
        else:
            _skip(results, ("exactness", precision), "the throughput part, which builds its cache, failed")
    if cuda:
        _run_part(results, ("latency",), lambda: latency_part(teacher, "cuda", seq_len=args.seq_len))
        if results["environment"]["bf16_supported"]:

            def fsdp() -> dict[str, Any]:
                reference, _ = train_run("live", teacher, student, dataset, "bf16", work_dir, args)
                losses = [entry["loss"] for entry in reference.state.log_history if "loss" in entry]
                return fsdp_part(args, work_dir, losses)

            _run_part(results, ("fsdp2",), fsdp)
        else:
            _skip(results, ("fsdp2",), "this GPU does not support bf16, which the FSDP2 check trains in")
    else:
        _skip(results, ("latency",), NEEDS_CUDA)
        _skip(results, ("fsdp2",), f"{NEEDS_CUDA}; accelerate enables FSDP on accelerator devices only")
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"[gpu_check] wrote {args.output}; skipped: {len(results['skipped'])}", flush=True)
    return results


if __name__ == "__main__":
    main()
