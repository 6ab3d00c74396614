"""Publish a compressed model on the Hugging Face Hub with its tokenizer, model card and comparison.

`push_compressed_to_hub` saves everything into a temporary folder, then makes one commit with `huggingface_hub`'s public
API (`create_repo`, `create_branch` for a new revision, `upload_folder`). `save_pretrained` of a pruned model already
writes its per-layer structure into the config and the modeling code that `trust_remote_code` loads, so those travel
too. A model with live `torch.nn.utils.prune` masks (`magnitude_prune` without `make_permanent`) is saved with the
masks folded into its weights, so the Hub holds the weights the model computes with, not `weight_orig`/`weight_mask`
tensors that `from_pretrained` would ignore. The token comes from the usual places (`token=`, `HF_TOKEN`,
`hf auth login`).

With `onnx_dir=` (a folder written by `export_onnx` / `hf-compress export`), the same commit carries the ONNX graphs
under `onnx/`: `model*.onnx` (with their `.data` files, if any), `onnx_export.json`, and the export's `config.json` and
tokenizer, so that `onnx/` runs on its own (`OnnxModel(snapshot / "onnx")`, or any ONNX Runtime client). The folder
is checked first: it must be an export of this model (same architecture and per-layer structure). The generated card
lists the graphs, with your measured numbers from `onnx_results`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import PartialState
from huggingface_hub import CommitInfo, HfApi, ModelCard
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..pruning.mask_folding import pruned_tensor_names, save_pretrained_folded
from .comparison import COMPARISON_FILE
from .model_card import ONNX_SUBFOLDER, create_model_card, read_onnx_export
from .onnx_runtime import EXPORT_INFO_FILE

logger = logging.get_logger(__name__)

# Besides the graphs: what makes the uploaded `onnx/` folder run on its own (config for the labels, the tokenizer).
_ONNX_COMPANION_FILES = (
    EXPORT_INFO_FILE,
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _copy_onnx_files(graphs: list[Path], destination: Path) -> list[str]:
    """Copy the graphs (and their external-data files) and the companion files of their folder; the names copied."""
    destination.mkdir()
    folder = graphs[0].parent
    sources = [*graphs, *(graph.with_name(graph.name + ".data") for graph in graphs)]
    sources += [folder / name for name in _ONNX_COMPANION_FILES]
    copied = []
    for source in sources:
        if source.is_file():
            shutil.copy2(source, destination / source.name)
            copied.append(source.name)
    return copied


def push_compressed_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    card: ModelCard | str | None = None,
    comparison: Mapping[str, Any] | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload compressed model with hf-compress",
    token: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    **card_kwargs: Any,
) -> CommitInfo | None:
    """Upload a compressed model, its tokenizer, model card and comparison JSON to a Hub repository in one commit,
    optionally with its ONNX export.

    Args:
        model: The compressed model (pruned, distilled, or both).
        repo_id: The Hub repository, `"user/name"` or `"org/name"`; created if it does not exist.
        tokenizer: Saved beside the model so that `pipeline(..., model=repo_id)` works.
        card: The model card (a `ModelCard` or its text). By default one is generated with `create_model_card` from
            the model, `comparison` and `card_kwargs`.
        comparison: The `build_comparison` result, uploaded as `comparison.json`.
        private: Create the repository as private (an existing repository keeps its visibility).
        revision: A branch to commit to; created from the default branch if it does not exist.
        commit_message: The commit's message.
        token: A Hub token with write access; by default the one from `HF_TOKEN` or `hf auth login`.
        onnx_dir: A folder written by `export_onnx` from this model: its `model*.onnx` graphs, `onnx_export.json`,
            config and tokenizer are uploaded under `onnx/`, and the generated card lists them. Refused, before
            anything is uploaded, when it is not an export or is the export of a model of another structure.
        card_kwargs: Passed to `create_model_card` when `card` is None (e.g. `base_model=`, `pruning=`, and for the
            ONNX graphs `onnx_results={"model_int8_dynamic.onnx": {"accuracy": 0.90, "latency_ms": 3.1}}` and
            `onnx_latency=`; only what you measured is shown).

    Returns:
        The commit's `CommitInfo`, or `None` on a non-main process (only the main process uploads).

    Example:
        ```python
        from hf_compress import push_compressed_to_hub

        push_compressed_to_hub(pruned, "me/bert-base-sst2-pruned", tokenizer=tokenizer, private=True,
                               base_model="textattack/bert-base-uncased-SST-2", pruning={"heads removed": 48})

        # With the ONNX export and what was measured on it:
        export_onnx(pruned, "pruned-onnx", tokenizer=tokenizer, quantize="dynamic")
        push_compressed_to_hub(pruned, "me/bert-base-sst2-pruned", tokenizer=tokenizer, onnx_dir="pruned-onnx",
                               onnx_results={"model_int8_dynamic.onnx": {"accuracy": 0.912, "latency_ms": 3.4}})
        ```
    """
    if card is not None and card_kwargs:
        raise ValueError(f"Pass either a card or arguments to generate one ({', '.join(card_kwargs)}), not both.")
    graphs = read_onnx_export(onnx_dir, model)[1] if onnx_dir is not None else None
    if not PartialState().is_main_process:
        return None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        if any(pruned_tensor_names(module) for module in model.modules()):
            # Whoever applied the masks (magnitude_prune, or torch.nn.utils.prune directly), fold them.
            save_pretrained_folded(model, folder)
        else:
            model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if comparison is not None:
            (Path(folder) / COMPARISON_FILE).write_text(json.dumps(comparison, indent=2, sort_keys=True) + "\n")
        if graphs is not None:
            copied = _copy_onnx_files(graphs, Path(folder) / ONNX_SUBFOLDER)
            logger.info("Adding %s under %s/.", ", ".join(copied), ONNX_SUBFOLDER)
            card_kwargs["onnx_dir"] = Path(folder) / ONNX_SUBFOLDER
        if card is None:
            card_kwargs.setdefault("model_name", repo_id.split("/")[-1])
            create_model_card(folder, model, comparison=comparison, repo_id=repo_id, **card_kwargs)
        else:
            # Parsing a text card checks its metadata before anything is uploaded.
            (card if isinstance(card, ModelCard) else ModelCard(card)).save(Path(folder) / "README.md")

        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
        )
    logger.info("Pushed %s to %s.", type(model).__name__, commit.commit_url)
    return commit
