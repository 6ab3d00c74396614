"""`PruningConfig`: how small the pruned model must be and how hf-compress decides what to remove."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from huggingface_hub import hf_hub_download

from .constants import IMPORTANCE_METHODS, LAYER_IMPORTANCE_METHODS, SCOPES, TARGETS

PRUNING_CONFIG_NAME = "pruning_config.json"

# The deprecated names of `head_keep` / `ffn_keep`: fractions *removed* (the old direction), converted as 1 - value.
_DEPRECATED_FRACTIONS = {"head_ratio": "head_keep", "ffn_ratio": "ffn_keep"}
# name -> (valid interval as written in errors, its test, what the fraction counts)
_FRACTIONS = {
    "head_keep": ("[0, 1]", lambda value: 0 <= value <= 1, "attention heads to keep"),
    "ffn_keep": ("(0, 1]", lambda value: 0 < value <= 1, "FFN neurons to keep"),
    "head_ratio": ("[0, 1]", lambda value: 0 <= value <= 1, "units to remove"),
    "ffn_ratio": ("[0, 1)", lambda value: 0 <= value < 1, "units to remove"),
}


@dataclass
class PruningConfig:
    """What `prune` (and `GradualStructuredPruningCallback`) should remove.

    The FLOPs and parameter budgets count the *prunable* cost of the encoder layers: attention heads (their
    q/k/v/output projection weights and, for FLOPs, their attention-score computation at `seq_len` tokens) and FFN
    neurons (up and down projection weights). Embeddings, layer norms and the task head are not pruned and not
    counted. These budgets are met from below, within one unit: the kept cost is at most the target and less than one
    head or neuron (one `round_to` block of neurons; with `scope="layer"` per layer; with `uniform=True` one block in
    every layer) below it.

    The latency budget (`target="latency"`) counts the whole model's *measured* forward time on this device, at
    `latency_batch_size` x `seq_len` tokens and `latency_threads` threads: `keep=1/3` asks for a 3x speed-up. It comes
    from a latency table (`hf_compress.pruning.latency_table`), measured once per device, thread count and shape from
    one layer of the model at a grid of head counts and FFN widths, plus the unprunable rest (embeddings, task head).
    The search minimises the importance removed under that budget, over depth and width at once (a layer left with no
    heads and no neurons is removed, saving its whole time) and with FFN widths the table measured as fast.

    Args:
        target: `"flops"` (keep `keep` of the encoder's FLOPs per token at `seq_len`), `"params"` (keep `keep` of its
            head and FFN parameters), `"latency"` (keep `keep` of the model's measured latency) or `"ratios"` (keep
            `head_keep` of the heads and `ffn_keep` of the neurons).
        keep: Fraction of the current FLOPs / parameters / latency to keep, in (0, 1]; used by `"flops"`, `"params"`
            and `"latency"` (`keep=1/3`: three times faster).
        importance: How heads and neurons are scored: `"fisher"` (default, Kwon et al. 2022), `"taylor"` (Michel et
            al. 2019) or `"magnitude"` (weight norms, no data needed).
        seq_len: Sequence length at which FLOPs are counted and, with `target="latency"`, latency is measured
            (attention costs grow with it).
        head_keep: With `target="ratios"`: fraction of attention heads to keep, in [0, 1] (unset: all).
        ffn_keep: With `target="ratios"`: fraction of FFN neurons to keep, in (0, 1] (unset: all).
        layers: Transformer layers to remove before anything else: a list of layer indices, or a number of layers, in
            which case the least important ones by `layer_importance` go. Their cost counts towards the budget.
        layer_importance: How layers are scored when `layers` is a number: `"cosine"` or `"loss"`.
        scope: `"global"` ranks heads and neurons across all layers (layers end up with different widths, as in Kwon
            et al.); `"layer"` removes the same share of cost (or the same fractions of units) in every layer.
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
        latency_batch_size: With `target="latency"`: the batch size (sequences per forward call) the latency
            budget is measured at. Latency per sequence depends on it: measure at the batch size you deploy with.
        latency_threads: With `target="latency"`: the torch intra-op threads the latency is measured with (unset:
            torch's current setting, `torch.get_num_threads()`). Ignored on a GPU.
        latency_table: With `target="latency"`: the path of a latency table (JSON). An existing file is read and used
            if it was measured for this device, thread count, runtime, shape and architecture (otherwise refused,
            naming the difference); a missing one is measured and written there, to reuse on the next run. Unset: the
            table is measured for this call (`report.latency_table.save(...)` keeps it).
        head_ratio: Deprecated (constructor only), use `head_keep = 1 - head_ratio`: the fraction of heads to remove.
        ffn_ratio: Deprecated (constructor only), use `ffn_keep = 1 - ffn_ratio`: the fraction of neurons to remove.

    Raises:
        ValueError: on creation, for any value of the wrong type or out of range (e.g. `keep="0.5"` or
            `keep=None`), naming the value and what is valid.

    Example:
    ```python
    config = PruningConfig(target="flops", keep=0.6, importance="fisher")
    fast = PruningConfig(target="latency", keep=1 / 3, latency_batch_size=32, seq_len=128, latency_threads=2)
    config.save_pretrained("pruned")  # pruned/pruning_config.json
    assert PruningConfig.from_pretrained("pruned") == config
    ```
    """

    target: str = field(default="flops", metadata={"help": f"What the budget counts: one of {TARGETS}."})
    keep: float = field(
        default=0.6,
        metadata={
            "help": "Fraction of encoder FLOPs / parameters / measured latency to keep, in (0, 1] (flops, params, "
            "latency; latency 0.333: 3x faster)."
        },
    )
    importance: str = field(default="fisher", metadata={"help": f"Importance score: one of {IMPORTANCE_METHODS}."})
    seq_len: int = field(
        default=128,
        metadata={"help": "Sequence length at which FLOPs per token are counted and latency is measured (latency)."},
    )
    head_keep: float | None = field(
        default=None, metadata={"help": "With target=ratios: fraction of attention heads to keep, in [0, 1]."}
    )
    ffn_keep: float | None = field(
        default=None, metadata={"help": "With target=ratios: fraction of FFN neurons to keep, in (0, 1]."}
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
    # Batch 32: a typical serving batch, and the shape the repository's CPU benchmarks report (32 x 128).
    latency_batch_size: int = field(
        default=32, metadata={"help": "With target=latency: batch size the latency budget is measured at."}
    )
    latency_threads: int | None = field(
        default=None,
        metadata={"help": "With target=latency: torch threads to measure latency with (unset: the current setting)."},
    )
    latency_table: str | None = field(
        default=None,
        metadata={
            "help": "With target=latency: a latency table JSON to reuse (refused if measured on another device, "
            "thread count or shape), or where to write a new one (unset: measure it, do not save)."
        },
    )
    # Deprecated aliases, accepted by the constructor only (not fields: never saved, never CLI flags).
    head_ratio: InitVar[float | None] = None
    ffn_ratio: InitVar[float | None] = None

    def __post_init__(self, head_ratio: float | None = None, ffn_ratio: float | None = None) -> None:
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
                f"keep={self.keep!r} must be {kind}in (0, 1]: the fraction of FLOPs, parameters or latency to keep, "
                "e.g. 0.6 (with target='latency', 0.333 for a 3x speed-up)."
            )
        self.keep = float(self.keep)
        for name, meaning in (
            ("seq_len", "tokens per sequence"),
            ("round_to", "1 disables rounding"),
            ("latency_batch_size", "sequences per forward call the latency is measured at"),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer ({meaning}).")
            setattr(self, name, int(value))
        if self.latency_threads is not None:
            if not _is_int(self.latency_threads) or self.latency_threads < 1:
                raise ValueError(
                    f"latency_threads={self.latency_threads!r} must be a positive integer (torch threads) or None "
                    "(torch's current setting)."
                )
            self.latency_threads = int(self.latency_threads)
        if self.latency_table is not None:
            if not isinstance(self.latency_table, (str, os.PathLike)) or not os.fspath(self.latency_table):
                raise ValueError(
                    f"latency_table={self.latency_table!r} must be the path of a latency table JSON file (e.g. "
                    "'latency_table.json') or None."
                )
            self.latency_table = os.fspath(self.latency_table)
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
        for old, value in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio)):
            if value is None:
                continue
            new = _DEPRECATED_FRACTIONS[old]
            value = self._check_fraction(old, value)
            if getattr(self, new) is not None:
                raise ValueError(
                    f"{old}={value} and {new}={getattr(self, new)!r} were both given; pass only {new} (the fraction "
                    f"kept, 1 - {old})."
                )
            warnings.warn(
                f"PruningConfig({old}=...) is deprecated: pass {new}={1 - value:g} (the fraction kept, 1 - {old}).",
                FutureWarning,
                stacklevel=3,
            )
            setattr(self, new, 1 - value)
        for name in ("head_keep", "ffn_keep"):
            if getattr(self, name) is not None:
                setattr(self, name, self._check_fraction(name, getattr(self, name)))
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
        removes_heads = self.head_keep is not None and self.head_keep < 1
        removes_neurons = self.ffn_keep is not None and self.ffn_keep < 1
        if self.target == "ratios" and not (removes_heads or removes_neurons or self.layers):
            raise ValueError(
                "target='ratios' needs at least one of head_keep or ffn_keep below 1, or layers, e.g. "
                "PruningConfig(target='ratios', head_keep=0.75, ffn_keep=0.5)."
            )
        if self.target == "latency" and self.scope == "layer":
            raise ValueError(
                "target='latency' with scope='layer' is not supported: the latency budget is the whole model's, "
                "including embeddings and the task head that no layer owns, so it has no per-layer share to meet. "
                "Use scope='global' (or uniform=True for the same FFN width in every layer)."
            )
        if self.uniform and removes_heads:
            raise ValueError(
                f"uniform=True keeps every attention head (a stock checkpoint needs the same heads everywhere), but "
                f"head_keep={self.head_keep}; set head_keep=None or uniform=False."
            )

    def _check_fraction(self, name: str, value: Any) -> float:
        """`value` of the unit fraction `name` (head_keep, ffn_keep or a deprecated alias) as a float, once checked."""
        interval, inside, meaning = _FRACTIONS[name]
        if not _is_real(value) or not inside(value):
            kind = "" if _is_real(value) else f"None or a number (not {type(value).__name__}) "
            raise ValueError(f"{name}={value!r} must be {kind}in {interval}: the fraction of {meaning}.")
        if self.target != "ratios":
            raise ValueError(
                f"{name}={value} only applies with target='ratios' (target is {self.target!r}); set "
                f"target='ratios' or leave {name} unset and use keep."
            )
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict (the arguments of `PruningConfig(**config.to_dict())`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> PruningConfig:
        """A config from `to_dict()`'s output; the deprecated `head_ratio` / `ffn_ratio` of older files still load.

        Raises:
            ValueError: for a key that is not an argument of `PruningConfig`, or any invalid value.
        """
        names = {f.name for f in fields(cls)} | set(_DEPRECATED_FRACTIONS)
        unknown = sorted(set(config_dict) - names)
        if unknown:
            raise ValueError(
                f"Unknown PruningConfig argument(s) {unknown}; valid ones are {sorted(f.name for f in fields(cls))}."
            )
        return cls(**config_dict)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the config as sorted, indented JSON to `save_directory/pruning_config.json` (the folder is created).

        Example:
        ```python
        config.save_pretrained("pruned-model")  # beside the weights, so the pruning can be traced and repeated
        ```
        """
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, PRUNING_CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> PruningConfig:
        """Read the `pruning_config.json` that `save_pretrained` wrote: from a local folder, else from a Hub repository.

        Args:
            pretrained_model_name_or_path: A local folder, or a Hub repository id (`"user/name"`).
            hub_kwargs: Passed to `huggingface_hub.hf_hub_download` for a Hub repository (`revision=`, `token=`,
                `subfolder=`, ...).

        Raises:
            ValueError: for a file that is not a pruning config, or a folder without one.

        Example:
        ```python
        config = PruningConfig.from_pretrained("pruned-model")
        ```
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(folder):
            path = os.path.join(folder, PRUNING_CONFIG_NAME)
            if not os.path.isfile(path):
                raise ValueError(
                    f"{folder} has no {PRUNING_CONFIG_NAME}; write one with `PruningConfig.save_pretrained({folder!r})`."
                )
        else:
            path = hf_hub_download(folder, PRUNING_CONFIG_NAME, **hub_kwargs)
        with open(path) as f:
            config_dict = json.load(f)
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"{path} is not a PruningConfig file: it holds a {type(config_dict).__name__}, not a dict."
            )
        return cls.from_dict(config_dict)


def _is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool; NaN fails every range check that uses it."""
    return isinstance(value, Real) and not isinstance(value, bool)
