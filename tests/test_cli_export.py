"""`hf-compress export` (ONNX) and `hf-compress inspect`, run in-process on tiny models and local files (no network).

A real export takes seconds, so one module-scoped export (fp32, dynamic and static int8 calibrated on a text file)
serves the tests that need graphs; the refusals and the wiring run with `export_onnx` replaced by a stub, which also
proves that nothing is exported when an input is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOY_REVIEWS, TOY_WORDS, tiny_model, word_tokenizer
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers import BertTokenizerFast

from hf_compress import OnnxExport, compression_report, load_compressed, prune_ffn_neurons, prune_heads
from hf_compress.cli import main
from hf_compress.cli.calibration import calibration_texts

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from hf_compress import OnnxModel, push_compressed_to_hub  # noqa: E402

SENTENCES = TOY_REVIEWS


def _tokenizer(folder: Path) -> BertTokenizerFast:
    return word_tokenizer(folder, [*TOY_WORDS, ","])


def _pruned_model():
    """Layer 0 keeps 2 heads, layer 1 none, layer 2 loses 2 FFN neurons: per-layer structure, remote code."""
    model = tiny_model("bert", initializer_range=0.2)
    prune_heads(model, {0: [0, 1], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {2: [0, 5]})
    return model


def _error_line(capsys) -> str:
    """The command's single error line on stderr; fails on a traceback or several lines."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A pruned BERT folder (with tokenizer) exported by the command line with both int8 graphs."""
    root = tmp_path_factory.mktemp("cli-export")
    model = _pruned_model()
    model.save_pretrained(root / "pruned")
    _tokenizer(root / "pruned").save_pretrained(root / "pruned")
    calibration = root / "calibration.txt"
    calibration.write_text("\n".join(SENTENCES * 40) + "\n\n")
    out = root / "onnx"
    args = ["export", "--model", str(root / "pruned"), "--output-dir", str(out), "--quantize", "dynamic", "static"]
    args += ["--calibration-file", str(calibration), "--num-calibration", "64", "--max-length", "32"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(args)
    return argparse.Namespace(root=root, model=model, out=out, status=status, stdout=stdout.getvalue())


#### export, for real


def test_export_writes_the_graphs_and_prints_each_files_difference(exported):
    assert exported.status == 0
    names = {path.name for path in exported.out.iterdir()}
    assert {"model.onnx", "model_int8_dynamic.onnx", "model_int8_static.onnx", "config.json"} <= names
    assert {"onnx_export.json", "tokenizer.json"} <= names
    info = json.loads((exported.out / "onnx_export.json").read_text())
    assert info["max_abs_diff"] <= 1e-4 and set(info["int8_max_abs_diff"]) == {"dynamic", "static"}
    lines = exported.stdout.splitlines()
    assert lines[0].startswith(f"Exported BertForSequenceClassification to {exported.out} (opset 18; inputs ")

    def row(name):
        return next(line for line in lines if line.startswith(name + " "))

    assert f"{info['max_abs_diff']:.2g}" in row("model.onnx") and "fp32 graph" in row("model.onnx")
    assert f"{info['int8_max_abs_diff']['dynamic']:.2g}" in row("model_int8_dynamic.onnx")
    assert "calibrated on 64 sentences" in row("model_int8_static.onnx")
    assert "kB" in row("model.onnx")
    # The folder runs on its own: ONNX Runtime agrees with PyTorch on real sentences.
    onnx_model = OnnxModel(exported.out, threads=1)
    batch = onnx_model.tokenizer(SENTENCES, padding=True, return_tensors="np")
    with torch.no_grad():
        expected = exported.model.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(onnx_model(**batch)["logits"] - expected).max() <= 1e-4
    assert len(OnnxModel(exported.out, "model_int8_static.onnx", threads=1).classify(SENTENCES[:2])) == 2


def test_inspect_an_export_folder(exported, capsys):
    assert main(["inspect", str(exported.out)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ONNX export {exported.out}")
    assert "structure: 4 layers; heads 2, 0, 4, 4; FFN neurons 24, 24, 22, 24" in out
    assert "input_ids [batch_size, sequence_length]" in out and "model_int8_static.onnx: " in out
    assert main(["inspect", str(exported.out / "model_int8_dynamic.onnx"), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["kind"] == "onnx" and list(description["graphs"]) == ["model_int8_dynamic.onnx"]
    assert description["graphs"]["model_int8_dynamic.onnx"]["int8_ops"] > 0
    assert description["export"]["structure"]["heads"] == [2, 0, 4, 4]


def test_push_uploads_the_exported_graphs_and_the_card_lists_them(exported, monkeypatch):
    uploaded = {}

    def upload_folder(self, **kwargs):
        for file in Path(kwargs["folder_path"]).rglob("*"):
            if file.is_file():
                uploaded[file.relative_to(kwargs["folder_path"]).as_posix()] = file.read_bytes()
        return CommitInfo(
            commit_url="https://huggingface.co/me/x/commit/1", commit_message="", commit_description="", oid="1"
        )

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = load_compressed(exported.root / "pruned")
    results = {"model_int8_dynamic.onnx": {"accuracy": 0.875, "latency_ms": 1.5}}
    push_compressed_to_hub(model, "me/pruned-onnx", onnx_dir=exported.out, onnx_results=results)
    for name in ("model.onnx", "model_int8_dynamic.onnx", "model_int8_static.onnx", "onnx_export.json"):
        assert uploaded[f"onnx/{name}"] == (exported.out / name).read_bytes()
    assert "modeling_hf_compress.py" in uploaded and "model.safetensors" in uploaded
    card = ModelCard(uploaded["README.md"].decode())
    info = json.loads((exported.out / "onnx_export.json").read_text())
    assert "| `onnx/model.onnx` | fp32 graph | " in card.text
    assert f"| {info['int8_max_abs_diff']['dynamic']:.1e} | 0.8750 | 1.5 ms |" in card.text
    assert "| `onnx/model_int8_static.onnx` | int8, static quantization" in card.text


#### export: the wiring and the refusals, with export_onnx stubbed


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "model"
    tiny_model("bert").save_pretrained(folder)
    _tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture
def fake_export(monkeypatch):
    """Replace export_onnx: record its arguments, write the marker file, return a plausible result."""
    calls = []

    def export_onnx(model, output_dir, **kwargs):
        calls.append({"model": model, "output_dir": Path(output_dir), **kwargs})
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "model.onnx").write_bytes(b"\0" * 10)
        (output_dir / "onnx_export.json").write_text("{}")
        result = OnnxExport(output_dir, output_dir / "model.onnx", input_names=["input_ids"], output_names=["logits"])
        for mode in kwargs.get("quantize") or ():
            path = output_dir / f"model_int8_{mode}.onnx"
            path.write_bytes(b"\0" * 10)
            result.quantized_paths[mode], result.int8_max_abs_diff[mode] = path, 0.01
        return result

    monkeypatch.setattr("hf_compress.cli.export.export_onnx", export_onnx)
    return calls


def test_export_passes_the_flags_on(tmp_path, checkpoint, fake_export, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(f"{s}\t{i % 2}" for i, s in enumerate(SENTENCES)))
    out = tmp_path / "out"
    args = ["export", "--model", str(checkpoint), "--output-dir", str(out), "--quantize", "static", "dynamic"]
    args += ["--calibration-file", str(data), "--num-calibration", "5", "--opset", "19", "--max-length", "24"]
    assert main(args) == 0
    (call,) = fake_export
    assert call["output_dir"] == out and call["opset"] == 19 and call["max_length"] == 24
    assert call["quantize"] == ("static", "dynamic") and call["tokenizer"] is not None
    assert len(call["calibration_texts"]) == 5 and set(call["calibration_texts"]) <= set(SENTENCES)
    assert call["model"].dtype == torch.float32
    assert "model_int8_static.onnx" in capsys.readouterr().out
    # A previous export (it holds onnx_export.json) is replaced without asking.
    assert main(["export", "--model", str(checkpoint), "--output-dir", str(out)]) == 0
    assert fake_export[-1]["quantize"] is None and fake_export[-1]["calibration_texts"] is None


def test_export_without_a_tokenizer_says_so(tmp_path, fake_export, capsys):
    model_only = tmp_path / "model"
    tiny_model("bert").save_pretrained(model_only)
    assert main(["export", "--model", str(model_only), "--output-dir", str(tmp_path / "out")]) == 0
    assert fake_export[0]["tokenizer"] is None
    out = capsys.readouterr().out
    assert "The folder has NO tokenizer: --model the folder has no tokenizer files" in out
    assert "and the tokenizer" not in out


def _export(tmp_path, model, *extra):
    return main(["export", "--model", str(model), "--output-dir", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--quantize", "static"],
            "--quantize static calibrates activation scales on real sentences: add --calibration-file",
        ),
        (["--calibration-file", "{cal}"], "is used only by static quantization: add --quantize static"),
        (["--quantize", "static", "--calibration-file", "{tmp}/missing.txt"], "missing.txt: no such file or folder"),
        (["--quantize", "static", "--calibration-file", "{empty}"], "holds no text"),
        (["--quantize", "static", "--calibration-file", "{pairs}"], "holds sentence pairs (premise and hypothesis)"),
        (["--quantize", "static", "--calibration-file", "{pairs}", "--text-column", "x"], "--text-column x:"),
        (
            ["--quantize", "static", "--calibration-file", "{unknown}"],
            "reads 100% of the calibration text as the unknown",
        ),
    ],
)
def test_export_refuses_bad_calibration_before_any_work(tmp_path, checkpoint, fake_export, capsys, extra, expected):
    (tmp_path / "cal.txt").write_text("\n".join(SENTENCES))
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"premise": "a dull plot", "hypothesis": "bad"}) + "\n")
    (tmp_path / "unknown.txt").write_text("zzz qqq\nxxyy\n")
    paths = {k: str(tmp_path / f) for k, f in (("cal", "cal.txt"), ("empty", "empty.txt"), ("pairs", "pairs.jsonl"))}
    paths.update(unknown=str(tmp_path / "unknown.txt"), tmp=str(tmp_path))
    assert _export(tmp_path, checkpoint, *[arg.format(**paths) for arg in extra]) == 2
    line = _error_line(capsys)
    assert line.startswith("hf-compress export: error: ") and expected in line
    assert fake_export == [] and not (tmp_path / "out").exists()


