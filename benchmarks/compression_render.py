"""Render the compression benchmark's JSON: a Markdown table (written into the README between markers) and a plot.

Every trained variant is built once per seed; the table and the plot show the mean and the standard deviation over
the seeds (`statistics.stdev`, n - 1 in the denominator), and the targets are judged on the means.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_compress import format_bytes

BEGIN, END = "<!-- compression-table:begin -->", "<!-- compression-table:end -->"
ONNX_INT8 = ("onnx-int8-dynamic", "onnx-int8-static")
RUNTIME_STYLE = {  # plot colour and marker per runtime
    "pytorch-fp32": ("tab:blue", "o"),
    "pytorch-int8": ("tab:orange", "s"),
    "onnx-fp32": ("tab:green", "^"),
    "onnx-int8-dynamic": ("tab:red", "D"),
    "onnx-int8-static": ("tab:purple", "v"),
}


@dataclass(frozen=True)
class Target:
    """A target of the issues: `retained` of the teacher's accuracy at `speedup` or more, in `runtime` (or any)."""

    retained: float
    speedup: float
    setting: str  # "b32" (a batch of 32 at the FLOPs length) or "b1_real"
    runtime: str | None = None  # None: any runtime hf-compress ships


TARGETS = (
    Target(0.99, 3.0, "b32", "pytorch-fp32"),
    Target(0.97, 6.0, "b32", "pytorch-fp32"),
    Target(0.97, 8.0, "b32"),
    Target(0.97, 10.0, "b32"),
    Target(0.95, 15.0, "b32"),
    Target(0.97, 4.0, "b1_real"),
)


@dataclass
class Point:
    """One variant in one runtime, over its seeds."""

    label: str
    runtime: str
    recipe: str
    accuracy: list[float]
    retained: list[float]
    speedup: dict[str, list[float]]  # setting ("b32", "b1_real") -> per-seed median speed-up
    size_bytes: list[int]
    parameters: list[int]
    gflops: list[float]
    compression_seconds: list[float]


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def points(results: dict[str, Any]) -> list[Point]:
    """Every (variant, runtime) measured, over seeds; of the ONNX int8 modes only the better one per variant (higher
    mean accuracy, then faster at batch 32)."""
    b32 = _b32(results)
    out = []
    for variant in results["variants"]:
        seeds = list(variant["seeds"].values())
        per_runtime = []
        for runtime in results["setup"]["runtimes"]:
            measured = [seed["runtimes"][runtime] for seed in seeds]
            per_runtime.append(
                Point(
                    label=variant["label"],
                    runtime=runtime,
                    recipe=variant["recipe"],
                    accuracy=[m["accuracy"] for m in measured],
                    retained=[m["retained"] for m in measured],
                    speedup={
                        "b32": [m[b32]["median"] for m in measured],
                        "b1_real": [m["b1_real"]["median"] for m in measured],
                    },
                    size_bytes=[m["size_bytes"] for m in measured],
                    parameters=[seed["parameters"] for seed in seeds],
                    gflops=[seed["flops_per_sequence"] / 1e9 for seed in seeds],
                    compression_seconds=[seed["compression_seconds"] for seed in seeds],
                )
            )
        int8 = [p for p in per_runtime if p.runtime in ONNX_INT8]
        if len(int8) > 1:
            best = max(int8, key=lambda p: (round(mean(p.accuracy), 3), mean(p.speedup["b32"])))
            per_runtime = [p for p in per_runtime if p.runtime not in ONNX_INT8 or p is best]
        out += per_runtime
    return out


