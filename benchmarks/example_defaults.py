"""Are the example's defaults the best known for its budget? `examples/distill_bert_sst2.py` over seeds, per recipe.

    python benchmarks/example_defaults.py   # --teacher and --data default to ../shared; --help for the settings

Each `--recipes` entry is a set of the example's flags on top of the README quick-start's budget (a 3-layer student,
the first `--max-train-samples` training sentences, `--max-length 64`); every recipe runs once per `--seeds` value
through the example's own `main`, with the teacher's outputs read from one shared teacher-output cache. Writes
`--output` (JSON: every run's validation accuracy, and per recipe the mean and standard deviation over the seeds) and
prints a table. Runs already in `--output` with the same settings and flags are kept rather than run again, so a
recipe can be added later (`--recipes NAME`) and the table covers every recipe measured.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    # The example's defaults until this comparison: uniform layers (0, 3, 5 of 6), T=2, 3 epochs.
    "uniform-T2-3ep": "--layer_strategy uniform --temperature 2 --num_train_epochs 3",
    # The seed-style recipe a user writes by hand: bottom-heavy layers, a softer teacher, 2 epochs. The example's
    # defaults since (`--layer_strategy strided` keeps 0, 2, 4 of 6).
    "layers-0-2-4-T4-2ep": "--layers_to_keep 0 2 4 --temperature 4 --num_train_epochs 2",
    # The hand-written recipe's temperature and epochs with uniform layers: which half matters.
    "uniform-T4-2ep": "--layer_strategy uniform --temperature 4 --num_train_epochs 2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT.parent / "shared" / "models" / "minilm-l6-sst2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"From {list(RECIPES)}.")
    parser.add_argument("--max-train-samples", type=int, default=8000)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--extra", default="", help="More example flags for every run (e.g. '--max_steps 2').")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".work" / "example-defaults"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "example_defaults.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    unknown = [recipe for recipe in args.recipes if recipe not in RECIPES]
    if unknown:
        raise ValueError(f"Unknown recipes {unknown}; choose from {list(RECIPES)}.")
    sys.path.insert(0, str(ROOT / "examples"))
    import distill_bert_sst2

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("teacher", "data", "work_dir", "output", "recipes", "seeds")
    }
    runs = _earlier_runs(Path(args.output), settings)
    measured = {(run["recipe"], run["flags"], run["seed"]) for run in runs}
    todo = [
        (recipe, seed)
        for recipe in args.recipes
        for seed in args.seeds
        if (recipe, RECIPES[recipe], seed) not in measured
    ]
    if len(todo) < len(args.recipes) * len(args.seeds):
        print(
            f"Keeping {len(args.recipes) * len(args.seeds) - len(todo)} run(s) already in {args.output}.", flush=True
        )
    started = time.perf_counter()
    for done, (recipe, seed) in enumerate(todo):
        if done:
            left = (time.perf_counter() - started) / done * (len(todo) - done)
            print(f"[{done}/{len(todo)}] about {left / 60:.0f} min left", flush=True)
        argv_run = [
            "--teacher", args.teacher, "--dataset", args.data, "--student_layers", "3",
            "--max_train_samples", str(args.max_train_samples), "--max_length", "64",
            "--output_dir", tempfile.mkdtemp(prefix=f"{recipe}-{seed}-", dir=work),
            "--teacher_cache_dir", str(work / "teacher-cache"), "--seed", str(seed), "--disable_tqdm", "true",
            "--latency_repeats", "5", "--report_to", "none",
            *shlex.split(RECIPES[recipe]), *shlex.split(args.extra),
        ]  # fmt: skip
        if args.max_eval_samples:
            argv_run += ["--max_eval_samples", str(args.max_eval_samples)]
        comparison = distill_bert_sst2.main(argv_run)
        runs.append(
            {
                "recipe": recipe,
                "flags": RECIPES[recipe],
                "seed": seed,
                "accuracy": comparison["student"]["metrics"]["accuracy"],
                "teacher_accuracy": comparison["teacher"]["metrics"]["accuracy"],
                "train_runtime_s": comparison["train_runtime_s"],
            }
        )
    summary = {}
    for recipe in dict.fromkeys(run["recipe"] for run in runs):
        recipe_runs = [run for run in runs if run["recipe"] == recipe]
        accuracies = [run["accuracy"] for run in recipe_runs]
        summary[recipe] = {
            "flags": recipe_runs[0]["flags"],
            "seeds": [run["seed"] for run in recipe_runs],
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "retained": statistics.fmean(accuracies) / recipe_runs[0]["teacher_accuracy"],
        }
    result = {"settings": settings, "runs": runs, "summary": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| recipe | flags | seeds | accuracy (mean +- std) | retained |\n|---|---|---|---:|---:|")
    for recipe, row in summary.items():
        print(
            f"| {recipe} | `{row['flags']}` | {len(row['seeds'])} | {row['mean']:.4f} +- {row['std']:.4f} | "
            f"{row['retained']:.1%} |"
        )
    return result


def _earlier_runs(output: Path, settings: dict) -> list[dict]:
    """The runs an earlier call wrote to `output` with the same `settings`: kept, not run again (none otherwise)."""
    if not output.is_file():
        return []
    earlier = json.loads(output.read_text())
    saved = {k: v for k, v in earlier.get("settings", {}).items() if k not in ("recipes", "seeds")}
    if saved != settings:
        print(f"{output} was written with other settings ({saved}); its runs are not reused.", flush=True)
        return []
    return [run for run in earlier["runs"] if RECIPES.get(run["recipe"]) == run["flags"]]


if __name__ == "__main__":
    main()
