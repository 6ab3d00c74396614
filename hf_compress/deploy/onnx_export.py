"""Export what hf-compress writes to ONNX, quantize it to int8 with ONNX Runtime, and run it.

`export_onnx` takes any checkpoint hf-compress produces (a student from `create_student` or `bert_to_distilbert`, a
model pruned with `prune_heads` / `prune_ffn_neurons` / `drop_layers`, uniformly or per layer, including layers left
with no heads or no FFN neurons, or a stock original), in memory or as a folder, and writes a folder that ONNX Runtime
serves without PyTorch or hf-compress:

```
output_dir/
  model.onnx                  fp32 graph; inputs (batch_size, sequence_length), both axes dynamic
  model_int8_dynamic.onnx     with quantize="dynamic": int8 weights, activations quantized per batch
  model_int8_static.onnx      with quantize="static": int8 weights and calibrated activation scales (QDQ)
  config.json, tokenizer files
  onnx_export.json            how it was made: exporter, opset, inputs, outputs, measured error vs PyTorch
```

The names follow optimum's layout (`model.onnx`, inputs `input_ids` / `attention_mask` / `token_type_ids`, outputs
`logits` / `last_hidden_state` / `start_logits` ...), meant for `optimum.onnxruntime.ORTModelFor...from_pretrained`
and `pipeline(..., model=ort_model)`. That route is untested: optimum-onnx 0.1.0 (the only release) requires
transformers < 4.58 and fails to import with transformers 5 (`is_offline_mode` moved), and `optimum[onnxruntime]`
resolves to it. For the same reason optimum's exporter is not used either; the export is PyTorch's own,
`torch.onnx.export(..., dynamo=True)` (the default in torch 2.13), which captures the model with `torch.export` and
so exports exactly the modules the model has: a pruned layer's narrower projections, the `EmptyAttention` of a layer
without heads and a zero-width FFN need no special case (ONNX Runtime runs the empty MatMuls, which only pass the
bias on). The TorchScript exporter (`dynamo=False`) is not used: in a test here its graph was off by ~6e-3 on padded
batches of shapes other than the example's. Every export is checked: ONNX Runtime and PyTorch run padded batches of
shapes other than the export's and must agree within `atol` (1e-4).

Run an export with `OnnxModel` (a thin wrapper around `onnxruntime.InferenceSession` that takes tokenizer output):

```python
from hf_compress import OnnxModel, export_onnx

export_onnx("pruned-checkpoint", "pruned-onnx", quantize="dynamic")
model = OnnxModel("pruned-onnx")  # or OnnxModel("pruned-onnx", file_name="model_int8_dynamic.onnx")
logits = model(**model.tokenizer(["a great movie"], return_tensors="np"))["logits"]
model.classify(["a great movie", "a dull plot"])  # [{"label": ..., "score": ...}, ...] like pipeline()
```

Requires the `onnx` extra: `pip install onnx onnxscript onnxruntime` (onnxscript is what the dynamo exporter uses).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging as _pylogging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..architectures import get_spec
from ..structure import get_structure, stock_class
from .checkpoint import load_compressed
from .onnx_quantization import quantize_onnx
from .onnx_runtime import (
    EXPORT_INFO_FILE,
    ONNX_FILE,
    QUANTIZED_FILES,
    find_tokenizer,
    ort_session,
    require_onnx,
)

logger = logging.get_logger(__name__)

DEFAULT_OPSET = 18
# The task heads whose inputs are (batch, sequence) token ids and that the export is tested with. Multiple choice
# ((batch, choices, sequence) inputs) and the pre-training / causal-LM heads are refused.
SUPPORTED_HEADS = (
    "Model",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMaskedLM",
)
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_SKIPPED_OUTPUTS = ("loss", "hidden_states", "attentions")
# (batch, sequence) of the example the graph is captured with, and of the padded batches it is then checked with:
# other batch sizes and both shorter and longer sequences, so a shape the capture baked in cannot go unnoticed.
_EXPORT_SHAPE = (2, 16)
_CHECK_SHAPES = ((3, 9), (4, 37), (1, 5))


@dataclass
class OnnxExport:
    """What `export_onnx` wrote.

    Args:
        output_dir: The folder.
        model_path: The fp32 graph (`output_dir/model.onnx`).
        quantized_paths: `{"dynamic": path, "static": path}` for the int8 graphs written.
        input_names: Graph inputs, in order (`input_ids`, `attention_mask`, and `token_type_ids` when the model takes
            them).
        output_names: Graph outputs, named as the model's output fields (`logits`, `last_hidden_state`, ...).
        opset: ONNX opset of the graph.
        max_abs_diff: Largest absolute difference between ONNX Runtime and PyTorch outputs on the check batches.
        int8_max_abs_diff: Same for each int8 graph (against PyTorch fp32; int8 is expected to differ).
    """

    output_dir: Path
    model_path: Path
    quantized_paths: dict[str, Path] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    opset: int = DEFAULT_OPSET
    max_abs_diff: float = 0.0
    int8_max_abs_diff: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (paths as strings)."""
        return json.loads(json.dumps(asdict(self), default=os.fspath))


