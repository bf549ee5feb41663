"""What the parts of a speculative round cost on this device (for ``tree_shape="auto"``).

Three measured curves, each seconds as a function of a size at a context length `L` and a batch of `B` rows:

* ``verify``: the target's verification forward over a tree of `T` nodes (acceptance included);
* ``draft``: one draft forward over a level of `m` nodes;
* ``rest``: the rest of a round (commit, emitting, the loop) for a tree of `T` nodes.

Samples come from a few timed forwards the first time a (target, drafter, device, dtype, batch) meets a context
length no sample is near, and from every round actually run. A curve at `L` is the piecewise-linear interpolation
over sizes of the samples' medians (a paused process or a busy neighbour makes one round slow, not the curve),
each sample weighted by how close its context is to `L` (log scale), made
non-decreasing in size. Nothing is assumed about the device: the same rule describes a compute-bound CPU (cost
grows with every node) and a memory-bound GPU (flat until the device is saturated).

The samples are kept on disk under the user's cache folder (``$LONGSPEC_HF_CACHE``, else ``$XDG_CACHE_HOME/
longspec_hf``, else ``~/.cache/longspec_hf``), one file per target, drafter, device and dtype, together with the
versions that produced them; a file from other versions is ignored.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from pathlib import Path

from .acceptance import monotone
from .compat import config_value

KINDS = ("verify", "draft", "rest")
SCHEMA = "longspec-auto-cost/1"
BANDWIDTH = 0.15  # log-context kernel width: samples at 2x the context weigh e^-4.6 as much
# A context whose nearest measurement would weigh at least a tenth (within a factor e^(0.15 ln 10) = 1.41) needs no
# new measurement: derived from the kernel rather than set apart from it.
NEAR_WEIGHT = 0.1
MAX_SAMPLES = 400  # per kind and batch size, oldest dropped first (anchors from measurements are kept)


def cache_folder() -> Path:
    if os.environ.get("LONGSPEC_HF_CACHE"):
        return Path(os.environ["LONGSPEC_HF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longspec_hf"


class Curve:
    """Seconds as a piecewise-linear, non-decreasing function of size; linear past the last measured size."""

    def __init__(self, sizes: list[float], seconds: list[float]):
        self.sizes = sizes
        self.seconds = seconds

    def __call__(self, size: float) -> float:
        sizes, seconds = self.sizes, self.seconds
        if not sizes:
            return 0.0
        if len(sizes) == 1 or size <= sizes[0]:
            return seconds[0] if size <= sizes[0] else seconds[0] * size / sizes[0]
        i = min(bisect.bisect_right(sizes, size), len(sizes) - 1)
        x0, x1, y0, y1 = sizes[i - 1], sizes[i], seconds[i - 1], seconds[i]
        return y0 + (y1 - y0) * (size - x0) / (x1 - x0)


class CostModel:
    """Timing samples `(context, size, seconds)` per kind and batch size, and the curves they define."""

    def __init__(self, key: dict | None = None, path: Path | None = None):
        self.key = key or {}
        self.path = path
        self.samples: dict[str, list[list[float]]] = {}  # "kind/B" -> [[context, size, seconds, anchor], ...]
        self.changed = False
        self.bandwidth = BANDWIDTH  # another value only where recorded samples are replayed (auto_evidence)
        # A frozen model learns nothing and stands for the device: "auto" then takes its draft forwards' seconds from
        # it rather than from the clock, so its decisions do not depend on timing (auto_evidence's modelled runs).
        self.frozen = False

    @property
    def near(self) -> float:
        """Log-context distance within which a measurement counts as near (its kernel weight >= NEAR_WEIGHT)."""
        return -self.bandwidth * math.log(NEAR_WEIGHT)

    @classmethod
    def load(cls, key: dict, folder: Path | None = None) -> CostModel:
        """The model stored for `key` (target, drafter, device, dtype and versions), or an empty one."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        path = (folder or cache_folder()) / "cost" / f"{digest}.json"
        model = cls(key, path)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return model
        if stored.get("schema") == SCHEMA and stored.get("key") == key:
            model.samples = {name: [list(map(float, s)) for s in rows] for name, rows in stored["samples"].items()}
        return model

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"schema": SCHEMA, "key": self.key, "samples": self.samples}))
            tmp.replace(self.path)  # atomic: concurrent processes never read a half-written file
            self.changed = False
        except OSError:
            pass  # a read-only home only costs a new measurement next time

    def add(self, kind: str, rows: int, context: int, size: int, seconds: float, anchor: bool = False) -> None:
        if self.frozen:
            return
        samples = self.samples.setdefault(f"{kind}/{rows}", [])
        samples.append([float(context), float(size), float(seconds), float(anchor)])
        if len(samples) > MAX_SAMPLES:
            oldest = next((i for i, s in enumerate(samples) if not s[3]), 0)
            del samples[oldest]
        self.changed = True

    def add_cost_report(self, report: dict, drafter: str) -> int:
        """Measurements from a `longspec cost` result (its JSON) for one of its drafters ("longspec" or
        "self_draft"), for one row: a plain step is a verification of the root alone; a round's verification (and
        acceptance) of `1 + sum(tree)` nodes and its rest come from its parts; its draft time, spread evenly over the
        levels that ran through the draft, gives a draft forward at their mean width. Returns the samples added."""
        added = 0
        for plain in report.get("plain", []):
            self.add("verify", 1, plain["context"], 1, plain["step_ms"] / 1000, anchor=True)
            added += 1
        for row in report.get("rounds", []):
            parts = row.get("parts_ms")
            if row.get("drafter") != drafter or not parts:
                continue
            context, nodes, shape = row["context"], row["nodes"], row["tree_shape"]
            self.add("verify", 1, context, nodes, (parts["verify"] + parts.get("accept", 0.0)) / 1000, anchor=True)
            self.add("rest", 1, context, nodes, (parts.get("commit", 0.0) + parts.get("other", 0.0)) / 1000,
                     anchor=True)
            levels = [1, *shape[:-1]]  # the last level's nodes never run through the draft
            self.add("draft", 1, context, round(sum(levels) / len(levels)), parts["draft"] / 1000 / len(levels),
                     anchor=True)
            added += 3
        return added

    def has_near(self, kind: str, rows: int, context: int) -> bool:
        """Whether a measurement (not only round samples) exists for this batch size near this context."""
        log_context = math.log(max(context, 1))
        return any(s[3] and abs(math.log(max(s[0], 1)) - log_context) <= self.near
                   for s in self.samples.get(f"{kind}/{rows}", []))

    def curve(self, kind: str, rows: int, context: int) -> Curve:
        """The `kind` curve at `context` for `rows` rows (the nearest batch size measured, if not this one)."""
        samples = self.samples.get(f"{kind}/{rows}")
        if not samples:
            batches = [int(name.split("/")[1]) for name in self.samples if name.startswith(kind + "/")]
            if not batches:
                return Curve([], [])
            samples = self.samples[f"{kind}/{min(batches, key=lambda b: abs(b - rows))}"]
        log_context = math.log(max(context, 1))
        nearest = min(abs(math.log(max(s[0], 1)) - log_context) for s in samples)
        by_size: dict[float, list[tuple[float, float]]] = {}
        for s in samples:
            # Relative to the nearest sample, so far-away contexts still give a curve when nothing is near.
            distance = abs(math.log(max(s[0], 1)) - log_context) - nearest
            by_size.setdefault(s[1], []).append((s[2], math.exp(-distance / self.bandwidth)))
        # A size seen only at far contexts would bend the curve with another context's cost: left out.
        sizes = sorted(size for size, timed in by_size.items() if sum(w for _, w in timed) > 0.05)
        medians = [weighted_median(by_size[size]) for size in sizes]
        # Non-decreasing, trusting sizes with more (and nearer) samples more than a single measured one.
        seconds = monotone(medians, [sum(w for _, w in by_size[size]) for size in sizes])
        return Curve(sizes, seconds)


