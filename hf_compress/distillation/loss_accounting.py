"""What the distillation loss averages over, and how its parts are averaged for the logs.

Every part of the loss is a sum divided by a count of items (see `hf_compress.distillation.losses`): the soft and hard
losses average over the labelled examples or tokens, the hidden-state and attention losses over the examples.
`DistillationTrainer` passes the counts of the whole accumulated (and gathered) batch as `num_items_in_batch`, so that
gradient accumulation and several processes give exactly the loss of the big batch. The logged parts are averaged over
the logging interval (training) or the whole evaluation set, and over processes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from accelerate import Accelerator


class ItemCounts(NamedTuple):
    """What `DistillationTrainer` passes as `num_items_in_batch`: counts over the accumulated (and gathered) batch."""

    items: torch.Tensor  # positions the soft and hard losses average over (labelled examples or tokens)
    examples: torch.Tensor  # rows, which the hidden-state and attention losses average over


def count_items(batch: dict[str, Any], token_level: bool, regression: bool) -> tuple[torch.Tensor, int]:
    """(positions the soft and hard losses average over, rows) of one batch.

    Args:
        batch: A collated batch.
        token_level: Whether the task predicts per token; without labels, its soft loss averages over the non-padding
            tokens.
        regression: Whether the head is a regression head, whose losses average over the examples.
    """
    rows = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    labels = batch.get("labels")
    if regression:
        return torch.tensor(rows), rows
    if labels is not None:
        return labels.ne(-100).sum(), rows
    if token_level:
        mask = batch.get("attention_mask")
        return (mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())), rows
    return torch.tensor(rows), rows


def accumulated_item_counts(
    batches: list[dict[str, Any]],
    token_level: bool,
    regression: bool,
    device: torch.device,
    accelerator: Accelerator | None = None,
) -> ItemCounts | None:
    """The item counts of the micro-batches of one optimizer step, summed, and over processes with `accelerator`.

    Returns:
        The counts on `device`, or `None` for no batches.
    """
    if not batches:
        return None
    counts = [count_items(batch, token_level, regression) for batch in batches]
    totals = torch.stack([sum(items for items, _ in counts), torch.tensor(sum(rows for _, rows in counts))])
    totals = totals.to(device=device, dtype=torch.long)
    if accelerator is not None:
        totals = accelerator.gather(totals[None]).sum(0)
    return ItemCounts(items=totals[0], examples=totals[1])


class TrainingLossParts:
    """Each part's sum over the training steps since the last log, reported as a mean per step.

    Attributes:
        sums: Part name -> sum of its values (detached) since the last log.
        logged_step: The global step of the last log.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.logged_step = 0

    def reset(self, step: int) -> None:
        """Start a new logging interval at global step `step` (when training (re)starts, and after each log)."""
        self.sums = {}
        self.logged_step = step

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            previous = self.sums.get(name)
            self.sums[name] = value.detach() if previous is None else previous + value.detach()

    def pop_means(self, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Each part's mean per step over the interval ending at `step` and over processes; starts a new interval.

        Empty when nothing was added since the last log (and then the interval goes on).
        """
        if not self.sums:
            return {}
        names = sorted(self.sums)
        local = torch.stack([self.sums[name].float() for name in names])  # (num_parts,)
        mean_over_processes = accelerator.gather(local[None]).mean(0)  # (num_processes, num_parts) -> mean
        steps = max(step - self.logged_step, 1)
        means = {name: value / steps for name, value in zip(names, mean_over_processes.tolist(), strict=True)}
        self.reset(step)
        return means


class EvaluationLossParts:
    """Each part's sum over the evaluation set and the number of items it averages over, reported as a mean.

    Batches hold different numbers of examples (the last one) and of labelled tokens, so the evaluation set's average
    is the sum of the parts' sums divided by the sum of the counts, not the mean of the batch averages.
    """

    def __init__(self):
        self.totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        self.totals = {}

    def add(
        self,
        parts: dict[str, torch.Tensor],
        local_counts: tuple[torch.Tensor, int],
        items: torch.Tensor | int | None,
        examples: torch.Tensor | None,
        scale: int,
    ) -> None:
        """Accumulate each part's sum over one evaluation batch and the number of items it averages over.

        Args:
            parts: The batch's loss parts, each divided by `items` (soft, hard) or `examples` (the others).
            local_counts: `count_items` of the batch: its own (items, rows).
            items, examples: The counts the parts were divided by; `None` when they were divided by the batch's own.
            scale: The factor the parts were multiplied by to undo DDP's mean over processes.
        """
        local_items, local_rows = local_counts
        for name, value in parts.items():
            per_item = name in ("soft_loss", "hard_loss")
            local = local_items if per_item else local_rows
            # The count the part was divided by (this batch's own when none was passed); `scale` undoes the DDP factor.
            divisor = items if per_item else examples
            divisor = local if divisor is None else divisor
            value = value.detach().float()
            total = value * torch.as_tensor(divisor, device=value.device, dtype=torch.float32).clamp_min(1) / scale
            count = torch.as_tensor(local, device=value.device, dtype=torch.float32)
            previous = self.totals.get(name)
            self.totals[name] = (total, count) if previous is None else (previous[0] + total, previous[1] + count)

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Each part's average over the whole evaluation set, summed over processes; empty when nothing was added."""
        if not self.totals:
            return {}
        names = sorted(self.totals)
        local = torch.stack([torch.stack(self.totals[name]) for name in names])  # (num_parts, 2)
        totals = accelerator.gather(local[None]).sum(0)  # (num_processes, num_parts, 2) -> sum
        return {name: total / max(count, 1.0) for name, (total, count) in zip(names, totals.tolist(), strict=True)}
