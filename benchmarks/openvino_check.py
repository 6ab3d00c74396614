"""Is OpenVINO clearly faster than ONNX Runtime on this CPU? One measurement, on graphs `export_onnx` wrote.

    pip install openvino   # not a dependency of hf-compress: this check decides whether it should become one
    python benchmarks/openvino_check.py --onnx-dirs benchmarks/.work/seed-0/teacher/onnx \\
        benchmarks/.work/seed-0/latency-7x-distilled/onnx

Every folder's `model.onnx` (fp32) and `model_int8_dynamic.onnx` run in ONNX Runtime (`OnnxModel`, no spinning) and
in OpenVINO (`Core().compile_model` of the same file on the CPU, `--threads` inference threads); accuracy on the
validation split, latency with `compare_latency`, all of them interleaved in one run against ONNX Runtime fp32 of the
first folder, at a batch of 32 x 128 tokens and at batch 1 on `--num-real` validation sentences at their own lengths.
A graph OpenVINO cannot compile is recorded with its error. Writes `--output` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hf_compress import OnnxModel, compare_latency, device_name, load_text_classification_dataset

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {"fp32": "model.onnx", "int8-dynamic": "model_int8_dynamic.onnx"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dirs", nargs="+", required=True, help="export_onnx folders")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--num-real", type=int, default=32)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "openvino_check.json"))
    return parser.parse_args()


def openvino_runner(path: Path, input_names: list[str], threads: int):
    """A callable running the graph in OpenVINO on tokenizer output; returns the logits as numpy."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})

    def run(**inputs) -> np.ndarray:
        feed = {name: np.asarray(inputs[name], dtype=np.int64) for name in input_names}
        return compiled(feed)[compiled.output(0)]

    return run


def main() -> None:
    args = parse_args()
    validation = load_text_classification_dataset(args.data).dataset["validation"]
    sentences, labels = validation["sentence"], np.array(validation["label"])
    runners, accuracy, errors = {}, {}, {}
    for folder in map(Path, args.onnx_dirs):
        name = folder.parent.name if folder.name == "onnx" else folder.name
        for graph, file_name in GRAPHS.items():
            ort = OnnxModel(folder, file_name=file_name, threads=args.threads, spinning=False)
            tokenizer = ort.tokenizer
            forms = {"onnxruntime": lambda ort=ort, **inputs: ort(**inputs)["logits"]}
            try:
                forms["openvino"] = openvino_runner(folder / file_name, ort.input_names, args.threads)
            except Exception as error:  # recorded: the question is whether OpenVINO runs these graphs at all
                errors[f"{name} | {graph} | openvino"] = f"{type(error).__name__}: {error}"
            for runtime, run in forms.items():
                key = f"{name} | {graph} | {runtime}"
                correct = 0
                for start in range(0, len(sentences), 64):
                    batch = tokenizer(sentences[start : start + 64], padding=True, truncation=True, max_length=128)
                    correct += int((np.asarray(run(**batch)).argmax(-1) == labels[start : start + 64]).sum())
                accuracy[key] = correct / len(sentences)
                runners[key] = run
                print(f"{key}: accuracy {accuracy[key]:.4f}", flush=True)
    reference = next(iter(runners))
    fixed = dict(tokenizer(sentences[:32], padding="max_length", truncation=True, max_length=128, return_tensors="np"))
    real = [
        dict(tokenizer([s], truncation=True, max_length=128, return_tensors="np")) for s in sentences[: args.num_real]
    ]
    b32 = compare_latency(runners, fixed, rounds=args.rounds, reference=reference, threads=args.threads)
    b1 = compare_latency(
        {key: (lambda run=run: [run(**r) for r in real]) for key, run in runners.items()},
        {},
        rounds=args.rounds,
        reference=reference,
        threads=args.threads,
    )
    rows = [
        {
            "model": key,
            "accuracy": accuracy[key],
            "b32x128": {"median_ms": b32.stats[key].median_ms, **vars(b32.speedups[key])},
            "b1_real": {"median_ms": b1.stats[key].median_ms, **vars(b1.speedups[key])},
        }
        for key in runners
    ]
    result = {
        "cpu": device_name(torch.device("cpu")),
        "threads": args.threads,
        "rounds": args.rounds,
        "reference": reference,
        "errors": errors,
        "noisy": {"b32x128": b32.warnings, "b1_real": b1.warnings},
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nspeed-ups over {reference}\n| model | accuracy | b32x128 | b1 real |\n|---|---:|---:|---:|")
    for row in rows:
        s32, s1 = row["b32x128"], row["b1_real"]
        print(
            f"| {row['model']} | {row['accuracy']:.4f} | {s32['median']:.2f}x ({s32['low']:.2f}-{s32['high']:.2f}) | "
            f"{s1['median']:.2f}x ({s1['low']:.2f}-{s1['high']:.2f}) |"
        )
    for key, error in errors.items():
        print(f"{key}: {error}")


if __name__ == "__main__":
    main()