def weighted_median(values: list[tuple[float, float]]) -> float:
    """The median of `(value, weight)` pairs."""
    ordered = sorted(values)
    half, running = sum(w for _, w in ordered) / 2, 0.0
    for value, weight in ordered:
        running += weight
        if running >= half:
            return value
    return ordered[-1][0]


def plot_curves(model: CostModel, contexts: list[int], path: str | Path, rows: int = 1, max_size: int = 64) -> Path:
    """Verification seconds (ms) against tree nodes at each context, with the samples behind them: the picture of
    what "auto" trades tokens against."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = list(range(1, max_size + 1))
    for context in contexts:
        curve = model.curve("verify", rows, context)
        line = ax.plot(sizes, [1000 * curve(s) for s in sizes], label=f"{context} tokens")[0]
        near = [s for s in model.samples.get(f"verify/{rows}", [])
                if abs(math.log(max(s[0], 1) / context)) <= model.near / 2 and s[1] <= max_size]
        ax.scatter([s[1] for s in near], [1000 * s[2] for s in near], s=6, alpha=0.3, color=line.get_color())
    ax.set_xlabel("tree nodes verified (root included)")
    ax.set_ylabel("verification forward (ms)")
    ax.set_title("Cost model of tree_shape=\"auto\" (dots: measured)")
    ax.set_ylim(bottom=0)
    ax.legend(title="context")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cost_key(target, drafter, compiled: bool = False) -> dict:
    """What a cost model is valid for: the target's shape and name, the drafter, the device, dtype, versions, and
    whether rounds are compiled."""
    import torch
    import transformers

    text = target.config.get_text_config(decoder=True)
    shape = {name: config_value(text, name) for name in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "sliding_window")}
    device = target.device
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{device.type}:{torch.get_num_threads()} threads"
    draft_config = getattr(drafter, "config", None)
    draft = {"class": type(drafter).__name__,
             "layers": getattr(draft_config, "num_hidden_layers", None),
             "window": [getattr(drafter, "sink_size", getattr(draft_config, "sink_size", None)),
                        getattr(drafter, "window_size", getattr(draft_config, "window_size", None))]}
    key = {"target": shape, "name": getattr(target.config, "_name_or_path", None), "drafter": draft,
           "device": where, "dtype": str(target.dtype),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "longspec_hf": package_version()}}
    if compiled:  # compiled forwards cost less: a model of their own (eager keys stay as they were)
        key["compiled"] = True
    return key


def package_version() -> str:
    # Read from the installed metadata: these modules also run from a model repo's custom_generate/ folder.
    try:
        from importlib.metadata import version

        return version("longspec-hf")
    except Exception:
        return "unknown"


_MODELS: dict[str, CostModel] = {}  # one model per key in a process, shared by calls


def registry_name(target, drafter, compiled: bool = False) -> str:
    key = cost_key(target, drafter, compiled)
    report = getattr(drafter.generation_config, "cost_report", None)
    return repr(sorted(key.items())) + str(cache_folder()) + str(report)


def cost_model_for(target, drafter, compiled: bool = False) -> CostModel:
    """The cost model of this target, drafter and device (with `compiled` rounds or not): from the user's cache
    folder, plus the measurements of a `longspec cost` result if ``drafter.generation_config.cost_report`` names its
    JSON file."""
    key = cost_key(target, drafter, compiled)
    report = getattr(drafter.generation_config, "cost_report", None)
    name = registry_name(target, drafter, compiled)
    if name not in _MODELS:
        model = CostModel.load(key)
        if report:
            import json

            with open(report) as f:  # its drafters are named by kind: "self_draft" or "longspec"
                kind = "self_draft" if type(drafter).__name__ == "SelfDraft" else "longspec"
                model.add_cost_report(json.load(f), kind)
        _MODELS[name] = model
    return _MODELS[name]