def check_targets(results: dict[str, Any]) -> list[str]:
    """The issues' targets, each stated as met or missed, from the mean measured numbers."""
    candidates = [p for p in points(results) if p.recipe != "teacher" or p.runtime != "pytorch-fp32"]
    b32 = _b32(results)
    lines = []
    for target in TARGETS:
        pool = [p for p in candidates if target.runtime in (None, p.runtime)]
        where = f"in {target.runtime}" if target.runtime else "in any runtime"
        shape = b32.replace("x", " x ") if target.setting == "b32" else "batch 1 on real lengths"
        head = f"- >= {target.retained:.0%} of the teacher at >= {target.speedup:g}x ({shape}, {where}): "
        fast = [p for p in pool if mean(p.speedup[target.setting]) >= target.speedup]
        best = max(fast, key=lambda p: mean(p.retained), default=None)
        if best is not None and mean(best.retained) >= target.retained:
            lines.append(head + f"**met** by {_name(best)} ({_summary(best, target.setting)}).")
            continue
        accurate = [p for p in pool if mean(p.retained) >= target.retained]
        fastest = max(accurate, key=lambda p: mean(p.speedup[target.setting]), default=None)
        if best is None:
            reached = [f"no model is {target.speedup:g}x"]
        else:
            reached = [
                f"the most accurate at >= {target.speedup:g}x is {_name(best)} ({_summary(best, target.setting)})"
            ]
        if fastest is not None:
            reached.append(
                f"the fastest at >= {target.retained:.0%} is {_name(fastest)} ({_summary(fastest, target.setting)})"
            )
        lines.append(head + "**missed**: " + "; ".join(reached) + ".")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The README section: setup line, the table, the targets."""
    setup = results["setup"]
    b32 = _b32(results)
    header = [
        "variant",
        "runtime",
        "accuracy",
        "retained",
        f"speed-up b32x{setup['seq_len']}",
        "speed-up b1 real",
        "file size",
        "params",
        f"GFLOPs/seq ({setup['seq_len']})",
        "compression time",
    ]
    rows = []
    for p in points(results):
        rows.append(
            [
                p.label,
                p.runtime,
                _mean_std(p.accuracy, "{:.4f}"),
                f"{mean(p.retained):.1%}",
                _mean_std(p.speedup["b32"], "{:.2f}", "x"),
                _mean_std(p.speedup["b1_real"], "{:.2f}", "x"),
                format_bytes(round(mean(p.size_bytes))),
                f"{mean(p.parameters) / 1e6:.1f}M",
                f"{mean(p.gflops):.2f}",
                _duration(mean(p.compression_seconds)) if p.runtime == "pytorch-fp32" else "",
            ]
        )
    teacher = next(v for v in results["variants"] if v["name"] == "teacher")
    teacher_seed = next(iter(teacher["seeds"].values()))
    teacher_fp32 = teacher_seed["runtimes"]["pytorch-fp32"]
    p, n = teacher_fp32["accuracy"], setup["num_eval"]
    seeds = setup["seeds"]
    lines = [
        f"Teacher `{setup['teacher']}` on {setup['dataset']} validation ({n} sentences: at the teacher's "
        f"{p:.4f} one run's accuracy has a standard error of {math.sqrt(p * (1 - p) / n):.4f}). Trained variants: "
        f"mean +- standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); each seed's model is "
        "also measured in every runtime. Latency on "
        f"{setup['device_name']}, {setup['threads']} threads: every model of every seed in every runtime timed in one "
        f"interleaved run against the PyTorch fp32 teacher (`compare_latency`, median of the per-round ratios over "
        f"{setup['rounds']} rounds after {setup['warmup']} warm-up; teacher {teacher_fp32[b32]['median_ms']:.0f} ms "
        f"per batch of 32 x {setup['seq_len']} tokens, {teacher_fp32['b1_real']['median_ms']:.0f} ms for "
        f"{setup['num_real']} validation sentences one at a time at their own lengths, `b1 real`). Distilled variants: "
        f"{setup['num_train']:,} training sentences, {setup['epochs']:g} epoch(s) unless the variant says more, "
        f"{_loss_note(setup)}"
        f"{_teacher_cache_note(results['variants'])}. File size: what the runtime loads (safetensors, `torch.save` "
        "of the int8 state dict, or the .onnx file).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *check_targets(results),
        *_noise_lines(results),
    ]
    return "\n".join(lines)


_MARKED = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)


def check_markers(readme: Path) -> None:
    """Refuse a README without the table's two markers (before the benchmark runs)."""
    if not readme.is_file() or not _MARKED.search(readme.read_text()):
        raise ValueError(
            f"{readme} has no '{BEGIN}' ... '{END}' markers; add both lines where the table belongs, or pass "
            "--readme '' to skip the README."
        )


