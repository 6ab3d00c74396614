"""The runtimes a compressed model is measured in: PyTorch fp32 and int8, ONNX Runtime fp32 and int8.

Shared by `compression_table.py` and `onnx_runtime.py`. Every runtime of a model is made from its fp32 PyTorch form:
`pytorch-int8` with `quantize_dynamic_int8`, the ONNX Runtime ones from one `export_onnx` folder (`model.onnx`, and
the int8 graphs ONNX Runtime's quantizer writes beside it). ONNX Runtime sessions do not spin between runs
(`spinning=False`): spinning would steal the cores from the models timed next.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_compress import OnnxModel, export_onnx, quantize_dynamic_int8

#: Runtime name -> the ONNX graph it runs (`None`: a PyTorch runtime).
RUNTIMES = {
    "pytorch-fp32": None,
    "pytorch-int8": None,
    "onnx-fp32": "model.onnx",
    "onnx-int8-dynamic": "model_int8_dynamic.onnx",
    "onnx-int8-static": "model_int8_static.onnx",
}
#: The quantization modes of `export_onnx` the ONNX int8 runtimes need.
_ONNX_QUANTIZE = {"onnx-int8-dynamic": "dynamic", "onnx-int8-static": "static"}


def check_runtimes(runtimes: Sequence[str]) -> None:
    """Refuse unknown runtime names before any work."""
    unknown = [runtime for runtime in runtimes if runtime not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"Unknown or no runtimes {unknown}; choose from {list(RUNTIMES)}.")


def make_runtimes(
    model: PreTrainedModel,
    runtimes: Sequence[str],
    onnx_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    calibration_texts: Sequence[str],
    threads: int,
    export: bool = True,
) -> dict[str, Any]:
    """Runtime name -> a runnable form of `model` (an `nn.Module` or an `OnnxModel`), in the order of `runtimes`.

    The ONNX graphs are exported to `onnx_dir` when `export` is true or when that folder holds no export yet; static
    int8 is calibrated on `calibration_texts`.
    """
    onnx_runtimes = [runtime for runtime in runtimes if RUNTIMES[runtime] is not None]
    if onnx_runtimes and (export or not (onnx_dir / "onnx_export.json").is_file()):
        quantize = [_ONNX_QUANTIZE[runtime] for runtime in onnx_runtimes if runtime in _ONNX_QUANTIZE]
        export_onnx(
            model, onnx_dir, tokenizer=tokenizer, quantize=quantize or None, calibration_texts=calibration_texts
        )
    made: dict[str, Any] = {}
    for runtime in runtimes:
        if runtime == "pytorch-fp32":
            made[runtime] = model.eval()
        elif runtime == "pytorch-int8":
            made[runtime] = quantize_dynamic_int8(model)
        else:
            made[runtime] = OnnxModel(onnx_dir, file_name=RUNTIMES[runtime], threads=threads, spinning=False)
    return made


def runtime_size(runtime: str, runnable: Any, fp32_bytes: int) -> int:
    """Bytes of what a runtime serves: the ONNX graph, PyTorch int8 weights as `torch.save` writes them, or
    `fp32_bytes` (the safetensors of the fp32 model)."""
    if isinstance(runnable, OnnxModel):
        return runnable.path.stat().st_size
    if runtime == "pytorch-int8":
        buffer = io.BytesIO()
        torch.save(runnable.state_dict(), buffer)
        return buffer.getbuffer().nbytes
    return fp32_bytes


def logits_fn(runnable: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A function from a collated batch (tensors) to the logits, for PyTorch and ONNX Runtime alike."""
    if isinstance(runnable, OnnxModel):
        return lambda batch: torch.from_numpy(runnable(**batch)["logits"])

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return runnable(**batch).logits

    return run


def accuracy(runnable: Any, batches: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> float:
    """Accuracy of `runnable` on (inputs, labels) batches."""
    run = logits_fn(runnable)
    correct = total = 0
    for inputs, labels in batches:
        correct += int((run(inputs).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def one_at_a_time(runnable: Any, encoded: Sequence[dict[str, torch.Tensor]]) -> Callable[..., None]:
    """A callable that runs `runnable` on each sentence in turn: batch 1 at real lengths, as a server sees them.

    Inputs are converted once, here, so that the timing covers only the runs.
    """
    if isinstance(runnable, OnnxModel):
        feeds = [runnable.feed(e) for e in encoded]
        return lambda **_: [runnable.session.run(None, feed) for feed in feeds]
    return lambda **_: [runnable(**e) for e in encoded]
