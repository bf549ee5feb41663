"""A draft's training history across runs, and `longspec promote`: keep a new draft only if it accepts more.

Training a draft on a small machine spans many sittings: each run continues from the draft committed last
(``--init-draft``). `longspec promote` measures the candidate and the current draft on the same held-out prompts and
replaces the current one only if the candidate's tau is higher, appending the run to ``training_history.json`` in the
draft's folder: the run's tokens and seconds, its settings, and tau per held-out cell. The card shows that history as
a table and ``tau_vs_tokens.png``, the plot of tau against the draft's cumulative training tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path

HISTORY = "training_history.json"
PLOT = "tau_vs_tokens.png"
SECTION = "## Training history"
# What identifies a run's data and recipe in the history (the rest of training_args.json is in the run's folder).
RECORDED = ("data", "features", "extra_features", "seq_len", "batch_size", "grad_accum", "max_steps", "lr", "dtype",
            "draft_vocab_size", "prompt_weight", "loss", "lag_min", "lag_max")


def read_history(folder: str | Path) -> list[dict]:
    path = Path(folder) / HISTORY
    return json.loads(path.read_text()) if path.exists() else []


def run_summary(run: str | Path) -> dict:
    """Tokens, seconds and settings of a `longspec train` run (its train_log.jsonl and training_args.json), or of
    one of its `checkpoint-N/` folders (the run's log up to step N)."""
    run = Path(run)
    folder, step = run, None
    if run.name.startswith("checkpoint-") and not (run / "train_log.jsonl").exists():
        folder, step = run.parent, int(run.name.split("-")[1])
    args = json.loads((folder / "training_args.json").read_text())
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if step is None or r["step"] <= step][-1]
    settings = {k: args.get(k) for k in RECORDED}
    if settings.get("features"):  # the store's folder name: where it sat on the training machine says nothing
        settings["features"] = Path(settings["features"]).name
    if settings.get("extra_features"):
        settings["extra_features"] = [Path(folder).name for folder in settings["extra_features"]]
    return {"tokens": last["tokens"], "seconds": round(last["seconds"]), "steps": last["step"], "settings": settings}


def cell_name(row: dict) -> str:
    return f"{row['domain']}@{row['context']}"


def mean_tau(rows: list[dict]) -> float:
    taus = [r["tau"] for r in rows if "tau" in r]
    return sum(taus) / len(taus)


def deciding_rows(rows: list[dict], keep_on: list[str] | None) -> list[dict]:
    """The cells that decide a promotion: those of the `keep_on` domains, or every cell."""
    return rows if not keep_on else [r for r in rows if r["domain"] in keep_on]


def check_keep_on(keep_on: list[str] | None, domains: dict) -> None:
    """Refuse a deciding domain that is not measured, before anything is: a typo must not cost a measurement."""
    unknown = sorted(set(keep_on or ()) - set(domains))
    if unknown:
        raise ValueError(f"--keep-on names {unknown}, which no --domain defines (domains: {sorted(domains)}); "
                         "pass names given to --domain NAME=SOURCE")


def is_better(new_rows: list[dict], old_rows: list[dict], keep_on: list[str] | None = None) -> bool:
    """Whether the candidate's mean tau over the deciding cells beats the kept draft's (no kept draft: it does)."""
    if not old_rows:
        return True
    return mean_tau(deciding_rows(new_rows, keep_on)) > mean_tau(deciding_rows(old_rows, keep_on))


def record(history: list[dict], run: dict, tau_rows: list[dict], kept: bool, measured: str | None = None,
           baseline_rows: list[dict] | None = None, keep_on: list[str] | None = None) -> list[dict]:
    """`history` with the run appended; `measured` says how its tau was measured (the protocol can change between
    runs: each entry keeps its own), `baseline_rows` the kept draft's tau on the same prompts, `keep_on` the
    domains that decided (all, if None)."""
    before = sum(h["run"]["tokens"] for h in history if h["kept"])
    entry = {"date": datetime.date.today().isoformat(), "run": run, "kept": kept,
             "cumulative_tokens": before + run["tokens"],
             # unrounded: the card rounds once (a value rounded here first can round the other way there)
             "tau": {cell_name(r): r["tau"] for r in tau_rows if "tau" in r}}
    if measured:
        entry["measured"] = measured
    if baseline_rows:
        entry["kept_draft_mean_tau"] = mean_tau(baseline_rows)
    if keep_on:
        entry["decided_on"] = list(keep_on)
    return [*history, entry]


