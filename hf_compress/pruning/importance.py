"""How much each attention head, FFN neuron and layer of an encoder matters for its predictions.

Head and neuron scores (`compute_importance`) come in three flavours:

- `"magnitude"`: weight norms, no data needed. A head scores `||W_o[:, head]|| * ||W_v[head, :]||` (the norms of the
  columns of the attention output projection and of the value rows it reads), a neuron `||W_down[:, j]|| *
  ||W_up[j, :]||`. Cheap, but blind to what the data needs.
- `"taylor"`: the mean over examples of `|dL/dm|` for a mask variable `m` multiplying each head / neuron output
  (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"), a first-order estimate of the loss change when
  the unit is removed.
- `"fisher"`: the mean over examples of `(dL/dm)^2`, the diagonal of the empirical Fisher information of the masks
  (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"), proportional to a second-order
  estimate of the loss increase when the unit is removed. Head and neuron scores are on the same scale, so they can
  be ranked against each other (`prune` puts magnitude and Taylor scores of the two kinds on one scale first).

The loss `L` is the model's own loss when the batches carry `labels`; without labels it is the cross-entropy against
the model's own predictions (the arg-max of its logits), so unlabelled calibration text works too. Gradients are per
example: the masks get a batch dimension, so one backward pass yields every example's gradient.

The masks are `UnitMasks` (`hf_compress.pruning.unit_masks`): forward pre-hooks, as transformers 5 removed
`head_mask`. Every hook is removed when scoring ends, also when it fails.

Layer scores (`compute_layer_importance`) serve depth pruning: `"cosine"` is `1 - cos(layer input, layer output)`
averaged over real tokens (a layer that barely changes its input scores low), `"loss"` the increase in loss when the
layer is skipped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..architectures import get_layers, get_spec
from ..structure import get_structure
from .calibration import prepare_batch
from .constants import IMPORTANCE_METHODS, LAYER_IMPORTANCE_METHODS
from .unit_masks import UnitMasks


@dataclass
class ImportanceScores:
    """Importance of every head and FFN neuron (and optionally layer) of a model; higher means more important.

    Args:
        heads: One tensor of shape `(num_heads_in_layer,)` per layer.
        ffn: One tensor of shape `(ffn_neurons_in_layer,)` per layer.
        layers: Optional tensor of shape `(num_layers,)` from `compute_layer_importance`.
        method: How the head / neuron scores were computed (one of `IMPORTANCE_METHODS`).
        num_examples: How many examples the scores average over (0 for `"magnitude"`).

    Example:
    ```python
    scores = compute_importance(model, calibration_dataloader, method="fisher")
    scores.save("scores.safetensors")
    scores = ImportanceScores.load("scores.safetensors")
    ```
    """

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    layers: torch.Tensor | None = None
    method: str = "fisher"
    num_examples: int = 0

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores to a safetensors file (tensors plus a JSON header; no pickle)."""
        tensors = {f"heads.{i}": t.detach().float().cpu().contiguous() for i, t in enumerate(self.heads)}
        tensors.update({f"ffn.{i}": t.detach().float().cpu().contiguous() for i, t in enumerate(self.ffn)})
        if self.layers is not None:
            tensors["layers"] = self.layers.detach().float().cpu().contiguous()
        metadata = {
            "format": "hf-compress-importance",
            "method": self.method,
            "num_examples": str(self.num_examples),
            "num_layers": str(len(self.heads)),
        }
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceScores:
        """Read scores written by `save`."""
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "hf-compress-importance":
                raise ValueError(f"{path} is not an hf-compress importance file (written by `ImportanceScores.save`).")
            num_layers = int(metadata["num_layers"])
            keys = set(f.keys())
            return cls(
                heads=[f.get_tensor(f"heads.{i}") for i in range(num_layers)],
                ffn=[f.get_tensor(f"ffn.{i}") for i in range(num_layers)],
                layers=f.get_tensor("layers") if "layers" in keys else None,
                method=metadata["method"],
                num_examples=int(metadata["num_examples"]),
            )


def _logits_of(outputs) -> list[torch.Tensor]:
    logits = [outputs[k] for k in ("logits", "start_logits", "end_logits") if outputs.get(k) is not None]
    if not logits:
        raise ValueError(
            "The model returned no `logits` (nor `start_logits`/`end_logits`), so importance cannot be scored "
            "without labels. Pass batches with `labels`."
        )
    return logits


