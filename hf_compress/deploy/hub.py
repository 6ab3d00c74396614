"""Publish a compressed model on the Hugging Face Hub with its tokenizer, model card and comparison.

`push_compressed_to_hub` saves everything into a temporary folder, then makes one commit with `huggingface_hub`'s public
API (`create_repo`, `create_branch` for a new revision, `upload_folder`). `save_pretrained` of a pruned model already
writes its per-layer structure into the config and the modeling code that `trust_remote_code` loads, so those travel
too. A model with live `torch.nn.utils.prune` masks (`magnitude_prune` without `make_permanent`) is saved with the
masks folded into its weights, so the Hub holds the weights the model computes with, not `weight_orig`/`weight_mask`
tensors that `from_pretrained` would ignore. The token comes from the usual places (`token=`, `HF_TOKEN`,
`hf auth login`).
"""

from __future__ import annotations

import json
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
from .model_card import create_model_card

logger = logging.get_logger(__name__)


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
    **card_kwargs: Any,
) -> CommitInfo | None:
    """Upload a compressed model, its tokenizer, model card and comparison JSON to a Hub repository in one commit.

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
        card_kwargs: Passed to `create_model_card` when `card` is None (e.g. `base_model=`, `pruning=`).

    Returns:
        The commit's `CommitInfo`, or `None` on a non-main process (only the main process uploads).

    Example:
        ```python
        from hf_compress import push_compressed_to_hub

        push_compressed_to_hub(pruned, "me/bert-base-sst2-pruned", tokenizer=tokenizer, private=True,
                               base_model="textattack/bert-base-uncased-SST-2", pruning={"heads removed": 48})
        ```
    """
    if card is not None and card_kwargs:
        raise ValueError(f"Pass either a card or arguments to generate one ({', '.join(card_kwargs)}), not both.")
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
