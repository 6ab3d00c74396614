"""Run ONNX exports with ONNX Runtime: `OnnxModel` (tokenizer output in, numpy out), `inspect_onnx`, shared helpers.

The export folder's layout and the file names are defined here, so the exporter (`onnx_export`), the int8 quantizer
(`onnx_quantization`) and the runtime agree on them. Requires the `onnx` extra (`pip install -e ".[onnx]"`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

ONNX_FILE = "model.onnx"
DYNAMIC_INT8_FILE = "model_int8_dynamic.onnx"
STATIC_INT8_FILE = "model_int8_static.onnx"
EXPORT_INFO_FILE = "onnx_export.json"
QUANTIZED_FILES = {"dynamic": DYNAMIC_INT8_FILE, "static": STATIC_INT8_FILE}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")
_INSTALL_HINT = "pip install onnx onnxscript onnxruntime"


def require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export and inference need {', '.join(missing)}, which is not installed: `{_INSTALL_HINT}` "
            "(or `pip install 'hf-compress[onnx]'`)."
        )


def find_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    if not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(folder)


def ort_session(
    path: str | os.PathLike,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    spinning: bool = True,
):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        # ONNX Runtime's worker threads busy-wait for more work after each run; beside other models on the same cores
        # (an interleaved timing), that spinning steals their CPU time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        os.fspath(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )


def onnx_feed(inputs: Mapping[str, Any], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenizer output (torch, numpy or lists) as the int64 arrays the graph takes; missing token types are 0."""
    feed = {}
    for name in input_names:
        value = inputs.get(name)
        if value is None:
            if name != "token_type_ids":
                raise ValueError(f"The ONNX model needs the input {name!r}; the inputs have {sorted(inputs)}.")
            value = np.zeros_like(feed["input_ids"])
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        feed[name] = np.asarray(value, dtype=np.int64)
    return feed


class OnnxModel:
    """An exported model run by ONNX Runtime: tokenized inputs in, the model's output fields out (as numpy arrays).

    The plain-`onnxruntime` way to serve an `export_onnx` folder, for any architecture and any pruned structure (the
    graph holds it all), with no PyTorch model involved.

    Args:
        path: A folder written by `export_onnx`, or an `.onnx` file (the config and tokenizer are read beside it).
        file_name: Which graph of the folder: `"model.onnx"` (default), `"model_int8_dynamic.onnx"`, ...
        threads: ONNX Runtime intra-op threads; `None` lets it choose (all cores).
        providers: Execution providers; CPU by default.
        spinning: Let ONNX Runtime's threads busy-wait between runs (its default: lowest latency when this model
            has the cores to itself). Turn it off when other models share the cores, e.g. in `compare_latency`.

    Attributes:
        session: The `onnxruntime.InferenceSession`.
        config: The model's config (`None` when the folder has no `config.json`).
        tokenizer: The folder's tokenizer, or `None`.
        input_names, output_names: The graph's inputs and outputs.

    Example:
    ```python
    model = OnnxModel("pruned-onnx", file_name="model_int8_dynamic.onnx", threads=2)
    batch = model.tokenizer(["a great movie"], padding=True, return_tensors="np")
    model(**batch)["logits"]
    ```
    """

    def __init__(
        self,
        path: str | os.PathLike,
        file_name: str | None = None,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        spinning: bool = True,
    ):
        require_onnx()
        path = Path(path)
        folder, model_file = (path, path / (file_name or ONNX_FILE)) if path.is_dir() else (path.parent, path)
        if not model_file.is_file():
            raise ValueError(f"No ONNX graph at {os.fspath(model_file)!r}; export one with export_onnx.")
        self.path = model_file
        self.session = ort_session(model_file, threads=threads, providers=providers, spinning=spinning)
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.config = AutoConfig.from_pretrained(folder) if (folder / "config.json").is_file() else None
        self.tokenizer = find_tokenizer(folder)

    def feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The session's input dict for tokenizer output: int64 arrays of the graph's inputs (others are dropped)."""
        return onnx_feed(inputs, self.input_names)

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        """Run the graph on tokenized inputs (`input_ids`, `attention_mask`, ...; torch, numpy or lists)."""
        return dict(zip(self.output_names, self.session.run(self.output_names, self.feed(inputs)), strict=True))

    def classify(self, texts: str | Sequence[str], batch_size: int = 32, max_length: int | None = None) -> list[dict]:
        """Label texts like `pipeline("text-classification")`: `[{"label": ..., "score": ...}, ...]`, top label each.

        The score is the softmax probability, or the sigmoid for a single-label output or a multi-label problem (as
        the pipeline does). Needs a sequence-classification export with a tokenizer.
        """
        if self.tokenizer is None or self.config is None or "logits" not in self.output_names:
            raise ValueError(
                f"classify needs a sequence-classification export with its config and tokenizer; {self.path.parent} "
                "lacks one of them (re-export with `export_onnx(..., tokenizer=tokenizer)`)."
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        results = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="np",
            )
            logits = self(**encoded)["logits"]
            if logits.ndim != 2:
                raise ValueError(f"classify needs (batch, labels) logits; this graph's are {logits.shape}.")
            if self.config.problem_type == "multi_label_classification" or logits.shape[-1] == 1:
                scores = 1 / (1 + np.exp(-logits))
            else:
                shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
                scores = shifted / shifted.sum(axis=-1, keepdims=True)
            for row in scores:
                best = int(row.argmax())
                results.append({"label": self.config.id2label[best], "score": float(row[best])})
        return results


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """Describe an export folder (or `.onnx` file): each graph's inputs and outputs with their axes, opset, size and
    number of int8 operators, plus what `export_onnx` recorded (`onnx_export.json`). Plain data, for `hf-compress
    inspect`.
    """
    require_onnx()
    import onnx

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.onnx")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{os.fspath(path)!r} holds no .onnx file.")

    def axes(values) -> dict[str, list]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    graphs = {}
    for file in files:
        graph = onnx.load(os.fspath(file), load_external_data=False)
        data = file.with_name(file.name + ".data")
        graphs[file.name] = {
            "bytes": file.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
            "inputs": axes(graph.graph.input),
            "outputs": axes(graph.graph.output),
            "int8_ops": sum(
                node.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "QLinearMatMul")
                for node in graph.graph.node
            ),
        }
    info_path = folder / EXPORT_INFO_FILE
    return {
        "folder": os.fspath(folder),
        "graphs": graphs,
        "export": json.loads(info_path.read_text()) if info_path.is_file() else None,
    }