def update_readme(readme: Path, section: str) -> None:
    """Replace what lies between the README's two markers with `section`."""
    check_markers(readme)
    readme.write_text(_MARKED.sub(lambda _: f"{BEGIN}\n{section}\n{END}", readme.read_text()))


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against measured speed-up (batch 32), mean +- std over seeds, one frontier per runtime."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    setup = results["setup"]
    all_points = points(results)
    teacher = next(p for p in all_points if p.recipe == "teacher" and p.runtime == "pytorch-fp32")
    fig, ax = plt.subplots(figsize=(9, 6))
    for runtime in dict.fromkeys(p.runtime for p in all_points):
        color, marker = RUNTIME_STYLE.get(runtime, ("gray", "o"))
        mine = [p for p in all_points if p.runtime == runtime and p is not teacher]
        ax.errorbar(
            [mean(p.speedup["b32"]) for p in mine],
            [mean(p.accuracy) for p in mine],
            xerr=[std(p.speedup["b32"]) for p in mine],
            yerr=[std(p.accuracy) for p in mine],
            fmt=marker,
            color=color,
            markersize=5,
            capsize=2,
            linewidth=0.8,
            label=runtime,
            zorder=3,
        )
        front = _frontier(mine)
        ax.plot([mean(p.speedup["b32"]) for p in front], [mean(p.accuracy) for p in front], color=color, alpha=0.5)
    ax.scatter([1.0], [mean(teacher.accuracy)], marker="*", s=220, color="black", zorder=4, label="teacher (fp32)")
    for fraction, style in ((0.99, "--"), (0.97, ":"), (0.95, "-.")):
        ax.axhline(mean(teacher.accuracy) * fraction, color="gray", linestyle=style, linewidth=1)
        ax.text(1.0, mean(teacher.accuracy) * fraction, f" {fraction:.0%} of teacher", fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 3, 4, 6, 8, 10, 15, 20], labels=["1", "2", "3", "4", "6", "8", "10", "15", "20"])
    ax.set_xlabel(
        f"measured speed-up over the fp32 teacher (batch 32 x {setup['seq_len']} tokens, {setup['device_name']}, "
        f"{setup['threads']} threads)"
    )
    ax.set_ylabel(f"{setup['dataset']} validation accuracy (mean +- std over seeds)")
    ax.set_title("hf-compress: accuracy vs speed, one frontier per runtime")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.22, 0.42))  # the empty lower middle
    for p in _frontier([p for p in all_points if p is not teacher]):
        ax.annotate(_name(p), (mean(p.speedup["b32"]), mean(p.accuracy)), xytext=(5, 4), fontsize=6,
                    textcoords="offset points")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _frontier(candidates: list[Point]) -> list[Point]:
    """The points no other point beats on both mean speed-up and mean accuracy, by speed-up."""
    ordered = sorted(candidates, key=lambda p: (-mean(p.speedup["b32"]), -mean(p.accuracy)))
    front, best = [], -1.0
    for p in ordered:
        if mean(p.accuracy) > best:
            front.append(p)
            best = mean(p.accuracy)
    return front[::-1]


def _b32(results: dict[str, Any]) -> str:
    return f"b32x{results['setup']['seq_len']}"


def _name(p: Point) -> str:
    return f"{p.label} | {p.runtime}"


def _summary(p: Point, setting: str) -> str:
    return (
        f"{_mean_std([100 * r for r in p.retained], '{:.1f}', '%')} at {_mean_std(p.speedup[setting], '{:.2f}', 'x')}"
    )


def _mean_std(values: list[float], fmt: str, unit: str = "") -> str:
    if len(values) == 1:
        return fmt.format(values[0]) + unit
    return f"{fmt.format(mean(values))} +- {fmt.format(std(values))}{unit}"


def _noise_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for setting, warnings in results.get("noisy", {}).items():
        if warnings:
            lines.append(
                f"- Timing at {setting}: {len(warnings)} model(s) flagged noisy by `compare_latency` (the middle half "
                "of their rounds spans more than 20% of their median); see `noisy` in the JSON."
            )
    return lines


def _loss_note(setup: dict[str, Any]) -> str:
    """The distillation loss settings."""
    note = f"T={setup['temperature']:g}, alpha={setup['alpha']:g}"
    if setup.get("hidden_loss_weight"):
        note += f", hidden-state loss ({setup['hidden_loss_type']}) weight {setup['hidden_loss_weight']:g}"
    return note


def _teacher_cache_note(variants: list[dict[str, Any]]) -> str:
    """How the distilled variants got the teacher's outputs, and what building the shared cache took."""
    seeds = [seed for v in variants for seed in v["seeds"].values()]
    builds = [seed["teacher_cache_seconds"] for seed in seeds if seed.get("teacher_cache_built")]
    if not builds:
        return "" if not any(seed.get("teacher_cache_seconds") for seed in seeds) else "; teacher outputs from a cache"
    return (
        f"; the teacher's outputs on them were cached once ({_duration(sum(builds))}, shared by every distilled "
        "variant and left out of their compression time)"
    )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "-" if seconds == 0 else f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