class _ExportWrapper(nn.Module):
    """Calls the model with keyword inputs and returns the chosen output fields as a tuple (ONNX outputs, in order)."""

    def __init__(self, model: nn.Module, output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        outputs = self.model(**kwargs, return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _input_names(model: PreTrainedModel) -> list[str]:
    return [name for name in _INPUT_NAMES if name != "token_type_ids" or _accepts(model, name)]


def _max_sequence_length(config: PretrainedConfig) -> int:
    # RoBERTa-style position ids start after the padding index, so two positions fewer are usable.
    return max(2, getattr(config, "max_position_embeddings", 512) - 2)


def _example_inputs(
    config: PretrainedConfig, input_names: Sequence[str], batch_size: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Random token ids with a padded attention mask (row i is shorter than row i-1) and both token types."""
    seq_len = min(seq_len, _max_sequence_length(config))
    generator = torch.Generator().manual_seed(seed)
    vocab_size = getattr(config, "vocab_size", 100)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size):
        attention_mask[row, max(1, seq_len - row * max(1, seq_len // (batch_size + 1))) :] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in input_names:
        token_type_ids = torch.zeros_like(input_ids)
        if getattr(config, "type_vocab_size", 1) > 1:
            token_type_ids[:, seq_len // 2 :] = 1  # a sentence pair: the graph must not assume segment 0
        inputs["token_type_ids"] = token_type_ids
    return inputs


def _check_model(model: Any) -> None:
    """Refuse models the export would get wrong, with the fix; before anything is written."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"export_onnx needs a transformers model or a checkpoint folder, got {type(model).__name__}. Load the "
            "checkpoint first (`hf_compress.load_compressed(folder)`) or pass its folder."
        )
    get_spec(model)  # an unsupported architecture raises a ValueError listing the supported ones
    class_name = stock_class(type(model)).__name__
    if not class_name.endswith(SUPPORTED_HEADS):
        raise ValueError(
            f"export_onnx does not export {class_name}: it exports base models and the heads "
            f"{', '.join('*' + head for head in SUPPORTED_HEADS[1:])}, whose inputs are (batch, sequence) token ids. "
            "Export the base model (`model.base_model`) or load the checkpoint with one of those heads."
        )
    for name, module in model.named_modules():
        if any(type(hook).__module__ == "torch.nn.utils.prune" for hook in module._forward_pre_hooks.values()):
            raise ValueError(
                f"The model has live magnitude-pruning masks (module {name or 'model'!r} recomputes its weight from "
                "`weight_orig * weight_mask` in a hook, which the export would not capture as a plain weight). Fold "
                "them first: `hf_compress.make_permanent(model)`."
            )
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            raise ValueError(
                f"The model is quantized by PyTorch (module {name!r} is a {type(module).__name__}); its packed int8 "
                "weights do not export to ONNX. Export the fp32 model instead and let ONNX Runtime quantize it: "
                "`export_onnx(fp32_model, output_dir, quantize='dynamic')`."
            )
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        raise ValueError(
            f"The model is on {parameter.device}; export_onnx exports and checks it on CPU. Move it first: "
            "`model.to('cpu')`."
        )
    if parameter is not None and parameter.dtype != torch.float32:
        raise ValueError(
            f"The model's weights are {parameter.dtype}; export_onnx writes an fp32 graph (int8 comes from "
            "`quantize=`). Convert it first: `model.float()`."
        )


def _local_dir(path: Any) -> Path | None:
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        return Path(path).resolve()
    return None


def _check_output_dir(output_dir: Path, model_dirs: Iterable[Path | None]) -> dict | None:
    """Refuse an output folder that would mix the export with other files; the previous export's info, if any."""
    resolved = output_dir.resolve()
    for model_dir in model_dirs:
        if model_dir is not None and model_dir == resolved:
            raise ValueError(
                f"output_dir {os.fspath(output_dir)!r} is the model's own checkpoint folder; the export would mix "
                "its files with the checkpoint's. Pass another folder, e.g. f'{folder}-onnx'."
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {os.fspath(output_dir)!r} is a file; pass a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        info_path = output_dir / EXPORT_INFO_FILE
        if not info_path.is_file():
            raise ValueError(
                f"output_dir {os.fspath(output_dir)!r} is not empty and holds no earlier ONNX export "
                f"({EXPORT_INFO_FILE}); export_onnx only writes into an empty folder or over its own export. Pass a "
                "new or empty folder."
            )
        return json.loads(info_path.read_text())
    return None


def _check_quantize(quantize: str | Sequence[str] | None) -> tuple[str, ...]:
    modes = (quantize,) if isinstance(quantize, str) else tuple(quantize or ())
    unknown = [mode for mode in modes if mode not in QUANTIZED_FILES]
    if unknown:
        raise ValueError(
            f"Unknown quantize mode(s) {unknown}; use 'dynamic', 'static', a list of both, or None (fp32 only)."
        )
    return tuple(dict.fromkeys(modes))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide exporter notices that say nothing about this model (torchvision ops, axis-name merging)."""

    def drop_torchvision(record: _pylogging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()

    registration = _pylogging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(drop_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*will not be used, since it shares the same shape constraints"
            )
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        registration.removeFilter(drop_torchvision)


def _max_diff(session, model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], output_names) -> float:
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            reference = model(**batch, return_dict=True)
        outputs = session.run(list(output_names), {k: v.numpy() for k, v in batch.items()})
        for name, value in zip(output_names, outputs, strict=True):
            worst = max(worst, float(np.abs(value - reference[name].numpy()).max()))
    return worst


def export_onnx(
    model_or_folder: PreTrainedModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    quantize: str | Sequence[str] | None = None,
    calibration_texts: Sequence[str] | None = None,
    max_length: int = 128,
    atol: float = 1e-4,
) -> OnnxExport:
    """Export a model to an ONNX Runtime folder (`model.onnx`, `config.json`, tokenizer), checked against PyTorch.

    Works for every checkpoint hf-compress writes: same-architecture and DistilBERT students, uniformly and
    non-uniformly pruned models (layers with no heads, no FFN neurons, dropped layers) and stock originals, with any
    head in `SUPPORTED_HEADS`. Batch size and sequence length are dynamic. After the export, ONNX Runtime and PyTorch
    run padded batches of other shapes (random ids, both token types) and must agree within `atol`; the difference
    is stored in `onnx_export.json` and returned.

    Nothing is written until every argument is checked. The model is exported as it is (eval mode for the export,
    its mode restored after) and is not modified.

    Args:
        model_or_folder: A model, or a checkpoint folder (or Hub id), loaded with `hf_compress.load_compressed`.
        output_dir: Folder to write; must be new, empty, or an earlier `export_onnx` output (whose files are
            replaced), and not the model's own folder.
        tokenizer: Tokenizer (or its folder) saved beside the graph, so the folder is self-contained; by default the
            checkpoint folder's tokenizer, if it has one. Needed for `quantize="static"` and `OnnxModel.classify`.
        opset: ONNX opset (at least 18, the exporter's lowest).
        quantize: Also write int8 graphs with ONNX Runtime: `"dynamic"`, `"static"` or both (see `quantize_onnx`).
        calibration_texts: Sentences to calibrate `"static"` quantization on (a few hundred from the task's data).
        max_length: Truncation length for the calibration sentences.
        atol: Largest accepted absolute difference between ONNX Runtime and PyTorch outputs.

    Returns:
        An `OnnxExport` with the paths written, input/output names, opset and the measured differences.

    Raises:
        ValueError: for an unsupported architecture or head, a model with live magnitude-pruning masks (fold them with
            `hf_compress.make_permanent`), a PyTorch-quantized, non-fp32 or non-CPU model, an `output_dir` that is the
            model's folder or a non-empty folder that is not an earlier export, an unknown `quantize` mode, or
            `"static"` without `calibration_texts` and a tokenizer.
        RuntimeError: when ONNX Runtime's outputs differ from PyTorch's by more than `atol` (the files stay, for
            inspection).
        ImportError: when onnx, onnxscript or onnxruntime is missing.

    Example:
    ```python
    from hf_compress import prune_heads
    from hf_compress import OnnxModel, export_onnx

    prune_heads(model, {0: [0, 1, 2, 3], 5: [7]})
    result = export_onnx(model, "pruned-onnx", tokenizer=tokenizer, quantize="dynamic")
    result.max_abs_diff  # e.g. 4e-7
    OnnxModel("pruned-onnx").classify(["a great movie"])
    ```
    """
    require_onnx()
    modes = _check_quantize(quantize)
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset={opset!r} is not supported: the dynamo exporter writes opset 18 or newer.")
    if getattr(torch.export.Dim, "DYNAMIC", None) is None:
        raise RuntimeError(f"torch {torch.__version__} is too old for dynamic-shape ONNX export; use torch 2.6+.")
    output_dir = Path(output_dir)
    source_dir = _local_dir(model_or_folder)
    name_or_path = getattr(getattr(model_or_folder, "config", None), "_name_or_path", None)
    previous = _check_output_dir(output_dir, (source_dir, _local_dir(name_or_path)))
    if isinstance(model_or_folder, (str, os.PathLike)):
        model = load_compressed(model_or_folder, dtype=torch.float32)
        if tokenizer is None and source_dir is not None:
            tokenizer = find_tokenizer(source_dir)
    else:
        model = model_or_folder
    _check_model(model)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if "static" in modes and (tokenizer is None or not calibration_texts):
        raise ValueError(
            "quantize='static' calibrates activation scales on real inputs: pass `calibration_texts` (a few hundred "
            "sentences of the task's data) and a `tokenizer`, or use quantize='dynamic', which needs no data."
        )

    input_names = _input_names(model)
    example = _example_inputs(model.config, input_names, *_EXPORT_SHAPE, seed=0)
    checks = [_example_inputs(model.config, input_names, *shape, seed=i + 1) for i, shape in enumerate(_CHECK_SHAPES)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fields = model(**example, return_dict=True)
        output_names = [name for name in fields.keys() if name not in _SKIPPED_OUTPUTS]
        wrapper = _ExportWrapper(model, output_names).eval()
        batch, sequence = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
        with _quiet_exporter():
            program = torch.onnx.export(
                wrapper,
                (),
                kwargs=example,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes={name: {0: batch, 1: sequence} for name in input_names},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )

        output_dir.mkdir(parents=True, exist_ok=True)
        for name in (previous or {}).get("files", {}).values():  # an earlier export's graphs: none may go stale
            for stale in (output_dir / name, output_dir / f"{name}.data"):
                stale.unlink(missing_ok=True)
        model_path = output_dir / ONNX_FILE
        program.save(os.fspath(model_path))  # weights go to model.onnx.data only past protobuf's 2 GB limit
        config = copy.deepcopy(model.config)
        config.architectures = [stock_class(type(model)).__name__]
        if hasattr(config, "auto_map"):  # it names modeling code for PyTorch weights; this folder has neither
            delattr(config, "auto_map")
        config.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        else:
            logger.warning(
                "export_onnx: no tokenizer given (and none in the checkpoint folder), so %s holds none; pass "
                "`tokenizer=` to make the folder usable on raw text.",
                output_dir,
            )

        session = ort_session(model_path, threads=1)
        max_abs_diff = _max_diff(session, model, checks, output_names)
        result = OnnxExport(
            output_dir=output_dir,
            model_path=model_path,
            input_names=input_names,
            output_names=output_names,
            opset=opset,
            max_abs_diff=max_abs_diff,
        )
        info = {
            "format": "hf-compress-onnx",
            "format_version": 1,
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch_version": torch.__version__,
            "onnxruntime_version": __import__("onnxruntime").__version__,
            "architecture": config.architectures[0],
            "structure": get_structure(model).to_dict(),
            "opset": opset,
            "inputs": input_names,
            "outputs": output_names,
            "dynamic_axes": {"0": "batch_size", "1": "sequence_length"},
            "files": {"fp32": ONNX_FILE},
            "max_abs_diff": max_abs_diff,
            "atol": atol,
        }
        (output_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if max_abs_diff > atol:
            raise RuntimeError(
                f"The exported graph's outputs differ from PyTorch's by up to {max_abs_diff:.3g} (> atol={atol}) on "
                f"padded batches; the files in {output_dir} are kept for inspection. Please report this with the "
                "model's config."
            )
        logger.info("Exported %s to %s (max |ORT - PyTorch| = %.3g).", info["architecture"], model_path, max_abs_diff)

        for mode in modes:
            path = quantize_onnx(
                output_dir, mode, calibration_texts=calibration_texts, tokenizer=tokenizer, max_length=max_length
            )
            result.quantized_paths[mode] = path
            result.int8_max_abs_diff[mode] = _max_diff(ort_session(path, threads=1), model, checks, output_names)
    finally:
        model.train(was_training)
    if result.int8_max_abs_diff:
        info = json.loads((output_dir / EXPORT_INFO_FILE).read_text())
        info["int8_max_abs_diff"] = result.int8_max_abs_diff
        (output_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return result
