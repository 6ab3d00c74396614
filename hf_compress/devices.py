"""What a measurement ran on, in words: the one `device_name`, for latency reports and latency tables.

A leaf (torch and the standard library only), so that both `hf_compress.deploy` (latency reports, model cards) and
`hf_compress.pruning` (latency tables, which must not import `deploy`) name a device the same way.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def device_name(device: torch.device | str = "cpu") -> str:
    """What a timing ran on, for a report: the GPU's name for a CUDA device, otherwise the CPU's model name.

    Example:
        ```python
        >>> device_name("cpu")
        'AMD EPYC 7R13 Processor'
        ```
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # Linux
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (macOS, Windows)
        pass
    return platform.processor() or "cpu"