def test_export_refuses_outputs_that_would_lose_files(tmp_path, checkpoint, fake_export, capsys):
    assert main(["export", "--model", str(checkpoint), "--output-dir", str(checkpoint)]) == 2
    assert "is the --model folder" in _error_line(capsys)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", "--model", str(checkpoint), "--output-dir", str(foreign)]) == 2
    line = _error_line(capsys)
    assert "notes.txt" in line and "no onnx_export.json" in line and "--overwrite" not in line
    assert main(["export", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--model" in _error_line(capsys)
    assert fake_export == [] and (foreign / "notes.txt").read_text() == "keep me"


def test_export_refuses_a_model_without_tokenizer_for_static_and_a_bad_opset(tmp_path, fake_export, capsys):
    model_only = tmp_path / "model"
    tiny_model("bert").save_pretrained(model_only)
    (tmp_path / "cal.txt").write_text("\n".join(SENTENCES))
    args = ["--quantize", "static", "--calibration-file", str(tmp_path / "cal.txt")]
    assert _export(tmp_path, model_only, *args) == 2
    line = _error_line(capsys)
    assert "no tokenizer files" in line and "--tokenizer" in line
    with pytest.raises(SystemExit) as exit_info:
        _export(tmp_path, model_only, "--opset", "17")
    assert exit_info.value.code == 2 and "give 18 (the default) or newer" in capsys.readouterr().err
    assert fake_export == []


def test_a_graph_that_disagrees_with_pytorch_exits_with_1(tmp_path, checkpoint, monkeypatch, capsys):
    def export_onnx(*args, **kwargs):
        raise RuntimeError("The exported graph's outputs differ from PyTorch's by up to 0.1 (> atol=0.0001)\non ...")

    monkeypatch.setattr("hf_compress.cli.export.export_onnx", export_onnx)
    assert _export(tmp_path, checkpoint) == 1
    assert "differ from PyTorch's by up to 0.1 (> atol=0.0001) on ..." in _error_line(capsys)


def test_calibration_texts_sample_a_text_file_and_a_data_column(tmp_path):
    lines = [f"sentence {i}" for i in range(100)]
    (tmp_path / "cal.txt").write_text("\n".join(lines) + "\n\n")
    args = argparse.Namespace(
        calibration_file=str(tmp_path / "cal.txt"), num_calibration=10, seed=0, split="train", text_column=None
    )
    sample = calibration_texts(args)
    assert len(sample) == 10 and set(sample) <= set(lines) and sample == calibration_texts(args)
    (tmp_path / "data.csv").write_text("id,text\n1,a good movie\n2,a dull plot\n")
    args.calibration_file, args.num_calibration = str(tmp_path / "data.csv"), 256
    assert calibration_texts(args) == ["a good movie", "a dull plot"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"review": s}) + "\n" for s in SENTENCES))
    args.calibration_file = str(tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match=r"cannot tell which column holds the text; its columns are \['review'\]"):
        calibration_texts(args)
    args.text_column = "review"
    assert calibration_texts(args) == SENTENCES


