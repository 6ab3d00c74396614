"""`compression_report`: what pruning saved, in parameters, bytes on disk and FLOPs per token, layer by layer.

`summarize` is the one measure of a model in hf-compress: `compression_report`, `PruningReport` and `describe_model`
(model cards and `comparison.json`) all take their numbers from it (or, for an architecture without a registered spec,
from the same `count_parameters` and `weight_bytes`), and `format_bytes` is the one way any of them shows a size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from .architectures import get_layers, get_spec
from .structure import ModelStructure, get_structure


@dataclass(frozen=True)
class ModelSummary:
    """Size and cost of one model.

    Args:
        parameters: Number of parameters (tied weights counted once).
        size_bytes: Bytes of tensor data `save_pretrained` writes to safetensors (`weight_bytes`: tied weights once;
            the file adds a JSON header of a few kB).
        structure: Heads and FFN neurons of each layer (`hf_compress.structure.ModelStructure`).
        flops_per_token: Encoder FLOPs per token at the report's sequence length: the q/k/v/output and FFN
            projections (2 FLOPs per multiply-add) plus attention scores and their weighted sum (`4 * seq_len` FLOPs
            per head dimension). Embeddings, layer norms, softmax and the task head are left out: pruning does not
            change them.
    """

    parameters: int
    size_bytes: int
    structure: ModelStructure
    flops_per_token: int

    @property
    def heads_per_layer(self) -> tuple[int, ...]:
        """Attention heads of each layer."""
        return self.structure.heads

    @property
    def ffn_per_layer(self) -> tuple[int, ...]:
        """FFN neurons (intermediate size) of each layer."""
        return self.structure.ffn

    @property
    def max_heads(self) -> int:
        """Heads of an unpruned layer."""
        return self.structure.max_heads

    @property
    def num_layers(self) -> int:
        return self.structure.num_layers

    def to_dict(self) -> dict:
        """Plain data, the structure flattened into `heads_per_layer`, `ffn_per_layer` and `max_heads` beside
        `parameters`, `size_bytes` and `flops_per_token` (the keys saved pruning reports use)."""
        return {
            "parameters": self.parameters,
            "size_bytes": self.size_bytes,
            "heads_per_layer": self.heads_per_layer,
            "ffn_per_layer": self.ffn_per_layer,
            "max_heads": self.max_heads,
            "flops_per_token": self.flops_per_token,
        }


@dataclass(frozen=True)
class CompressionReport:
    """The result of `compression_report`; `print(report)` shows it as a table.

    Args:
        model: Summary of the compressed model.
        reference: Summary of the reference (e.g. unpruned) model, or `None`.
        seq_len: Sequence length the FLOPs are counted at.
    """

    model: ModelSummary
    reference: ModelSummary | None
    seq_len: int

    def ratio(self, field: str) -> float | None:
        """`field` of the model over the reference's (e.g. `report.ratio("flops_per_token")`), `None` without one."""
        if self.reference is None:
            return None
        reference = getattr(self.reference, field)
        return getattr(self.model, field) / reference if reference else float("nan")

    def to_dict(self) -> dict:
        """Plain data: `{"model": ..., "reference": ... or None, "seq_len": ...}`, each summary as its `to_dict()`."""
        return {
            "model": self.model.to_dict(),
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "seq_len": self.seq_len,
        }

    def __str__(self) -> str:
        header = ["", "model"] + (["reference", "model / reference"] if self.reference is not None else [])
        rows = []
        for label, get, show in _ROWS:
            value = get(self.model)
            row = [label.format(seq_len=self.seq_len), show(value)]
            if self.reference is not None:
                reference = get(self.reference)
                row += [show(reference), f"{value / reference:.1%}" if reference else "n/a"]
            rows.append(row)
        per_layer = [
            [str(i), f"{heads}/{self.model.max_heads}", f"{ffn:,}"]
            for i, (heads, ffn) in enumerate(zip(self.model.heads_per_layer, self.model.ffn_per_layer, strict=True))
        ]
        return "\n".join(
            [*_format_table(header, rows), "", *_format_table(["layer", "heads", "FFN neurons"], per_layer)]
        )


