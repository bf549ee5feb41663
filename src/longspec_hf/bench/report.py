"""Benchmark output: JSON (everything), a Markdown table (the summary) and PNG plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown_table(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"{env['target']} on {env['device']} ({env['device_name']}, {env['threads']} threads), {env['dtype']}, "
        f"greedy, {result['settings']['max_new_tokens']} new tokens, {result['settings']['prompts_per_context']} "
        "prompts per cell; speed-ups are medians over prompts [min-max], against the baseline in the same run.",
        "",
        "| workload | context | method | tau | tokens/s | speed-up (decode) | speed-up (end-to-end) | peak MiB "
        "| draft KV MiB | identical | agree % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        s, e = row["speedup_decode"], row["speedup_end_to_end"]
        lines.append(
            f"| {row['workload']} | {row['context']} | {row['method']} | {row['tau']:.2f} "
            f"| {row['tokens_per_second']['median']:.1f} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] "
            f"| {e['median']:.2f} | {mib(row['peak_memory_bytes'])} | {mib(row['draft_cache_bytes'])} "
            f"| {'yes' if row['identical'] else 'NO'} | {100 * row.get('agreement', 1.0):.0f} |"
        )
    chosen = [row for row in result["summary"] if row.get("tree_shapes")]
    if chosen:
        lines += ["", "Trees chosen by `tree_shape=\"auto\"` (level widths: rounds; none = a plain step):"]
        lines += [f"- {row['workload']} {row['context']} {row['method']}: "
                  + ", ".join(f"{name}: {n}" for name, n in list(row["tree_shapes"].items())[:6])
                  + (f" (accepted tokens of the draft's trees: {row['accepted_tokens']}, predicted "
                     f"{row['predicted_accepted']:.0f})"
                     if "predicted_accepted" in row else "") for row in chosen]
    described = [m for m in result.get("methods", []) if "changed" in m]
    if described:
        lines += ["", "Speculative methods (what each changes in the draft's own `generation_config`):"]
        lines += [f"- {m['name']}: {method_text(m)}" for m in described]
    for skip in result["skipped"]:
        lines.append(f"\nSkipped {skip['method']}: {skip['reason']}.")
    return "\n".join(lines)


def method_text(method: dict) -> str:
    """`tree auto, 6-token lookup branch (the draft's defaults)` or `tree [1, 1, 1] (changed), ...`."""
    changed = set(method["changed"])
    shape = method["tree_shape"]
    shape = shape if isinstance(shape, str) else list(shape) or "none"
    parts = [f"tree {shape}" + (" (changed)" if "tree_shape" in changed else "")]
    branch = method.get("prompt_lookup_num_tokens", 0)
    lookup = f"{branch}-token lookup branch" if branch else "no lookup branch"
    parts.append(lookup + (" (changed)" if "prompt_lookup_num_tokens" in changed else ""))
    if "specpv" in changed:
        parts.append(f"SpecPV {method['specpv']} (changed)")
    if "compile_config" in changed:
        parts.append("compiled rounds (changed)")
    return ", ".join(parts) + ("" if changed else ": the draft's own defaults")


def plot(result: dict, folder: Path) -> list[Path]:
    """speedup.png (decode speed-up vs context, one panel per workload) and draft_cache.png (draft KV bytes vs
    context, with the target's own KV for scale). Needs matplotlib; without it, no plots and a warning."""
    try:
        # Figure objects, not pyplot: a library must not switch the caller's backend (a notebook's inline plots).
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed, so no plots were written: pip install 'longspec-hf[bench]'",
                      stacklevel=2)
        return []
    rows = result["summary"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    paths = []

    fig = Figure(figsize=(5 * len(workloads), 4))
    axes = fig.subplots(1, len(workloads), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=False):
        for method in methods:
            points = sorted((r["context"], r["speedup_decode"]["median"]) for r in rows
                            if r["workload"] == workload and r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set(title=workload, xlabel="context (tokens)", ylabel="decode speed-up vs plain generate()", xscale="log")
        ax.axhline(1.0, color="gray", linewidth=0.8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "speedup.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    target_kv = sorted({(r["context"], r["target_kv_bytes"]) for r in rows})
    # A marker, so that with one context length the line (a single point) is drawn as its legend entry promises.
    ax.plot([c for c, _ in target_kv], [b / 2**20 for _, b in target_kv], "k--", marker="s", label="target KV cache")
    for label, points in draft_cache_curves(rows, methods):
        ax.plot([c for c, _ in points], [b / 2**20 for _, b in points], marker="o", label=label)
    ax.set(xlabel="context (tokens)", ylabel="KV cache (MiB)", xscale="log", title="draft cache vs context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "draft_cache.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def draft_cache_curves(rows: list[dict], methods: list[str]) -> list[tuple[str, tuple]]:
    """`(label, ((context, bytes), ...))` per distinct curve of draft cache bytes. Methods of one drafter hold the
    same cache whatever their tree, so their identical curves are drawn once, under a label naming them all."""
    curves: dict[tuple, list[str]] = {}
    for method in methods:
        points = tuple(sorted({(r["context"], r["draft_cache_bytes"]) for r in rows
                               if r["method"] == method and r["draft_cache_bytes"]}))
        if points:
            curves.setdefault(points, []).append(method)
    labelled = []
    for points, names in curves.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        labelled.append((names[0] if len(names) == 1 else f"{', '.join(names[:3])}{more} (same)", points))
    return labelled


def write_outputs(result: dict, folder: str | Path, markdown=None, plots=None) -> dict[str, Path]:
    """results.json, results.md and the plots in `folder` (created); returns the paths written. `markdown(result)`
    and `plots(result, folder)` default to the benchmark's (``longspec cost`` passes its own)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "markdown": folder / "results.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text((markdown or markdown_table)(result) + "\n")
    for path in (plots or plot)(result, folder):
        paths[path.stem] = path
    return paths