#### inspect


def test_inspect_a_pruned_checkpoint(tmp_path, capsys):
    model = _pruned_model()
    with torch.no_grad():
        model.bert.encoder.layer[3].output.dense.weight[:, :12] = 0  # half of one of the layer's 4 weights
    model.save_pretrained(tmp_path / "pruned")
    assert main(["inspect", str(tmp_path / "pruned"), "--json", "--seq-len", "64"]) == 0
    description = json.loads(capsys.readouterr().out)
    summary = compression_report(model, seq_len=64).model
    assert description["class"] == "BertForSequenceClassification" and description["model_type"] == "bert"
    assert description["parameters"] == summary.parameters and description["size_bytes"] == summary.size_bytes
    assert description["encoder_flops_per_token"] == summary.flops_per_token
    assert description["encoder_flops_per_sequence"] == 64 * summary.flops_per_token
    assert [layer["heads"] for layer in description["layers"]] == [2, 0, 4, 4]
    assert [layer["ffn_neurons"] for layer in description["layers"]] == [24, 24, 22, 24]
    layer3 = model.bert.encoder.layer[3]
    layer3_weights = sum(m.weight.numel() for m in layer3.modules() if isinstance(m, torch.nn.Linear))
    assert description["layers"][3]["sparsity"] == pytest.approx(16 * 12 / layer3_weights)
    assert description["layers"][0]["sparsity"] == 0.0 and 0 < description["sparsity"] < 0.1
    assert description["needs_remote_code"] and description["hf_compress_structure"]
    assert not description["stock_structure"]

    assert main(["inspect", str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    assert "attention heads             10 of 16: 2, 0, 4, 4" in out
    assert "needs remote code           yes" in out and "trust_remote_code=True" in out
    assert "encoder FLOPs @ 128 tokens" in out


def test_inspect_a_stock_checkpoint(checkpoint, capsys):
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["stock_structure"] and not description["needs_remote_code"]
    assert not description["hf_compress_structure"] and description["sparsity"] == 0.0
    assert description["loads_with"].startswith("stock transformers") and description["seq_len"] == 128


def test_inspect_refuses_bad_input_with_one_line(tmp_path, capsys, monkeypatch):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or folder" in _error_line(capsys)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert main(["inspect", str(tmp_path / "weights.bin")]) == 2
    assert "is a file; pass a checkpoint folder" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "cannot load a model from it" in _error_line(capsys)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["inspect", "someone/not-cached"]) == 2
    assert "hf-compress inspect PATH/TO/MODEL_FOLDER" in _error_line(capsys)


def test_help_of_the_new_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "export" in out and "inspect" in out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--output-dir", "--quantize", "--calibration-file", "--num-calibration", "--opset"):
        assert option in out
    assert "--tokenizer" in out and "--max-length" in out
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "MODEL" in out and "--seq-len" in out and "--json" in out