def compression_report(
    model: PreTrainedModel, reference: PreTrainedModel | None = None, seq_len: int = 128
) -> CompressionReport:
    """Parameters, size on disk, heads and FFN neurons per layer, and FLOPs per token of `model`, against `reference`.

    Args:
        model: The compressed model (any registered architecture).
        reference: The model to compare with, e.g. the unpruned one; `None` for no comparison.
        seq_len: Sequence length at which to count FLOPs per token (attention costs grow with it).

    Returns:
        A `CompressionReport`; `print(report)` shows the table, `report.ratio("flops_per_token")` a ratio,
        `report.to_dict()` plain data.

    Example:
    ```python
    report = compression_report(pruned, reference=AutoModelForSequenceClassification.from_pretrained(teacher))
    print(report)
    ```
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer: the sequence length FLOPs are counted at.")
    return CompressionReport(
        model=summarize(model, seq_len),
        reference=summarize(reference, seq_len) if reference is not None else None,
        seq_len=seq_len,
    )


def summarize(model: PreTrainedModel, seq_len: int = 128) -> ModelSummary:
    """The `ModelSummary` of one model: the one measure of a model's size and cost in hf-compress.

    `compression_report`, `PruningReport` and `describe_model` (model cards, `comparison.json`) all read it, so a
    number never differs between them.

    Args:
        model: A model of a registered architecture.
        seq_len: Sequence length at which to count FLOPs per token.

    Returns:
        Its parameters (`count_parameters`), bytes of weights (`weight_bytes`), structure and FLOPs per token.
    """
    spec = get_spec(model)
    structure = get_structure(model)
    flops = 0
    for layer, heads in zip(get_layers(model), structure.heads, strict=True):
        paths = [spec.attention_output, spec.ffn_in, spec.ffn_out]
        if heads:
            paths += [spec.query, spec.key, spec.value]
        for path in paths:
            linear = layer.get_submodule(path)
            flops += 2 * linear.in_features * linear.out_features
        flops += 4 * seq_len * heads * structure.head_dim  # scores q.k and weighted sum of v, per token
    return ModelSummary(
        parameters=count_parameters(model),
        size_bytes=weight_bytes(model),
        structure=structure,
        flops_per_token=flops,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`, tied weights (one tensor under two names) counted once."""
    return sum(parameter.numel() for parameter in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of tensor data that `save_pretrained` writes to safetensors: the size of the weights on disk.

    Computed from the state dict, without writing anything; tied weights count once, as safetensors stores them once.
    The JSON header of the file and the checkpoint's `config.json` (a few kB that compression does not shrink) are
    left out.
    """
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def format_count(value: float) -> str:
    """`value` with a K / M / G suffix: `format_count(22_410_000) == "22.41 M"`."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:,.0f}"


def format_bytes(size: int) -> str:
    """`size` in decimal units, the ones the Hub and `ls --si` use: `format_bytes(90_867_952) == "90.9 MB"`.

    Every size hf-compress prints or writes (reports, model cards, the example's table, the benchmark) goes through
    this one function, so one file never shows as two different numbers of "MB".
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# (label, value of a ModelSummary, how to show it): the rows of the report's summary table.
_ROWS = (
    ("parameters", lambda s: s.parameters, "{:,}".format),
    ("size on disk", lambda s: s.size_bytes, format_bytes),
    ("encoder FLOPs/token @ {seq_len} tokens", lambda s: s.flops_per_token, format_count),
    ("layers", lambda s: s.num_layers, str),
    ("attention heads", lambda s: sum(s.heads_per_layer), "{:,}".format),
    ("FFN neurons", lambda s: sum(s.ffn_per_layer), "{:,}".format),
)


def _format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return [render(header), "  ".join("-" * width for width in widths), *(render(row) for row in rows)]
