"""Dynamic int8 quantization of the linear layers, for CPU inference.

Why `torch.ao.quantization.quantize_dynamic` although PyTorch marks it deprecated in favour of torchao: in torch 2.13
it is still shipped, needs no extra dependency, and runs on fbgemm/x86 (or qnnpack on ARM) int8 kernels that make BERT
inference on CPU faster. torchao's replacement (`quantize_(model, Int8DynamicActivationInt8WeightConfig())`, torchao
0.18) targets GPUs: in eager mode on CPU it dequantises in Python and was ~30x *slower* than fp32 on a BERT-sized FFN
here, and it needs `torch.compile` plus a C++ toolchain to be fast. When torch removes the eager API,
`quantize_dynamic_int8` raises an error saying so instead of failing somewhere inside PyTorch.

Saving: a dynamically quantized model holds packed int8 weights (`torch.ScriptObject`s) that neither safetensors nor
`from_pretrained` can store, and `torch.save` would pickle engine-specific objects. The portable route is to keep
the fp32 (or sparse fp32) checkpoint and quantize when loading, with `from_pretrained_int8`: weight quantization is
a deterministic function of the fp32 weights, so this gives bit-identical int8 weights and outputs. A quantized model
refuses `save_pretrained`/`push_to_hub` with an error that says so.

```python
from transformers import AutoModelForSequenceClassification
from hf_compress import from_pretrained_int8, quantize_dynamic_int8

model.save_pretrained("student")  # fp32, loadable anywhere
int8_model = from_pretrained_int8("student", AutoModelForSequenceClassification)  # == quantize_dynamic_int8(model)
```
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..pruning.unstructured import make_permanent
from .checkpoint import from_pretrained_compressed

_SAVE_ERROR = (
    "This model was dynamically quantized to int8 by hf_compress: its linear layers hold packed int8 weights that "
    "safetensors and `from_pretrained` cannot store, so it cannot be saved with `save_pretrained` or pushed to the "
    "Hub. Save the fp32 model before quantizing (`model.save_pretrained(path)`) and load it quantized with "
    "`hf_compress.from_pretrained_int8(path, model_class)`, which gives identical int8 weights."
)


def _refuse_to_save(*args: Any, **kwargs: Any) -> None:
    raise ValueError(_SAVE_ERROR)


def _check_can_quantize(model: nn.Module) -> None:
    if getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None) is None:
        raise RuntimeError(
            f"torch {torch.__version__} no longer ships `torch.ao.quantization.quantize_dynamic`, which "
            "`quantize_dynamic_int8` uses for its CPU int8 kernels. Pin a torch release that ships it, or use "
            "torchao's `quantize_(model, Int8DynamicActivationInt8WeightConfig())`."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise ValueError(
            f"Dynamic int8 quantization runs on CPU kernels only, but the model is on {device}. Move it first: "
            "`model.to('cpu')`."
        )


def _quantize_in_place(model: nn.Module) -> nn.Module:
    # Fold any torch.nn.utils.prune masks into the weights: quantized layers copy `weight` once and keep no hooks.
    make_permanent(model)
    model.float().eval()
    with warnings.catch_warnings():
        # The deprecation notices point to torchao, which is not a faster option on CPU (see the module docstring).
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        # One scale per output row instead of per tensor: on the SST-2 MiniLM-L6 teacher per-tensor scales cost
        # 0.8 accuracy points and per-channel scales none, at the same speed.
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        # Linear layers left empty by structured pruning (a layer with no heads or no FFN neurons) have nothing to
        # quantize, and per-channel scales of an empty weight fail: they stay fp32 (they only add their bias).
        spec = {
            name: qconfig
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.weight.numel() > 0
        }
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    model.save_pretrained = _refuse_to_save
    return model


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers run in int8 on CPU (dynamic quantization); `model` is unchanged.

    Weights are quantized once to int8, with one scale per output channel; activations are quantized on the fly for
    each batch, so no calibration data is needed. Embeddings and LayerNorms stay fp32. Any model works: a student, a
    structurally pruned model or a magnitude-pruned one (pruning masks are folded into the weights first).

    The copy cannot be saved with `save_pretrained` (see the module docstring): save the fp32 model and load it with
    `from_pretrained_int8`.

    Args:
        model: An fp32 (or fp16/bf16, converted to fp32 first) model on CPU.

    Returns:
        The quantized copy, in eval mode.

    Raises:
        ValueError: if the model is not on CPU.

    Example:

    ```python
    int8_model = quantize_dynamic_int8(model)
    with torch.no_grad():
        logits = int8_model(**batch).logits
    ```
    """
    _check_can_quantize(model)
    return _quantize_in_place(copy.deepcopy(model))


def from_pretrained_int8(
    pretrained_model_name_or_path: str | os.PathLike,
    model_class: type[PreTrainedModel],
    **kwargs: Any,
) -> nn.Module:
    """Load an fp32 checkpoint (local folder or Hub id) and quantize it with `quantize_dynamic_int8`.

    This is the portable way to ship an int8 model: publish the fp32 checkpoint, quantize at load time. Checkpoints
    that hf-compress pruned to per-layer widths load as `load_compressed` loads them (the pruned twin of
    `model_class`), so no `trust_remote_code` is needed.

    Args:
        pretrained_model_name_or_path: What `model_class.from_pretrained` accepts.
        model_class: The class to load with, e.g. `AutoModelForSequenceClassification` (the task head matters).
        **kwargs: Passed to `from_pretrained` (`revision`, `token`, ...).

    Returns:
        The int8 model, in eval mode.

    Example:

    ```python
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained_int8("my-org/distilled-sst2", AutoModelForSequenceClassification)
    ```
    """
    if not hasattr(model_class, "from_pretrained"):
        raise ValueError(
            f"`model_class` must be a transformers model class with `from_pretrained` (e.g. "
            f"AutoModelForSequenceClassification), got {model_class!r}."
        )
    model = from_pretrained_compressed(pretrained_model_name_or_path, model_class, **kwargs)
    _check_can_quantize(model)
    return _quantize_in_place(model)
