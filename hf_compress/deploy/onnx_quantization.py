"""int8 ONNX files with ONNX Runtime: dynamic (weights int8, activations quantized per batch) and static (QDQ with
activation scales calibrated on real sentences), both per channel, written beside `model.onnx`.
"""

from __future__ import annotations

import json
import logging as _pylogging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .onnx_runtime import (
    EXPORT_INFO_FILE,
    ONNX_FILE,
    QUANTIZED_FILES,
    find_tokenizer,
    onnx_feed,
    ort_session,
    require_onnx,
)

logger = logging.get_logger(__name__)


def _weight_nodes(model) -> list[str]:
    """Names of the MatMul/Gemm nodes that multiply by a non-empty weight: the model's linear layers.

    Empty ones (a layer pruned to no heads or no FFN neurons computes `x @ W` with a `(0, hidden)` or `(hidden, 0)`
    weight, which only passes the bias on) are left out: there is nothing to quantize, and per-channel quantization of
    an empty weight fails inside ONNX Runtime. MatMuls of two activations (attention scores) are left out too, as
    PyTorch's dynamic quantization leaves them: only the linear layers' weights become int8.
    """
    weights = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = weights.get(node.input[1])
        if weight is not None and len(weight.dims) == 2 and 0 not in weight.dims:
            names.append(node.name)
    return names


def _calibration_reader(batches: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return _Reader()


def quantize_onnx(
    onnx_dir: str | os.PathLike,
    mode: str = "dynamic",
    *,
    calibration_texts: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int = 128,
    batch_size: int = 16,
) -> Path:
    """Write an int8 copy of an exported `model.onnx` with ONNX Runtime's quantization tools.

    Only the linear layers' weights become int8, one scale per output channel (per-channel: on BERT-sized models a
    single scale per tensor costs accuracy); embeddings, LayerNorms, softmax and the attention-score MatMuls stay fp32.

    - `"dynamic"` (`quantize_dynamic`, file `model_int8_dynamic.onnx`): activations are quantized on the fly for
      each batch; no data needed. The usual choice for transformers on CPU.
    - `"static"` (`quantize_static`, QDQ format, file `model_int8_static.onnx`): activation scales are fixed from the
      min/max seen on `calibration_texts`; inputs outside that range saturate, so calibrate on the task's data.

    Args:
        onnx_dir: A folder written by `export_onnx`.
        mode: `"dynamic"` or `"static"`.
        calibration_texts: Sentences to calibrate on, for `"static"` (a few hundred).
        tokenizer: Tokenizer for them; by default the folder's.
        max_length: Truncation length for the calibration sentences.
        batch_size: Sentences per calibration batch.

    Returns:
        The path of the int8 graph.

    Raises:
        ValueError: for an unknown mode, a folder without `model.onnx`, or `"static"` without texts or tokenizer.
    """
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in QUANTIZED_FILES:
        raise ValueError(f"Unknown quantization mode {mode!r}; use 'dynamic' or 'static'.")
    onnx_dir = Path(onnx_dir)
    source = onnx_dir / ONNX_FILE
    if not source.is_file():
        raise ValueError(f"{os.fspath(onnx_dir)!r} has no {ONNX_FILE}; export the model first with export_onnx.")
    if mode == "static":
        if tokenizer is None:
            tokenizer = find_tokenizer(onnx_dir)
        if tokenizer is None or not calibration_texts:
            raise ValueError(
                "Static quantization needs `calibration_texts` (a few hundred sentences of the task's data) and a "
                "tokenizer (passed, or saved in the folder); quantize with mode='dynamic' to need neither."
            )
    output = onnx_dir / QUANTIZED_FILES[mode]
    external = (onnx_dir / f"{ONNX_FILE}.data").exists()
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        # ONNX Runtime's recommended pre-processing (graph optimisation and ONNX shape inference); its symbolic shape
        # inference does not handle the dynamo exporter's graphs, and the quantizer does not need it.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(source, prepared, skip_symbolic_shape=True, save_as_external_data=external)
        nodes = _weight_nodes(onnx.load(os.fspath(prepared), load_external_data=False))
        if mode == "dynamic":
            quantize_dynamic(
                prepared,
                output,
                per_channel=True,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                use_external_data_format=external,
            )
        else:
            session_inputs = [i.name for i in ort_session(source, threads=1).get_inputs()]
            batches = []
            for start in range(0, len(calibration_texts), batch_size):
                encoded = tokenizer(
                    list(calibration_texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="np",
                )
                batches.append(onnx_feed(encoded, session_inputs))
            quantize_static(
                prepared,
                output,
                _calibration_reader(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                use_external_data_format=external,
            )
    info_path = onnx_dir / EXPORT_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        info.setdefault("files", {})[f"int8_{mode}"] = output.name
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    logger.info("Wrote %s int8 graph %s.", mode, output)
    return output


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop ONNX Runtime's root-logger advice to pre-process: `quantize_onnx` does (without symbolic shapes)."""

    def drop_advice(record: _pylogging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = _pylogging.getLogger()
    root.addFilter(drop_advice)
    try:
        yield
    finally:
        root.removeFilter(drop_advice)