def run_labels(history: list[dict]) -> list[str]:
    """The table's name of each entry: runs numbered in order, and a run promoted again (e.g. under another
    protocol) named by its first number and "(again)", so it does not take the next run's number."""
    labels, first_number, runs = [], {}, 0
    for h in history:
        key = json.dumps(h["run"], sort_keys=True)
        if h["run"].get("steps") and key in first_number:
            labels.append(f"{first_number[key]} (again)")
            continue
        first_number.setdefault(key, runs)
        labels.append(str(runs))
        runs += 1
    return labels


def history_table(history: list[dict]) -> str:
    labels = run_labels(history)
    cells = list(dict.fromkeys(c for h in history for c in h["tau"]))
    head = "| run | date | tokens | cumulative tokens | time | kept | "
    lines = [head + " | ".join(f"tau {c}" for c in cells) + " | kept draft's mean tau, same prompts |",
             "|---" * (7 + len(cells)) + "|"]
    for i, h in enumerate(history):
        seconds = h["run"].get("seconds")
        time_text = f"{seconds / 60:.0f} min" if seconds else "-"
        taus = " | ".join(f"{h['tau'][c]:.2f}" if c in h["tau"] else "" for c in cells)
        label = labels[i]
        baseline = h.get("kept_draft_mean_tau")
        kept = ("yes" if h["kept"] else "no") + (f" (on {', '.join(h['decided_on'])})" if h.get("decided_on") else "")
        lines.append(f"| {label} | {h['date']} | {h['run']['tokens']:,} | {h['cumulative_tokens']:,} | {time_text} | "
                     f"{kept} | {taus} | {'' if baseline is None else f'{baseline:.2f}'} |")
    return "\n".join(lines)


