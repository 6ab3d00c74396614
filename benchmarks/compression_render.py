"""Render the compression benchmark's JSON: a Markdown table (written into the README between markers) and a plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hf_compress import format_bytes

BEGIN, END = "<!-- compression-table:begin -->", "<!-- compression-table:end -->"
# Which measured latency the headline speed-up is: a full batch of sequences padded to the FLOPs length.
HEADLINE = "b32_seq"


def check_targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets, each stated as met or missed, from the measured numbers."""
    variants = [v for v in results["variants"] if v["name"] != "teacher"]
    lines = []
    for speedup, retained in ((2.0, 0.99), (4.0, 0.97)):
        fast = [v for v in variants if v["speedup"][HEADLINE] >= speedup]
        best = max(fast, key=lambda v: v["retained"], default=None)
        if best is None:
            lines.append(
                f"- >= {retained:.0%} of the teacher at >= {speedup:g}x: **missed**, no variant is {speedup:g}x."
            )
            continue
        verdict = "met" if best["retained"] >= retained else "missed"
        lines.append(
            f"- >= {retained:.0%} of the teacher at >= {speedup:g}x: **{verdict}** by {best['label']} "
            f"({best['retained']:.1%} at {best['speedup'][HEADLINE]:.2f}x)."
        )
    pruned = [v for v in variants if v.get("realised_over_flops") is not None]
    if pruned:
        worst = min(pruned, key=lambda v: v["realised_over_flops"])
        verdict = "met" if worst["realised_over_flops"] >= 0.85 else "missed"
        lines.append(
            f"- Realised speed-up >= 85% of the FLOPs reduction at batch 32: **{verdict}** (lowest: "
            f"{worst['realised_over_flops']:.0%}, {worst['label']})."
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The README section: setup line, the table, the targets."""
    setup = results["setup"]
    seq = setup["seq_len"]
    header = [
        "variant",
        "accuracy",
        "retained",
        "params",
        "size",
        f"GFLOPs/seq ({seq})",
        f"speed-up b32x{seq}",
        f"b1x{seq}",
        "b32 real",
        "b1 real",
        "speed-up / FLOPs cut",
        "compression time",
    ]
    rows = []
    for v in results["variants"]:
        speedup = v["speedup"]
        realised = v.get("realised_over_flops")
        rows.append(
            [
                v["label"],
                f"{v['accuracy']:.4f}",
                f"{v['retained']:.1%}",
                f"{v['parameters'] / 1e6:.1f}M",
                format_bytes(v["size_bytes"]),
                f"{v['flops_per_sequence'] / 1e9:.2f}",
                f"{speedup['b32_seq']:.2f}x",
                f"{speedup['b1_seq']:.2f}x",
                f"{speedup['b32_real']:.2f}x",
                f"{speedup['b1_real']:.2f}x",
                f"{realised:.0%}" if realised is not None else "",
                _duration(v["compression_seconds"]),
            ]
        )
    teacher = next(v for v in results["variants"] if v["name"] == "teacher")
    lines = [
        f"Teacher `{setup['teacher']}` on {setup['dataset']} validation ({setup['num_eval']} sentences). Latency on "
        f"{setup['device_name']}, {setup['threads']} threads, median of {setup['repeats']} runs after "
        f"{setup['warmup']} warm-up, every model timed in the same run as the teacher (teacher: "
        f"{teacher['latency_ms']['b32_seq']:.0f} ms per batch of 32 x {seq} tokens); `real` = validation sentences at "
        "their own length (batch 32 padded to its longest; batch 1 one sentence at a time). Distilled variants: "
        f"{setup.get('num_train', setup['train_samples']):,} training sentences, {setup['epochs']:g} epoch(s), "
        f"{_loss_note(setup)}, seed {setup['seed']}{_teacher_cache_note(results['variants'])}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *check_targets(results),
    ]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace what lies between the README's two markers with `section`."""
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(
            f"{readme} has no '{BEGIN}' ... '{END}' markers; add both lines where the table belongs, or pass "
            "--readme '' to skip the README."
        )
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{section}\n{END}", text))


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against measured speed-up (batch 32), one point per variant, the teacher marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    teacher = next(v for v in results["variants"] if v["name"] == "teacher")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for v in results["variants"]:
        is_teacher = v is teacher
        x, y = v["speedup"][HEADLINE], v["accuracy"]
        ax.scatter(
            x,
            y,
            marker="*" if is_teacher else "o",
            s=220 if is_teacher else 50,
            zorder=3,
            color="black" if is_teacher else ("tab:orange" if v["recipe"] == "int8" else "tab:blue"),
        )
    for fraction, style in ((0.99, "--"), (0.97, ":")):
        ax.axhline(teacher["accuracy"] * fraction, color="gray", linestyle=style, linewidth=1)
        ax.text(
            ax.get_xlim()[0], teacher["accuracy"] * fraction, f" {fraction:.0%} of teacher", fontsize=7, va="bottom"
        )
    for speedup in (2, 4):
        ax.axvline(speedup, color="gray", linestyle="-", linewidth=0.5)
    setup = results["setup"]
    ax.set_xlabel(
        f"measured speed-up over the teacher (batch 32 x {setup['seq_len']} tokens, {setup['device_name']}, "
        f"{setup['threads']} threads)"
    )
    ax.set_ylabel(f"{setup['dataset']} validation accuracy")
    ax.set_title("hf-compress: accuracy vs speed (the star is the teacher)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _annotate_without_overlap(ax, results["variants"])  # after the layout, which moves the axes
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _annotate_without_overlap(ax, variants: list[dict[str, Any]]) -> None:
    """Label each point beside it, moving a label above or below when it would cover one already placed."""
    to_points = ax.transData + ax.figure.dpi_scale_trans.inverted()  # data -> inches
    placed: list[tuple[float, float, float, float]] = []  # label boxes in points: x0, y0, x1, y1
    for v in sorted(variants, key=lambda v: -v["accuracy"]):
        x, y = v["speedup"][HEADLINE], v["accuracy"]
        px, py = (72 * c for c in to_points.transform((x, y)))
        width = 3.6 * len(v["label"])  # about a 7-point character
        for dy in (4, -11, 12, -19, 20, -27):
            box = (px + 6, py + dy, px + 18 + width, py + dy + 8)  # 12 points of room after the text
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(v["label"], (x, y), textcoords="offset points", xytext=(6, dy), fontsize=7)


def _loss_note(setup: dict[str, Any]) -> str:
    """The distillation loss settings (results older than these fields used the defaults written here)."""
    note = f"T={setup.get('temperature', 2.0):g}, alpha={setup.get('alpha', 0.5):g}"
    if setup.get("hidden_loss_weight"):
        note += f", hidden-state loss ({setup['hidden_loss_type']}) weight {setup['hidden_loss_weight']:g}"
    return note


def _teacher_cache_note(variants: list[dict[str, Any]]) -> str:
    """How the distilled variants got the teacher's outputs, and what building the shared cache took."""
    builds = [v["teacher_cache_seconds"] for v in variants if v.get("teacher_cache_built")]
    if not builds:
        return "" if not any("teacher_cache_seconds" in v for v in variants) else "; teacher outputs from a cache"
    return (
        f"; the teacher's outputs on them were cached once ({_duration(sum(builds))}, shared by every distilled "
        "variant and left out of their compression time)"
    )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "-" if seconds == 0 else f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
