"""Calibration batches: the few hundred examples pruning reads to score units, drop layers and rescale.

Every pruning step that reads data (`compute_importance`, `compute_layer_importance`, `prune`) takes an iterable of
batches as a `DataLoader` with a `DataCollatorWithPadding` yields them, and passes each through `prepare_batch`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def prepare_batch(batch: Mapping, device: torch.device | str) -> dict:
    """A calibration batch ready for `model(**batch)`: tensors moved to `device`, a `label` column renamed `labels`.

    The renaming is what `Trainer` does (datasets name the column `label`, models take `labels`), so a labelled
    calibration set scores against the model's loss.

    Args:
        batch: A dict of model inputs, e.g. from a `DataLoader` with a `DataCollatorWithPadding`.
        device: The model's device.

    Returns:
        A new dict; the input batch is left as it was.

    Example:
    ```python
    batch = prepare_batch({"input_ids": ids, "attention_mask": mask, "label": labels}, model.device)
    loss = model(**batch).loss
    ```
    """
    batch = dict(batch)
    if "label" in batch and "labels" not in batch:
        batch["labels"] = batch.pop("label")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
