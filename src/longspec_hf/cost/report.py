"""`longspec cost` output: JSON (everything), Markdown tables and one PNG figure."""

from __future__ import annotations

import warnings
from pathlib import Path

PARTS = ("draft", "verify", "accept", "commit", "other")


def shape_text(shape: list[int]) -> str:
    return ",".join(map(str, shape)) or "none"


def column(row: dict) -> str:
    return f"{row['drafter']} {row['tree']} [{shape_text(row['tree_shape'])}]"


def summary_table(result: dict) -> list[str]:
    """One row per context: the plain step and each drafter/tree's round with its break-even tau."""
    columns = list(dict.fromkeys(column(r) for r in result["rounds"]))
    lines = ["| context | plain ms/token | " + " | ".join(columns) + " |",
             "|---" * (2 + len(columns)) + "|"]
    for plain in result["plain"]:
        cells = {column(r): f"{r['round_ms']:.1f} ({r['break_even_tau']:.1f})" for r in result["rounds"]
                 if r["context"] == plain["context"]}
        lines.append(f"| {plain['context']} | {plain['step_ms']:.1f} | "
                     + " | ".join(cells.get(c, "-") for c in columns) + " |")
    return lines


def parts_table(result: dict) -> list[str]:
    """Where a round goes, ms per round; parts are blank when the decode loop does not report them."""
    lines = ["| context | drafter | tree | nodes | round | " + " | ".join(PARTS) + " | tau |",
             "|---" * (6 + len(PARTS)) + "|"]
    for r in result["rounds"]:
        parts = r["parts_ms"] or {}
        cells = " | ".join(f"{parts[p]:.1f}" if p in parts else "-" for p in PARTS)
        lines.append(f"| {r['context']} | {r['drafter']} | {r['tree']} "
                     f"| {r['nodes']} | {r['round_ms']:.1f} | {cells} | {r['tau']:.2f} |")
    return lines


def kernel_table(result: dict) -> list[str]:
    """Per-layer ms of prefix attention with LSE per backend and query count; the SDPA decode attention for scale."""
    queries = sorted({k["queries"] for k in result["kernels"]})  # the decode reference's q=1 included
    lines = ["| context | kernel | " + " | ".join(f"q={q}" for q in queries) + " |", "|---" * (2 + len(queries)) + "|"]
    groups: dict[tuple, dict[int, float]] = {}
    for k in result["kernels"]:
        groups.setdefault((k["context"], k["kernel"]), {})[k["queries"]] = k["ms"]
    for (context, kernel), times in groups.items():
        label = "SDPA decode attention, q=1 (reference)" if kernel == "sdpa_decode" else f"{kernel} (with LSE)"
        lines.append(f"| {context} | {label} | " + " | ".join(f"{times[q]:.3f}" if q in times else "" for q in queries)
                     + " |")
    return lines


def noise_note(result: dict) -> list[str]:
    """A warning when a difference of two calls came out negative: timing noise was larger than what it measures."""
    times = [p["step_ms"] for p in result["plain"]] + [r["round_ms"] for r in result["rounds"]]
    if min(times, default=0.0) > 0:
        return []
    return ["", "**Negative times above: timing noise exceeded the differences measured (another process competing "
                "for the device?). Rerun on a quiet machine, or with more --rounds and --repeats.**"]


def markdown_table(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [
        f"{env['target']} on {env['device']} ({env['device_name']}, {env['threads']} threads), {env['dtype']}, "
        f"target attention {env['target_attn_implementation']}, tree attention backend {env['tree_attn_backend']}. "
        f"Each figure: {settings['rounds']} rounds (steps), the difference of a {settings['long_call_tokens']}- and "
        f"a {settings['short_call_tokens']}-token generate() continuing the same prompt cache.",
        "",
        "Break-even τ = round time / plain step: the tokens per round a draft must average to tie plain generate(). "
        "A draft whose τ on a tree is t decodes t / break-even τ times as fast as plain generate(): pick the tree "
        "with the largest ratio.",
        "",
        "Plain decode step (ms per token) and speculative round per drafter and tree: ms per round (break-even τ).",
        "",
        *summary_table(result),
        "",
        "Where a round goes (ms per round; 'other' is the rest of the decode loop; τ of the random draft on the random "
        "prompt, for the record):",
        "",
        *parts_table(result),
        *noise_note(result),
    ]
    if result["kernels"]:
        lines += ["", f"Prefix attention of q tree queries over the context, one layer ({env['heads']} query heads, "
                      f"{env['kv_heads']} KV heads, head dim {env['head_dim']}, {env['dtype']}), ms per call "
                      f"(× {env['layers']} layers per forward):", "", *kernel_table(result)]
    return "\n".join(lines)


def plot(result: dict, folder: Path) -> list[Path]:
    """cost.png: ms per plain step / round vs context, break-even τ vs context, and the kernel table at the longest
    context. Needs matplotlib; without it, no plot and a warning."""
    try:
        # Figure objects, not pyplot: a library must not switch the caller's backend (a notebook's inline plots).
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed, so no plot was written: pip install 'longspec-hf[bench]'",
                      stacklevel=2)
        return []
    fig = Figure(figsize=(15, 4))
    time_ax, tau_ax, kernel_ax = fig.subplots(1, 3)
    plain = sorted((p["context"], p["step_ms"]) for p in result["plain"])
    time_ax.plot([c for c, _ in plain], [ms for _, ms in plain], "k--o", label="plain step")
    for name in dict.fromkeys(column(r) for r in result["rounds"]):
        points = sorted((r["context"], r["round_ms"], r["break_even_tau"]) for r in result["rounds"]
                        if column(r) == name)
        time_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        tau_ax.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=name)
    time_ax.set(xlabel="context (tokens)", ylabel="ms", xscale="log", title="plain step and speculative round")
    tau_ax.set(xlabel="context (tokens)", ylabel="break-even τ", xscale="log",
               title="τ a draft needs to tie plain generate()")
    tau_ax.axhline(1.0, color="gray", linewidth=0.8)
    time_ax.legend(fontsize=7)
    kernels = result["kernels"]
    if kernels:
        longest = max(k["context"] for k in kernels)
        at_longest = [k for k in kernels if k["context"] == longest]
        for kernel in dict.fromkeys(k["kernel"] for k in at_longest):
            points = sorted((k["queries"], k["ms"]) for k in at_longest if k["kernel"] == kernel)
            if kernel == "sdpa_decode":
                kernel_ax.axhline(points[0][1], color="gray", linestyle="--", label="SDPA decode, q=1")
            else:
                kernel_ax.plot([q for q, _ in points], [ms for _, ms in points], marker="o", label=kernel)
        kernel_ax.set(xlabel="tree queries q", ylabel="ms per layer", xscale="log",
                      title=f"prefix attention with LSE at {longest} tokens")
        kernel_ax.legend(fontsize=7)
    else:
        kernel_ax.set_axis_off()
    fig.tight_layout()
    path = folder / "cost.png"
    fig.savefig(path, dpi=120)
    return [path]


def write_outputs(result: dict, folder: str | Path) -> dict[str, Path]:
    """results.json, results.md and cost.png in `folder` (created); returns the paths written."""
    from ..bench.report import write_outputs as write

    return write(result, folder, markdown=markdown_table, plots=plot)