def plot_history(history: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(c for h in history for c in h["tau"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    protocols = list(dict.fromkeys(h.get("measured") for h in history))
    for k, protocol in enumerate(protocols):  # a tau measured another way is another line, never joined to these
        for cell in cells:
            # sorted: a run not kept ends past the tokens of a later, kept one
            points = sorted((h["cumulative_tokens"], h["tau"][cell]) for h in history
                            if cell in h["tau"] and h.get("measured") == protocol)
            if points:
                label = cell if len(protocols) == 1 else f"{cell}, protocol {k + 1} (card)"
                ax.plot(*zip(*points, strict=True), marker="os^v"[k % 4], label=label)
    ax.set_xlabel("training tokens (cumulative)")
    ax.set_ylabel("tau (tokens per target forward)")
    ax.set_title("held-out tau against training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_card(folder: Path, history: list[dict], setting: str) -> None:
    """Replace (or append) the card's training-history section: the table, the plot, how tau was measured."""
    readme = folder / "README.md"
    text = readme.read_text() if readme.exists() else ""
    protocols = list(dict.fromkeys(h.get("measured", setting) for h in history))
    how = f"({setting})"
    if len(protocols) > 1:  # entries measured another way say how, by run number
        labels = run_labels(history)
        members = [[labels[i] for i, h in enumerate(history) if h.get("measured", setting) == p] for p in protocols]
        how = "; ".join(f"protocol {k + 1}, {'runs' if len(runs) > 1 else 'run'} {', '.join(runs)}: {p}"
                        for k, (runs, p) in enumerate(zip(members, protocols, strict=True)))
        how = f"(each run against the draft kept before it, measured as listed; {how})"
    section = (f"{SECTION}\n\nEach run continued from the draft kept before it; a run is kept only if its held-out "
               f"tau is higher {how}. Written by `longspec promote`.\n\n{history_table(history)}\n\n"
               f"![tau against training tokens]({PLOT})\n")
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip() + "\n\n" + section
    readme.write_text(text)


def chain_rows(target, tokenizer, folders: list[Path], domains: dict, contexts: list[int], depth: int,
               max_new_tokens: int, prompts: int) -> list[list[dict]]:
    """Per draft folder, one row per held-out cell: the greedy chain's tau computed teacher-forced on the target's
    own continuations (exactly the rounds a chain decode runs, `longspec_hf.agreement.chain_tau`); the
    continuations are generated once and shared by every draft."""
    from ..agreement import chain_tau, greedy_continuations
    from ..evaluation import held_out_cells
    from ..loading import load_draft

    cells = [(cell, None if windows is None else greedy_continuations(target, windows, max_new_tokens))
             for cell, windows in held_out_cells(tokenizer, domains, contexts, prompts)]
    tables = []
    for folder in folders:
        draft = load_draft(str(folder), target)
        vocab = "all" if draft.draft_vocab is None else str(len(draft.draft_vocab))
        tables.append([cell if items is None else {**cell, "vocab": vocab, **chain_tau(draft, items, depth)}
                       for cell, items in cells])
    return tables


def promote(target, tokenizer, candidate: str | Path, current: str | Path, domains: dict, contexts: list[int],
            tree_shape, max_new_tokens: int, prompts: int, keep_on: list[str] | None = None,
            ) -> tuple[bool, list[dict], list[dict]]:
    """Measure both drafts on the same prompts (draft alone: no prompt-lookup branch); copy the candidate's
    weights and config over the current draft if its mean tau is higher, and record the run either way.

    `keep_on` names the domains whose cells decide (e.g. the held-out ones a goal is set on); the other domains are
    measured and recorded all the same. None: every cell decides.

    A chain tree is measured teacher-forced on the target's greedy continuations (the same tau, at a fraction of a
    decode's cost, so more prompts fit: :func:`chain_rows`); any other tree by decoding (`longspec eval`'s tau)."""
    from ..evaluation import evaluate
    from ..modeling import LongSpecDraftModel

    check_keep_on(keep_on, domains)

    def measured(folder):
        draft = LongSpecDraftModel.from_pretrained(folder)
        draft.generation_config.tree_shape = tree_shape
        draft.generation_config.prompt_lookup_num_tokens = None
        return evaluate(target, draft, tokenizer, domains, contexts, max_new_tokens, prompts)

    current, candidate = Path(current), Path(candidate)
    has_current = (current / "model.safetensors").exists()
    from ..agreement import chain_depth

    depth = chain_depth(tree_shape)
    if depth:
        tables = chain_rows(target, tokenizer, [candidate, *([current] if has_current else [])], domains, contexts,
                            depth, max_new_tokens, prompts)
        new_rows, old_rows = tables[0], (tables[1] if has_current else [])
    else:
        new_rows = measured(candidate)
        old_rows = measured(current) if has_current else []
    kept = is_better(new_rows, old_rows, keep_on)
    history = read_history(current)
    if not history and old_rows:  # the draft before any recorded run: its tau is the starting point
        history = [{"date": datetime.date.today().isoformat(), "run": {"tokens": 0, "seconds": None, "steps": 0,
                                                                       "settings": {}},
                    "kept": True, "cumulative_tokens": 0, "tau": {cell_name(r): r["tau"] for r in old_rows}}]
    how = "teacher-forced on the target's greedy continuations, " if depth else ""
    setting = (f"tree {list(tree_shape) if not isinstance(tree_shape, str) else tree_shape}, draft alone, greedy, "
               f"{how}{prompts} prompts of {', '.join(map(str, contexts))} tokens per domain "
               f"({', '.join(f'{k}={v}' for k, v in domains.items())}), {max_new_tokens} new tokens")
    history = record(history, run_summary(candidate), new_rows, kept, setting, old_rows, keep_on)
    if kept:
        current.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(candidate / name, current / name)
    (current / HISTORY).write_text(json.dumps(history, indent=2) + "\n")
    plot_history(history, current / PLOT)
    update_card(current, history, setting)
    return kept, new_rows, old_rows


def promote_cli(args: argparse.Namespace) -> None:
    from ..evaluation import markdown_table
    from ..loading import load_causal_lm
    from ..tree import tree_setting

    domains = dict(d.split("=", 1) for d in args.domain)
    check_keep_on(args.keep_on, domains)
    target, tokenizer = load_causal_lm(args.target, args.gguf_file)
    kept, new_rows, old_rows = promote(target, tokenizer, args.candidate, args.draft, domains, args.contexts,
                                       tree_setting(",".join(args.tree_shape)), args.max_new_tokens, args.prompts,
                                       args.keep_on)
    print("candidate:\n" + markdown_table(new_rows))
    if old_rows:
        print("current:\n" + markdown_table(old_rows))
    over = f" over {', '.join(args.keep_on)}" if args.keep_on else ""
    new_mean = mean_tau(deciding_rows(new_rows, args.keep_on))
    old_mean = f" vs {mean_tau(deciding_rows(old_rows, args.keep_on)):.3f}" if old_rows else ""
    print(f"{'kept: the candidate replaces' if kept else 'not kept: the candidate does not beat'} {args.draft} "
          f"(mean tau{over} {new_mean:.3f}{old_mean})")
