"""`PruningConfig`: how small the pruned model must be and how hf-compress decides what to remove."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Any

from .importance import IMPORTANCE_METHODS, LAYER_IMPORTANCE_METHODS

TARGETS = ("flops", "params", "ratios")
SCOPES = ("global", "layer")


@dataclass
class PruningConfig:
    """What `prune` (and `GradualStructuredPruningCallback`) should remove.

    The budget counts the *prunable* cost of the encoder layers: attention heads (their q/k/v/output projection
    weights and, for FLOPs, their attention-score computation at `seq_len` tokens) and FFN neurons (up and down
    projection weights). Embeddings, layer norms and the task head are not pruned and not counted. Budgets are met from
    below, within one unit: the kept cost is at most the target and less than one head or neuron (one `round_to` block
    of neurons; with `scope="layer"` per layer; with `uniform=True` one block in every layer) below it.

    Args:
        target: `"flops"` (keep `keep` of the encoder's FLOPs per token at `seq_len`), `"params"` (keep `keep` of its
            head and FFN parameters) or `"ratios"` (remove `head_ratio` of the heads and `ffn_ratio` of the neurons).
        keep: Fraction of the current FLOPs / parameters to keep, in (0, 1]; used by `"flops"` and `"params"`.
        importance: How heads and neurons are scored: `"fisher"` (default, Kwon et al. 2022), `"taylor"` (Michel et
            al. 2019) or `"magnitude"` (weight norms, no data needed).
        seq_len: Sequence length at which FLOPs are counted (attention costs grow with it).
        head_ratio: With `target="ratios"`: fraction of attention heads to remove, in [0, 1].
        ffn_ratio: With `target="ratios"`: fraction of FFN neurons to remove, in [0, 1).
        layers: Transformer layers to remove before anything else: a list of layer indices, or a number of layers, in
            which case the least important ones by `layer_importance` go. Their cost counts towards the budget.
        layer_importance: How layers are scored when `layers` is a number: `"cosine"` or `"loss"`.
        scope: `"global"` ranks heads and neurons across all layers (layers end up with different widths, as in Kwon
            et al.); `"layer"` removes the same share of cost (or the same ratios) in every layer.
        uniform: Keep every head and the same FFN width in every layer, so the result is a plain stock checkpoint that
            needs no custom modeling code. The budget is then met by FFN neurons (and `layers`) alone.
        rescale: After choosing what to remove, rescale the kept heads / neurons of every layer by a least-squares fit
            so the layer's output on the calibration data matches the unpruned model's (Kwon et al.'s mask tuning). A
            usable model without retraining; needs calibration data.
        rescale_damping: Ridge damping of that fit, relative to the mean diagonal of its Gram matrix; it pulls the
            scales towards 1 (no change) when the calibration data cannot pin them down.
        num_batches: Use at most this many calibration batches (all when `None`).
        round_to: Keep FFN widths at multiples of this (default 8; 1 disables rounding). Odd widths run slower per
            FLOP: on the SST-2 MiniLM-L6 teacher pruned to 1/4 of its FLOPs (batch 32 x 128, 2 CPU threads) the
            speed-up was 3.76x with `round_to=1` and 4.03x with 8. A layer that loses nothing keeps its width.

    Raises:
        ValueError: on creation, for any value of the wrong type or out of range (e.g. `keep="0.5"` or
            `keep=None`), naming the value and what is valid.

    Example:
    ```python
    config = PruningConfig(target="flops", keep=0.6, importance="fisher")
    ```
    """

    target: str = field(default="flops", metadata={"help": f"What the budget counts: one of {TARGETS}."})
    keep: float = field(
        default=0.6, metadata={"help": "Fraction of encoder FLOPs / parameters to keep, in (0, 1] (flops, params)."}
    )
    importance: str = field(default="fisher", metadata={"help": f"Importance score: one of {IMPORTANCE_METHODS}."})
    seq_len: int = field(default=128, metadata={"help": "Sequence length at which FLOPs per token are counted."})
    head_ratio: float | None = field(
        default=None, metadata={"help": "With target=ratios: fraction of attention heads to remove, in [0, 1]."}
    )
    ffn_ratio: float | None = field(
        default=None, metadata={"help": "With target=ratios: fraction of FFN neurons to remove, in [0, 1)."}
    )
    layers: int | list[int] | None = field(
        default=None,
        metadata={"help": "Layers to remove first: a list of indices, or how many of the least important to drop."},
    )
    layer_importance: str = field(
        default="cosine",
        metadata={"help": f"Layer score used when `layers` is a number: one of {LAYER_IMPORTANCE_METHODS}."},
    )
    scope: str = field(
        default="global", metadata={"help": f"Rank units across all layers or within each layer: one of {SCOPES}."}
    )
    uniform: bool = field(
        default=False, metadata={"help": "Keep all heads and one FFN width everywhere (a stock checkpoint)."}
    )
    rescale: bool = field(
        default=True, metadata={"help": "Least-squares rescale of kept units on the calibration data (no training)."}
    )
    rescale_damping: float = field(default=1e-2, metadata={"help": "Relative ridge damping of the rescale fit, >= 0."})
    num_batches: int | None = field(default=None, metadata={"help": "Calibration batches to use (all when unset)."})
    round_to: int = field(default=8, metadata={"help": "Keep FFN widths at multiples of this (1: no rounding)."})

    def __post_init__(self) -> None:
        # Every bad value, of any type, is a ValueError naming the value and what is valid.
        for name, choices in (
            ("target", TARGETS),
            ("importance", IMPORTANCE_METHODS),
            ("layer_importance", LAYER_IMPORTANCE_METHODS),
            ("scope", SCOPES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}.")
        if not _is_real(self.keep) or not 0 < self.keep <= 1:
            kind = "" if _is_real(self.keep) else f"a number (not {type(self.keep).__name__}) "
            raise ValueError(
                f"keep={self.keep!r} must be {kind}in (0, 1]: the fraction of FLOPs or parameters to keep, e.g. 0.6."
            )
        self.keep = float(self.keep)
        for name, meaning in (("seq_len", "tokens per sequence"), ("round_to", "1 disables rounding")):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer ({meaning}).")
            setattr(self, name, int(value))
        if self.num_batches is not None:
            if not _is_int(self.num_batches) or self.num_batches < 1:
                raise ValueError(f"num_batches={self.num_batches!r} must be a positive integer or None (all batches).")
            self.num_batches = int(self.num_batches)
        if not _is_real(self.rescale_damping) or not 0 <= self.rescale_damping < math.inf:
            raise ValueError(
                f"rescale_damping={self.rescale_damping!r} must be a finite number >= 0 (0 disables damping)."
            )
        self.rescale_damping = float(self.rescale_damping)
        for name in ("uniform", "rescale"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True or False.")
        for name, upper, closed in (("head_ratio", 1, True), ("ffn_ratio", 1, False)):
            value = getattr(self, name)
            if value is None:
                continue
            bracket = "]" if closed else ")"
            if not _is_real(value) or not (0 <= value <= upper if closed else 0 <= value < upper):
                kind = "" if _is_real(value) else f"None or a number (not {type(value).__name__}) "
                raise ValueError(
                    f"{name}={value!r} must be {kind}in [0, {upper}{bracket}: the fraction of units to remove."
                )
            value = float(value)
            setattr(self, name, value)
            if self.target != "ratios":
                raise ValueError(
                    f"{name}={value} only applies with target='ratios' (target is {self.target!r}); set "
                    f"target='ratios' or leave {name} unset and use keep."
                )
        layers_help = "a number of layers (e.g. 2), a list of layer indices (e.g. [1, 3]) or None"
        if isinstance(self.layers, bool) or not (
            self.layers is None or isinstance(self.layers, (Integral, list, tuple))
        ):
            raise ValueError(f"layers={self.layers!r} must be {layers_help}.")
        if isinstance(self.layers, Integral):
            if self.layers < 0:
                raise ValueError(
                    f"layers={self.layers} must be >= 0 (the number of least important layers to remove)."
                )
            self.layers = int(self.layers)
        if isinstance(self.layers, (list, tuple)):
            if not all(_is_int(i) and i >= 0 for i in self.layers):
                raise ValueError(f"layers={self.layers!r} must hold non-negative integer layer indices, e.g. [1, 3].")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={self.layers!r} lists a layer more than once.")
            self.layers = sorted(int(i) for i in self.layers)
        if self.target == "ratios" and not (self.head_ratio or self.ffn_ratio or self.layers):
            raise ValueError(
                "target='ratios' needs at least one of head_ratio, ffn_ratio or layers, e.g. "
                "PruningConfig(target='ratios', head_ratio=0.25, ffn_ratio=0.5)."
            )
        if self.uniform and self.head_ratio:
            raise ValueError(
                f"uniform=True keeps every attention head (a stock checkpoint needs the same heads everywhere), but "
                f"head_ratio={self.head_ratio}; set head_ratio=None or uniform=False."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool; NaN fails every range check that uses it."""
    return isinstance(value, Real) and not isinstance(value, bool)