def pseudo_label_loss(outputs, attention_mask: torch.Tensor | None, targets: list[torch.Tensor] | None = None):
    """Cross-entropy of the model's logits against its own arg-max predictions (or given `targets`), ignoring padding.

    Returns:
        `(loss, targets)`: the mean loss and the targets used, so a later pass can score against the same targets.
    """
    logits = _logits_of(outputs)
    if targets is None:
        if any(lg.shape[-1] == 1 for lg in logits):
            raise ValueError("A regression head (one output) has no arg-max prediction: pass batches with `labels`.")
        targets = [lg.detach().argmax(-1) for lg in logits]
        if attention_mask is not None:
            # Token-level logits: padding positions get the ignore index -100.
            targets = [t.masked_fill(attention_mask == 0, -100) if t.dim() == 2 else t for t in targets]
    loss = sum(F.cross_entropy(lg.flatten(0, -2).float(), t.flatten()) for lg, t in zip(logits, targets, strict=True))
    return loss, targets


def _scoring_loss(outputs, batch: dict) -> torch.Tensor:
    if outputs.get("loss") is not None:
        return outputs["loss"]
    return pseudo_label_loss(outputs, batch.get("attention_mask"))[0]


def _magnitude_scores(model: PreTrainedModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    spec = get_spec(model)
    head_dim = spec.head_dim(model.config)
    heads, ffn = [], []
    for layer, count in zip(get_layers(model), get_structure(model).heads, strict=True):
        if count == 0:
            heads.append(torch.zeros(0))
        else:
            w_out = layer.get_submodule(spec.attention_output).weight.detach().float()  # (hidden, heads * head_dim)
            w_value = layer.get_submodule(spec.value).weight.detach().float()  # (heads * head_dim, hidden)
            out_norm = w_out.view(w_out.shape[0], count, head_dim).pow(2).sum((0, 2)).sqrt()
            value_norm = w_value.view(count, head_dim, -1).pow(2).sum((1, 2)).sqrt()
            heads.append((out_norm * value_norm).cpu())
        w_down = layer.get_submodule(spec.ffn_out).weight.detach().float()  # (hidden, ffn)
        w_up = layer.get_submodule(spec.ffn_in).weight.detach().float()  # (ffn, hidden)
        ffn.append((w_down.norm(dim=0) * w_up.norm(dim=1)).cpu())
    return heads, ffn


def compute_importance(
    model: PreTrainedModel,
    dataloader: Iterable[Mapping] | None = None,
    method: str = "fisher",
    num_batches: int | None = None,
    show_progress: bool = True,
    skip_layers: Iterable[int] = (),
) -> ImportanceScores:
    """Score every attention head and FFN neuron of `model` (see the module docstring for the methods).

    The model is scored in eval mode (no dropout) and its weights, gradients and training mode are left as they were.

    Args:
        model: A model of a registered architecture, possibly already pruned.
        dataloader: Batches of model inputs (dicts of tensors, e.g. from a `DataCollatorWithPadding`); with `labels`
            the model's loss is used, without them the cross-entropy against the model's own predictions. Not needed
            for `"magnitude"`.
        method: `"magnitude"`, `"taylor"` or `"fisher"`.
        num_batches: Score at most this many batches (all when `None`).
        show_progress: Show a tqdm progress bar over the batches.
        skip_layers: Layers to skip while scoring (e.g. layers about to be removed); their units score 0.

    Returns:
        `ImportanceScores` with one tensor per layer for heads and for FFN neurons.

    Example:
    ```python
    scores = compute_importance(model, DataLoader(calib, batch_size=32, collate_fn=collator), method="fisher")
    least_important_head_of_layer_0 = scores.heads[0].argmin()
    ```
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"Unknown importance method {method!r}; choose one of {', '.join(IMPORTANCE_METHODS)}.")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}.")
    if method == "magnitude":
        heads, ffn = _magnitude_scores(model)
        return ImportanceScores(heads=heads, ffn=ffn, method=method)
    if dataloader is None:
        raise ValueError(f"Importance method {method!r} needs data: pass a dataloader, or use method='magnitude'.")

    structure = get_structure(model)
    heads = [torch.zeros(n, dtype=torch.float64) for n in structure.heads]
    ffn = [torch.zeros(n, dtype=torch.float64) for n in structure.ffn]
    totals = {"heads": heads, "ffn": ffn}
    device = next(model.parameters()).device
    was_training = model.training
    num_examples = 0
    total = num_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    # Only the masks need gradients: frozen weights spare autograd the weight gradients and their saved inputs.
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with UnitMasks(model, per_example=True, skip_layers=skip_layers) as masks, torch.enable_grad():
            batches = itertools.islice(dataloader, num_batches)
            for batch in tqdm(batches, total=total, desc=f"Scoring ({method})", disable=not show_progress):
                batch = prepare_batch(batch, device)
                masks.created.clear()
                outputs = model(**batch)
                batch_size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                num_examples += batch_size
                if not masks.created:  # every layer has lost all its heads and neurons: nothing to score
                    continue
                # The loss is a mean over the batch; scaling by the batch size makes each mask's gradient that
                # example's own dL/dm (each example only sees its own mask row).
                loss = _scoring_loss(outputs, batch) * batch_size
                grads = torch.autograd.grad(loss, [m for _, _, m in masks.created], allow_unused=True)
                for (kind, layer, _), grad in zip(masks.created, grads, strict=True):
                    if grad is not None:  # None: the unit cannot reach the loss (e.g. a skipped layer)
                        grad = grad.detach().double().cpu()  # (batch, units)
                        totals[kind][layer] += grad.square().sum(0) if method == "fisher" else grad.abs().sum(0)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        model.train(was_training)
    if num_examples == 0:
        raise ValueError("The dataloader yielded no batches; importance needs at least one batch of data.")
    return ImportanceScores(
        heads=[(t / num_examples).float() for t in heads],
        ffn=[(t / num_examples).float() for t in ffn],
        method=method,
        num_examples=num_examples,
    )


def _layer_io_hooks(layers: nn.ModuleList, store: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    def make(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            store[index] = (hidden_in.detach(), hidden_out.detach())

        return hook

    return [layer.register_forward_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]


@torch.no_grad()
def compute_layer_importance(
    model: PreTrainedModel,
    dataloader: Iterable[Mapping],
    method: str = "cosine",
    num_batches: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Score every transformer layer for depth pruning; higher means more important.

    Args:
        model: A model of a registered architecture.
        dataloader: Batches of model inputs (labels optional, as for `compute_importance`).
        method: `"cosine"`: mean over real tokens of `1 - cos(layer input, layer output)` (one forward pass per batch).
            `"loss"`: increase of the loss when the layer is skipped (one extra forward pass per layer and batch).
        num_batches: Score at most this many batches.
        show_progress: Show a tqdm progress bar over the batches.

    Returns:
        A float tensor of shape `(num_layers,)`.

    Example:
    ```python
    scores = compute_layer_importance(model, calibration_dataloader, method="cosine")
    drop_layers(model, scores.argsort()[:2].tolist())  # remove the two layers that change their input least
    ```
    """
    if method not in LAYER_IMPORTANCE_METHODS:
        raise ValueError(f"Unknown layer importance method {method!r}; choose one of {LAYER_IMPORTANCE_METHODS}.")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}.")
    layers = get_layers(model)
    scores = torch.zeros(len(layers), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    weight = 0
    total = num_batches if num_batches is not None else (len(dataloader) if hasattr(dataloader, "__len__") else None)
    model.eval()
    try:
        batches = itertools.islice(dataloader, num_batches)
        for batch in tqdm(batches, total=total, desc=f"Layer importance ({method})", disable=not show_progress):
            batch = prepare_batch(batch, device)
            if method == "cosine":
                store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
                handles = _layer_io_hooks(layers, store)
                try:
                    model(**batch)
                finally:
                    for handle in handles:
                        handle.remove()
                token_mask = batch.get("attention_mask")
                for index, (hidden_in, hidden_out) in store.items():
                    distance = 1 - F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (batch, seq)
                    if token_mask is not None:
                        distance = distance[token_mask.bool()]
                    scores[index] += distance.double().sum().cpu()
                weight += int(token_mask.sum()) if token_mask is not None else distance.numel()
            else:
                outputs = model(**batch)
                labelled = outputs.get("loss") is not None
                base, targets = (
                    (outputs["loss"], None) if labelled else pseudo_label_loss(outputs, batch.get("attention_mask"))
                )
                for index in range(len(layers)):
                    with UnitMasks(model, skip_layers=[index]):
                        skipped = model(**batch)
                    loss = (
                        skipped["loss"]
                        if labelled
                        else pseudo_label_loss(skipped, batch.get("attention_mask"), targets)[0]
                    )
                    scores[index] += float(loss - base)
                weight += 1
    finally:
        model.train(was_training)
    if weight == 0:
        raise ValueError("The dataloader yielded no batches; layer importance needs at least one batch of data.")
    return (scores / weight).float()
