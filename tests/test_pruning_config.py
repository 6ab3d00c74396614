"""`PruningConfig` as data: saved as sorted, indented JSON beside the weights, loaded back equal; old names still load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hf_compress import PruningConfig
from hf_compress.pruning import config as config_module
from hf_compress.pruning.training_state import config_as_json, current_settings

CONFIGS = [
    PruningConfig(),
    PruningConfig(target="params", keep=0.4, importance="taylor", scope="layer", round_to=1, num_batches=3),
    PruningConfig(target="ratios", head_keep=0.75, ffn_keep=0.5, layers=[3, 1], rescale=False),
    PruningConfig(target="flops", keep=0.5, uniform=True, layers=2, layer_importance="loss", rescale_damping=0.0),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_save_pretrained_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "pruning_config.json"
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"  # sorted and indented, like PEFT's configs
    assert data == config.to_dict()
    loaded = PruningConfig.from_pretrained(tmp_path / "out")
    assert loaded == config and loaded.to_dict() == config.to_dict()
    assert PruningConfig.from_dict(config.to_dict()) == config


def test_a_file_with_the_deprecated_names_still_loads(tmp_path):
    # What a config saved before head_keep / ffn_keep looked like (fractions removed).
    old = {**PruningConfig().to_dict(), "target": "ratios", "head_ratio": 0.25, "ffn_ratio": 0.5}
    del old["head_keep"], old["ffn_keep"]
    (tmp_path / "pruning_config.json").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match="head_ratio"):
        loaded = PruningConfig.from_pretrained(tmp_path)
    assert loaded == PruningConfig(target="ratios", head_keep=0.75, ffn_keep=0.5)
    # Unset deprecated names (None) load silently.
    unset = {**PruningConfig().to_dict(), "head_ratio": None, "ffn_ratio": None}
    del unset["head_keep"], unset["ffn_keep"]
    assert PruningConfig.from_dict(unset) == PruningConfig()


def test_from_pretrained_refuses_what_is_not_a_config(tmp_path):
    with pytest.raises(ValueError, match="has no pruning_config.json; write one with"):
        PruningConfig.from_pretrained(tmp_path)
    (tmp_path / "pruning_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a PruningConfig file"):
        PruningConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Unknown PruningConfig argument\(s\) \['sparsity'\]; valid ones are"):
        PruningConfig.from_dict({"sparsity": 0.5})
    with pytest.raises(ValueError, match="keep=2"):
        PruningConfig.from_dict({"keep": 2})


def test_from_pretrained_reads_a_hub_repository(tmp_path, monkeypatch):
    PruningConfig(keep=0.3).save_pretrained(tmp_path)
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / filename)

    monkeypatch.setattr(config_module, "hf_hub_download", download)
    assert PruningConfig.from_pretrained("user/pruned-model", revision="v1") == PruningConfig(keep=0.3)
    assert calls == [("user/pruned-model", "pruning_config.json", {"revision": "v1"})]


def test_deprecated_names_are_constructor_only():
    config = PruningConfig(target="ratios", head_keep=0.5)
    assert "head_ratio" not in config.to_dict() and "head_ratio" not in {f.name for f in dataclasses.fields(config)}
    # `replace` keeps working: the aliases are not carried over.
    assert dataclasses.replace(config, head_keep=0.25).head_keep == 0.25


def test_checkpoint_settings_with_the_deprecated_names_match_the_new_ones():
    """A GradualStructuredPruningCallback checkpoint written with head_ratio / ffn_ratio resumes under the new names."""
    config = PruningConfig(target="ratios", head_keep=0.5, ffn_keep=0.75)
    saved = config_as_json(config)
    saved["head_ratio"], saved["ffn_ratio"] = 0.5, 0.25
    del saved["head_keep"], saved["ffn_keep"]
    settings = {"config": saved, "schedule": [2, 14, 4], "beta": 0.9}
    assert current_settings(settings) == {"config": config_as_json(config), "schedule": [2, 14, 4], "beta": 0.9}
